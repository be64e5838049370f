#!/usr/bin/env python3
"""Prove that a real Django project works through Switchyard.

Usage: python3 django_check.py migrate|write|read|atomic|iterator|loop

Configured by SY_HOST, SY_RW_PORT, SY_RO_PORT, SY_USER, SY_PASSWORD, SY_DB
(see tests/django_project/sytest/settings.py). The `default` alias uses the
read-write port, `replica` the read-only port, and shop.routers sends ORM reads
to `replica`. With SY_SINGLE=1 there is only `default` and no router (one
alias on a proxy in transaction pooling mode); `read` then reads from
`default`. Each phase prints `ok: <phase> ...` lines and exits 0; a failure
prints `FAIL: ...` and exits 1.

Run `migrate` and `write` first; `atomic` and `iterator` leave the data as
`write` left it, so `read` passes before and after them.
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

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import IntegrityError, connections, transaction  # noqa: E402
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
# Where ORM reads go: the router sends them to `replica`; with SY_SINGLE=1
# there is no router and `default` serves everything.
READ_ALIAS = "replica" if "replica" in settings.DATABASES else "default"


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
    """Read where ORM reads go (READ_ALIAS) in several typical ORM ways."""
    customers = Customer.objects.order_by("name")
    orders = Order.objects.select_related("customer").order_by("id")
    for qs in (customers, orders):
        if qs.db != READ_ALIAS:
            fail(f"read: {qs.model.__name__} reads went to {qs.db!r}, not {READ_ALIAS!r}")
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
    print(f"ok: read {READ_ALIAS} ({server_info(READ_ALIAS)})")
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
            fail(f"read: {READ_ALIAS} still shows {state} after {READ_TIMEOUT}s, "
                 f"expected {EXPECTED} with customer ids {want_ids}")
        time.sleep(0.2)
    print(f"ok: read visible on {READ_ALIAS} after {attempts} attempt(s), {time.monotonic() - start:.2f}s")
    print(f"ok: read count={state['count']} customers={state['customers']}")
    print(f"ok: read orders (select_related)={[(n, str(a)) for n, a in state['orders']]}")
    print(f"ok: read aggregate total={state['total']} orders={state['n']} filter={state['bob']}")

    on_primary = Customer.objects.using("default").count()
    if on_primary != 2:
        fail(f"read: default has {on_primary} customers, expected 2")
    print(f"ok: read default count={on_primary}")


class Undo(Exception):
    """Raised to leave an atomic block, which rolls it back."""


def current_txid():
    """The id of the transaction `default` is in (assigning one if needed)."""
    with connections["default"].cursor() as cur:
        cur.execute("SELECT txid_current()")
        return cur.fetchone()[0]


def dave_state():
    customers = list(Customer.objects.using("default").filter(name__startswith="dave")
                     .values_list("name", flat=True))
    amounts = sorted(str(a) for a in Order.objects.using("default").filter(customer__name="dave")
                     .values_list("amount", flat=True))
    return customers, amounts


def phase_atomic():
    """transaction.atomic() with savepoints. Through a transaction pooler the
    whole block, savepoints included, must stay one transaction on one server
    connection; a savepoint rollback undoes only its own part. Reads use
    `default` explicitly: a router would send them to `replica`, outside the
    transaction."""
    Customer.objects.using("default").filter(name__startswith="dave").delete()  # an earlier failed run
    with transaction.atomic(using="default"):
        txid = current_txid()
        dave = Customer.objects.using("default").create(name="dave")
        Order.objects.using("default").create(customer=dave, amount=Decimal("1.00"))
        try:
            with transaction.atomic(using="default"):  # SAVEPOINT
                Order.objects.using("default").create(customer=dave, amount=Decimal("2.00"))
                Customer.objects.using("default").filter(pk=dave.pk).update(name="dave-renamed")
                raise Undo  # ROLLBACK TO SAVEPOINT
        except Undo:
            pass
        # A savepoint the server fails (unique violation), the way
        # get_or_create() recovers from a concurrent insert.
        try:
            with transaction.atomic(using="default"):
                Customer.objects.using("default").create(name="dave")
        except IntegrityError:
            pass
        else:
            fail("atomic: a second customer 'dave' did not violate the unique constraint")
        Order.objects.using("default").create(customer=dave, amount=Decimal("3.00"))
        inside = dave_state()
        if current_txid() != txid:
            fail(f"atomic: the block changed transactions ({txid} -> {current_txid()})")
    if inside != (["dave"], ["1.00", "3.00"]):
        fail(f"atomic: inside the block saw {inside}, expected (['dave'], ['1.00', '3.00'])")
    after = dave_state()
    if after != inside:
        fail(f"atomic: after COMMIT default has {after}, expected {inside}")
    print(f"ok: atomic committed with savepoint rollbacks, one transaction ({server_info('default')})")

    # An atomic block that raises rolls all of it back.
    try:
        with transaction.atomic(using="default"):
            Customer.objects.using("default").filter(name="dave").update(name="dave-gone")
            Order.objects.using("default").filter(customer__name__startswith="dave").delete()
            raise Undo
    except Undo:
        pass
    if dave_state() != after:
        fail(f"atomic: a rolled-back block left {dave_state()}, expected {after}")
    print("ok: atomic rollback of the whole block")

    Customer.objects.using("default").filter(name="dave").delete()  # leave what `write` left
    left = Customer.objects.using("default").count()
    if left != 2:
        fail(f"atomic: default has {left} customers after the cleanup, expected 2")
    print(f"ok: atomic cleaned up, customers={left}")


def phase_iterator():
    """QuerySet.iterator() in autocommit: Django declares a WITH HOLD cursor and
    fetches chunk_size rows per FETCH, each its own statement, with other
    queries in between. A transaction pooler must pin the client to the server
    connection that holds the cursor until the cursor is closed."""
    Customer.objects.using("default").filter(name="iter").delete()  # an earlier failed run
    with transaction.atomic(using="default"):
        customer = Customer.objects.using("default").create(name="iter")
        Order.objects.using("default").bulk_create(
            [Order(customer=customer, amount=Decimal(i)) for i in range(1, 10)])
    want = sorted(Order.objects.using("default").values_list("id", flat=True))
    if len(want) < 9:
        fail(f"iterator: only {len(want)} orders to iterate over")

    conn = connections["default"]
    if not conn.get_autocommit() or conn.in_atomic_block:
        fail("iterator: not in autocommit")
    # The rows were just written: read them on `default` (with SY_SINGLE=1
    # this is plain Order.objects.all()).
    seen, names, cursors = [], set(), None
    for order in Order.objects.using("default").all().iterator(chunk_size=2):
        seen.append(order.id)
        names.add(order.customer.name)  # one more query per row, between the FETCHes
        if len(seen) == 3:  # the second chunk is being read
            with conn.cursor() as cur:
                cur.execute("SELECT is_holdable FROM pg_cursors WHERE name LIKE %s", ["_django_curs_%"])
                cursors = [row[0] for row in cur.fetchall()]
    if sorted(seen) != want:
        fail(f"iterator: got order ids {sorted(seen)}, expected {want}")
    if cursors != [True]:
        fail(f"iterator: pg_cursors showed holdable={cursors} while iterating, expected one WITH HOLD cursor")
    chunks = -(-len(seen) // 2)
    print(f"ok: iterator {len(seen)} orders in {chunks} chunks of 2 through a WITH HOLD cursor "
          f"({server_info('default')})")
    if names != {"alice", "bobby", "iter"}:
        fail(f"iterator: customers of the orders {sorted(names)}")
    print(f"ok: iterator related queries between the fetches: customers={sorted(names)}")

    Customer.objects.using("default").filter(name="iter").delete()  # cascades; leave what `write` left
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_cursors")
        (open_cursors,) = cur.fetchone()
    if open_cursors != 0:
        fail(f"iterator: {open_cursors} cursor(s) still open after the loop")
    print("ok: iterator cursor closed, cleaned up")


def phase_loop():
    """ORM writes and reads on `default` for SY_LOOP_SECONDS (default 10) over one
    connection, as a long-running worker does: every error counts (a binary upgrade of
    the proxy in the middle must cause none, nor a reconnect)."""
    seconds = float(os.environ.get("SY_LOOP_SECONDS", "10"))
    conn = connections["default"]
    conn.ensure_connection()
    first = conn.connection
    prefix = f"loop-{os.getpid()}-"
    done, errors = 0, []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            with transaction.atomic(using="default"):
                c = Customer.objects.using("default").create(name=f"{prefix}{done}")
                Order.objects.using("default").create(customer=c, amount=Decimal("1.00"))
            n = Order.objects.using("default").filter(customer__name=f"{prefix}{done}").count()
            if n != 1:
                errors.append(f"iteration {done}: {n} orders read back")
            done += 1
        except Exception as exc:  # counted, and the loop goes on as a worker would
            errors.append(f"iteration {done}: {type(exc).__name__}: {exc}")
            time.sleep(0.05)
    Customer.objects.using("default").filter(name__startswith=prefix).delete()
    if errors:
        fail(f"loop: {len(errors)} errors in {done} iterations: {errors[:5]}")
    if conn.connection is not first:
        fail("loop: Django reconnected during the loop")
    print(f"ok: loop {done} iterations in {seconds:.0f} s over one connection, 0 errors")


PHASES = {"migrate": phase_migrate, "write": phase_write, "read": phase_read,
          "atomic": phase_atomic, "iterator": phase_iterator, "loop": phase_loop}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in PHASES:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(PHASES)}")
    try:
        PHASES[sys.argv[1]]()
    except Exception as exc:  # turn any error into one clear FAIL line
        import traceback
        traceback.print_exc()
        fail(f"{sys.argv[1]}: {type(exc).__name__}: {exc}")
