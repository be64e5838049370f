#!/usr/bin/env python3
"""Prove that a real Django project works through Switchyard.

Usage: python3 django_check.py migrate|write|read

Configured by SY_HOST, SY_RW_PORT, SY_RO_PORT, SY_USER, SY_PASSWORD, SY_DB
(see tests/django_project/sytest/settings.py). The `default` alias uses the
read-write port, `replica` the read-only port, and shop.routers sends ORM reads
to `replica`. Each phase prints `ok: <phase> ...` lines and exits 0; a failure
prints `FAIL: ...` and exits 1.
"""
import os
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "django_project"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sytest.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connections, transaction  # noqa: E402
from django.db.models import Count, Sum  # noqa: E402

from shop.models import Customer, Order  # noqa: E402

# What the database holds after `write`, and what `read` waits to see.
EXPECTED = {
    "customers": ["alice", "bobby"],
    "orders": [("alice", Decimal("10.00")), ("alice", Decimal("20.50")), ("bobby", Decimal("5.25"))],
    "total": Decimal("35.75"),
    "count": 2,
    "n": 3,
    "bob": ["bobby"],
}
READ_TIMEOUT = 5.0  # replication to the standby is asynchronous


def fail(message):
    sys.exit(f"FAIL: {message}")


def server_info(alias):
    with connections[alias].cursor() as cur:
        cur.execute("SELECT inet_server_port(), pg_is_in_recovery()")
        port, recovery = cur.fetchone()
    return f"server port {port}, pg_is_in_recovery={recovery}"


def phase_migrate():
    call_command("migrate", database="default", interactive=False)
    print(f"ok: migrate default ({server_info('default')})")


def phase_write():
    # Start from a known state so `read` knows exactly what to expect, even
    # when the phases are run more than once against the same database.
    with transaction.atomic(using="default"):
        Customer.objects.all().delete()  # cascades to orders
        alice = Customer.objects.create(name="alice")
        bob = Customer.objects.create(name="bob")
        carol = Customer.objects.create(name="carol")
        Order.objects.bulk_create([
            Order(customer=alice, amount=Decimal("10.00")),
            Order(customer=alice, amount=Decimal("20.50")),
            Order(customer=bob, amount=Decimal("5.25")),
            Order(customer=carol, amount=Decimal("7.00")),
        ])
        updated = Customer.objects.filter(name="bob").update(name="bobby")
        carol.delete()
    if updated != 1:
        fail(f"write: update changed {updated} rows, expected 1")
    print(f"ok: write committed ({server_info('default')})")

    # Count on the primary: the replica may not have caught up yet.
    customers = Customer.objects.using("default").count()
    orders = Order.objects.using("default").count()
    if (customers, orders) != (2, 3):
        fail(f"write: primary has {customers} customers and {orders} orders, expected 2 and 3")
    print(f"ok: write counts customers={customers} orders={orders}")


def read_state():
    """Read through the router (to `replica`) in several typical ORM ways."""
    customers = Customer.objects.order_by("name")
    orders = Order.objects.select_related("customer").order_by("id")
    for qs in (customers, orders):
        if qs.db != "replica":
            fail(f"read: router sent {qs.model.__name__} reads to {qs.db!r}, not 'replica'")
    agg = Order.objects.aggregate(total=Sum("amount"), n=Count("id"))
    return {
        "count": customers.count(),
        "customers": [c.name for c in customers.iterator(chunk_size=1)],  # server-side cursor
        "ids": list(customers.values_list("id", flat=True)),
        "orders": [(o.customer.name, o.amount) for o in orders],
        "total": agg["total"],
        "n": agg["n"],
        "bob": list(Customer.objects.filter(name__startswith="bob").values_list("name", flat=True)),
    }


def phase_read():
    print(f"ok: read replica ({server_info('replica')})")
    # Row ids on the primary identify the rows of the latest `write`, so rows
    # a lagging replica still has from an earlier run cannot pass for them.
    want_ids = list(Customer.objects.using("default").order_by("name").values_list("id", flat=True))
    start = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        state = read_state()
        # Each read is its own statement, so replay may land between them:
        # only a pass where everything matches counts.
        if state["ids"] == want_ids and all(state[key] == EXPECTED[key] for key in EXPECTED):
            break
        if time.monotonic() - start > READ_TIMEOUT:
            fail(f"read: replica still shows {state} after {READ_TIMEOUT}s, "
                 f"expected {EXPECTED} with customer ids {want_ids}")
        time.sleep(0.2)
    print(f"ok: read visible on replica after {attempts} attempt(s), {time.monotonic() - start:.2f}s")
    print(f"ok: read count={state['count']} customers={state['customers']}")
    print(f"ok: read orders (select_related)={[(n, str(a)) for n, a in state['orders']]}")
    print(f"ok: read aggregate total={state['total']} orders={state['n']} filter={state['bob']}")

    on_primary = Customer.objects.using("default").count()
    if on_primary != 2:
        fail(f"read: default has {on_primary} customers, expected 2")
    print(f"ok: read default count={on_primary}")


PHASES = {"migrate": phase_migrate, "write": phase_write, "read": phase_read}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in PHASES:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(PHASES)}")
    try:
        PHASES[sys.argv[1]]()
    except Exception as exc:  # turn any error into one clear FAIL line
        import traceback
        traceback.print_exc()
        fail(f"{sys.argv[1]}: {type(exc).__name__}: {exc}")
