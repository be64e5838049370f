"""A database router for two aliases in front of one Switchyard cluster.

The setup of the classic Django primary/replica router, with the failover taken out
of the application: `default` points at Switchyard's read-write endpoint (always the
current primary), the replica alias at its read-only endpoint (a healthy standby within
lag, else the primary). Health checks, failover and falling back to the primary are
the proxy's job, so the router only has to tell reads from writes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections

from . import conf

if TYPE_CHECKING:
    from django.db.models import Model


class PrimaryReplicaRouter:
    """Writes and migrations to `default`, reads to SWITCHYARD_REPLICA_ALIAS
    ("replica"), except reads made while `default` is inside a transaction."""

    primary: str = DEFAULT_DB_ALIAS

    @property
    def replica(self) -> str:
        return conf.replica_alias()

    def db_for_read(self, model: type[Model], **hints: Any) -> str:
        # Inside transaction.atomic() on the primary, read there too: a transaction
        # must see its own uncommitted writes, and reads next to writes in one
        # transaction expect one snapshot. (select_for_update() and get_or_create()
        # already go to the write alias.) Looking at in_atomic_block does no I/O.
        if connections[self.primary].in_atomic_block:
            return self.primary
        return self.replica

    def db_for_write(self, model: type[Model], **hints: Any) -> str:
        return self.primary

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        # Both aliases are the same database, so an object read from the replica may
        # point at one written to the primary. Other aliases: not ours to say.
        ours = {self.primary, self.replica}
        if obj1._state.db in ours and obj2._state.db in ours:
            return True
        return None

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None,
                      **hints: Any) -> bool | None:
        # The schema changes on the primary and reaches standbys by replication; a
        # standby is read-only anyway.
        if db == self.primary:
            return True
        if db == self.replica:
            return False
        return None
