#!/usr/bin/env python3
"""Prove that Django on MySQL / MariaDB (mysqlclient) works through Switchyard, with
the setup of the article in ../shared/seeds: `default` (the master) on the proxy's
read-write port, `replica` (the article's follower) on its read-only port, and a
router sending reads to `replica` and writes to `default` (sytest/settings_mysql.py,
shop/failover_router.py).

Usage: python3 django_mysql_check.py migrate|write|read|atomic
       python3 django_mysql_check.py serve SECONDS

Configured by SY_HOST, SY_RW_PORT, SY_RO_PORT, SY_USER, SY_PASSWORD, SY_DB. Each
phase prints `ok: <phase> ...` lines and exits 0; a failure prints `FAIL: ...` and
exits 1. Run `migrate` and `write` first; `atomic` leaves the data as `write` left it.

`writes SECONDS` runs ORM transactions through `default` for SECONDS on one persistent
connection (as with CONN_MAX_AGE = None), each creating an order and reading the count
back inside `transaction.atomic`, then deleting what it made; it prints how many ran,
how many failed (each failure too) and which server ports served them, and fails if any
failed (the caller switches the primary over meanwhile).

`serve` handles "requests" for SECONDS (each: ORM reads through `replica`, then the
connections closed as Django's request_finished does with CONN_MAX_AGE = 0), so that
the caller can kill servers meanwhile; it prints which server served each run of
requests, every failed request, and a summary, and fails when requests still fail at
the end.
"""
import os
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "django_project"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sytest.settings_mysql")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import IntegrityError, OperationalError, close_old_connections, connections, transaction  # noqa: E402
from django.db.models import Count, Sum  # noqa: E402

from shop.models import Customer, Order  # noqa: E402

EXPECTED = {
    "customers": ["alice", "bobby"],
    "orders": [("alice", Decimal("10.00")), ("alice", Decimal("20.50")), ("bobby", Decimal("5.25"))],
    "total": Decimal("35.75"),
    "count": 2,
    "n": 3,
    "bob": ["bobby"],
}
READ_TIMEOUT = 10.0  # replication to the replicas is asynchronous


def fail(message):
    sys.exit(f"FAIL: {message}")


def server(alias):
    """(port, @@read_only, @@tx_read_only) of the server behind `alias`."""
    with connections[alias].cursor() as cur:
        cur.execute("SELECT @@port, @@read_only, @@tx_read_only")
        return tuple(int(v) for v in cur.fetchone())


def server_info(alias):
    port, read_only, tx_read_only = server(alias)
    return f"server port {port}, @@read_only={read_only}, @@tx_read_only={tx_read_only}"


def phase_migrate():
    call_command("migrate", database="default", interactive=False, verbosity=1)
    engine = connections["default"].vendor, connections["default"].mysql_server_info
    print(f"ok: migrate default ({server_info('default')}, {engine[0]} {engine[1]})")


def phase_write():
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
    customers = Customer.objects.using("default").count()
    orders = Order.objects.using("default").count()
    if (customers, orders) != (2, 3):
        fail(f"write: primary has {customers} customers and {orders} orders, expected 2 and 3")
    print(f"ok: write counts customers={customers} orders={orders}")


def read_state():
    """ORM reads as the router sends them: to `replica`."""
    customers = Customer.objects.order_by("name")
    orders = Order.objects.select_related("customer").order_by("id")
    for qs in (customers, orders):
        if qs.db != "replica":
            fail(f"read: {qs.model.__name__} reads went to {qs.db!r}, not 'replica'")
    agg = Order.objects.aggregate(total=Sum("amount"), n=Count("id"))
    return {
        "count": customers.count(),
        "customers": [c.name for c in customers.iterator(chunk_size=1)],
        "ids": list(customers.values_list("id", flat=True)),
        "orders": [(o.customer.name, o.amount) for o in orders],
        "total": agg["total"],
        "n": agg["n"],
        "bob": list(Customer.objects.filter(name__startswith="bob").values_list("name", flat=True)),
    }


def phase_read():
    print(f"ok: read replica ({server_info('replica')})")
    want_ids = list(Customer.objects.using("default").order_by("name").values_list("id", flat=True))
    start = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        state = read_state()
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
    # The replica alias refuses writes (a replica's --read-only, or the proxy's read-only
    # session on the primary), whatever server serves it.
    try:
        with transaction.atomic(using="replica"):
            Customer.objects.using("replica").create(name="written-through-replica")
    except OperationalError as e:
        if e.args[0] not in (1290, 1792):
            raise
        print(f"ok: read a write through replica is refused ({e.args[0]})")
    else:
        fail("read: a write through the replica alias succeeded")


class Undo(Exception):
    pass


def dave_state():
    customers = list(Customer.objects.using("default").filter(name__startswith="dave")
                     .values_list("name", flat=True))
    amounts = sorted(str(a) for a in Order.objects.using("default").filter(customer__name="dave")
                     .values_list("amount", flat=True))
    return customers, amounts


def phase_atomic():
    """transaction.atomic() with savepoints on `default`: a savepoint rolled back, a
    savepoint the server fails (duplicate key, as get_or_create recovers), one
    transaction throughout."""
    Customer.objects.using("default").filter(name__startswith="dave").delete()

    def trx_id():
        """(server connection, in a transaction?): the same connection in a transaction
        all along is one transaction (innodb_trx would need the PROCESS privilege)."""
        with connections["default"].cursor() as cur:
            cur.execute("SELECT CONNECTION_ID(), @@in_transaction")
            thread, in_trx = cur.fetchone()
            return (thread, in_trx) if in_trx == 1 else None

    with transaction.atomic(using="default"):
        dave = Customer.objects.using("default").create(name="dave")
        trx = trx_id()
        Order.objects.using("default").create(customer=dave, amount=Decimal("1.00"))
        try:
            with transaction.atomic(using="default"):
                Order.objects.using("default").create(customer=dave, amount=Decimal("2.00"))
                Customer.objects.using("default").filter(pk=dave.pk).update(name="dave-renamed")
                raise Undo
        except Undo:
            pass
        try:
            with transaction.atomic(using="default"):
                Customer.objects.using("default").create(name="dave")
        except IntegrityError:
            pass
        else:
            fail("atomic: a second customer 'dave' did not violate the unique constraint")
        Order.objects.using("default").create(customer=dave, amount=Decimal("3.00"))
        inside = dave_state()
        if trx is None or trx_id() != trx:
            fail(f"atomic: the block changed transactions ({trx} -> {trx_id()})")
    if inside != (["dave"], ["1.00", "3.00"]):
        fail(f"atomic: inside the block saw {inside}, expected (['dave'], ['1.00', '3.00'])")
    if dave_state() != inside:
        fail(f"atomic: after COMMIT default has {dave_state()}, expected {inside}")
    print(f"ok: atomic committed with savepoint rollbacks, one transaction ({server_info('default')})")
    try:
        with transaction.atomic(using="default"):
            Customer.objects.using("default").filter(name="dave").update(name="dave-gone")
            raise Undo
    except Undo:
        pass
    if dave_state() != inside:
        fail(f"atomic: a rolled-back block left {dave_state()}")
    print("ok: atomic rollback of the whole block")
    Customer.objects.using("default").filter(name="dave").delete()
    if Customer.objects.using("default").count() != 2:
        fail("atomic: cleanup left the wrong customers")
    print("ok: atomic cleaned up")


def phase_serve(seconds):
    deadline = time.monotonic() + seconds
    n = failed = 0
    served = []  # [port, requests] runs
    last_ok = True
    tail_failures = 0
    while time.monotonic() < deadline:
        n += 1
        close_old_connections()  # request_started
        try:
            names = list(Customer.objects.order_by("name").values_list("name", flat=True))
            total = Order.objects.aggregate(total=Sum("amount"))["total"]
            port = server("replica")[0]
            if (names, total) != (EXPECTED["customers"], EXPECTED["total"]):
                raise AssertionError(f"read {names} {total}")
        except Exception as exc:  # noqa: BLE001 - every failed request is reported
            failed += 1
            tail_failures += 1
            last_ok = False
            print(f"error: serve request {n} failed: {type(exc).__name__}: {exc}")
        else:
            if not served or served[-1][0] != port:
                print(f"ok: serve request {n} served by server port {port}")
                served.append([port, 0])
            served[-1][1] += 1
            last_ok = True
            tail_failures = 0
        finally:
            close_old_connections()  # request_finished: CONN_MAX_AGE = 0 closes
        time.sleep(0.02)
    print(f"ok: serve {n} requests, {failed} failed, served by {[tuple(r) for r in served]}")
    if not last_ok or tail_failures:
        fail("serve: the last request failed")


def phase_writes(seconds):
    deadline = time.monotonic() + seconds
    n = failed = 0
    ports = []
    alice = Customer.objects.using("default").get(name="alice")
    while time.monotonic() < deadline:
        n += 1
        try:
            with transaction.atomic(using="default"):
                order = Order.objects.using("default").create(customer=alice, amount=Decimal("1.00"))
                count = Order.objects.using("default").filter(customer=alice).count()
                if count < 3:
                    raise AssertionError(f"read {count} orders of alice inside the transaction")
                port = server("default")[0]
            Order.objects.using("default").filter(pk=order.pk).delete()
        except Exception as exc:  # noqa: BLE001 - every failed transaction is reported
            failed += 1
            print(f"error: writes transaction {n} failed: {type(exc).__name__}: {exc}")
        else:
            if not ports or ports[-1] != port:
                ports.append(port)
        time.sleep(0.005)
    print(f"ok: writes {n} transactions, {failed} failed, served by server ports {ports}")
    if failed:
        fail(f"writes: {failed} transaction(s) failed")


PHASES = {"migrate": phase_migrate, "write": phase_write, "read": phase_read, "atomic": phase_atomic}

if __name__ == "__main__":
    try:
        if len(sys.argv) == 3 and sys.argv[1] == "serve":
            phase_serve(float(sys.argv[2]))
        elif len(sys.argv) == 3 and sys.argv[1] == "writes":
            phase_writes(float(sys.argv[2]))
        elif len(sys.argv) == 2 and sys.argv[1] in PHASES:
            PHASES[sys.argv[1]]()
        else:
            sys.exit(f"usage: {sys.argv[0]} {'|'.join(PHASES)} | serve SECONDS")
    except Exception as exc:
        import traceback
        traceback.print_exc()
        fail(f"{sys.argv[1]}: {type(exc).__name__}: {exc}")
