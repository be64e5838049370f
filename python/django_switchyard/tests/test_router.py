import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.test import override_settings

from django_switchyard.routers import PrimaryReplicaRouter


@pytest.fixture
def router():
    return PrimaryReplicaRouter()


def test_reads_go_to_the_replica(router):
    assert router.db_for_read(User) == "replica"


def test_writes_go_to_default(router):
    assert router.db_for_write(User) == "default"


def test_reads_inside_a_transaction_on_default_stay_on_default(router):
    # in_atomic_block is Django's bookkeeping: the test opens a SQLite connection,
    # but the router itself does no I/O.
    with transaction.atomic(using="default"):
        assert router.db_for_read(User) == "default"
        with transaction.atomic(using="default"):  # a savepoint
            assert router.db_for_read(User) == "default"
    assert router.db_for_read(User) == "replica"


def test_a_transaction_on_the_replica_alone_changes_nothing(router):
    with transaction.atomic(using="replica"):
        assert router.db_for_read(User) == "replica"


def test_replica_alias_setting(router):
    with override_settings(SWITCHYARD_REPLICA_ALIAS="ro"):
        assert router.db_for_read(User) == "ro"
        assert router.allow_migrate("ro", "auth") is False
        assert router.allow_migrate("replica", "auth") is None


def obj(db):
    user = User(username="u")
    user._state.db = db
    return user


def test_relations_between_default_and_replica_are_allowed(router):
    assert router.allow_relation(obj("default"), obj("replica")) is True
    assert router.allow_relation(obj("replica"), obj("replica")) is True


def test_relations_with_other_aliases_are_left_to_other_routers(router):
    assert router.allow_relation(obj("default"), obj("other")) is None


def test_migrations_only_on_default(router):
    assert router.allow_migrate("default", "auth") is True
    assert router.allow_migrate("default", "auth", model_name="user") is True
    assert router.allow_migrate("replica", "auth") is False
    assert router.allow_migrate("other", "auth") is None


def test_django_uses_it_for_querysets():
    # The router is installed in conftest's settings.
    assert User.objects.all().db == "replica"
    assert User.objects.select_for_update().db == "default"
    assert User.objects.db_manager("default").all().db == "default"
