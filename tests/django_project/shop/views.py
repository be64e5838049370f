"""The POST-then-redirect pattern of tests/python/django_causal_check.py (and
django_mysql_causal_check.py), and a write read back within one request."""
from django.db import connections
from django.http import JsonResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from .models import Customer


@require_POST
def create_customer(request):
    customer = Customer.objects.create(name=request.POST["name"])  # the router: `default`
    return redirect("customer_detail", pk=customer.pk)


def customer_detail(request, pk):
    return _found_or_404(Customer.objects.filter(pk=pk))  # the router: `replica` (if there is one)


async def customer_detail_async(request, pk):
    """customer_detail as an async view (ASGI): the ORM's async API, on `replica`."""
    customer = await Customer.objects.filter(pk=pk).afirst()
    if customer is None:
        return JsonResponse({"found": False}, status=404)
    return JsonResponse({"found": True, "id": customer.pk, "name": customer.name})


@require_POST
def create_and_read(request):
    """Create a customer (on `default`) and read it back at once, in the same request,
    through the router (on `replica`): 404 when the read does not see the write."""
    customer = Customer.objects.create(name=request.POST["name"])
    return _found_or_404(Customer.objects.filter(pk=customer.pk))


def _found_or_404(customers):
    customer = customers.first()
    where = {"alias": customers.db, **_server(customers.db)}
    if customer is None:
        return JsonResponse({"found": False, **where}, status=404)
    return JsonResponse({"found": True, "id": customer.pk, "name": customer.name, **where})


def _server(alias):
    """Where a read on `alias` went, for the checks' output. A separate statement: in
    transaction pooling mode it may land on another server than the read before it."""
    with connections[alias].cursor() as cursor:
        if connections[alias].vendor == "mysql":
            cursor.execute("SELECT @@port, @@read_only")
        else:
            cursor.execute("SELECT inet_server_port(), pg_is_in_recovery()")
        port, in_recovery = cursor.fetchone()
    if connections[alias].vendor == "mysql":
        in_recovery = bool(in_recovery)  # @@read_only: 0 or 1
    return {"server_port": port, "in_recovery": in_recovery}
