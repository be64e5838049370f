"""The POST-then-redirect pattern of tests/python/django_causal_check.py."""
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
    customers = Customer.objects.filter(pk=pk)  # the router: `replica` (if there is one)
    customer = customers.first()
    # Where the read went, for the check's output. A separate statement: in transaction
    # pooling mode it may land on another server than the read above.
    with connections[customers.db].cursor() as cursor:
        cursor.execute("SELECT inet_server_port(), pg_is_in_recovery()")
        port, in_recovery = cursor.fetchone()
    where = {"alias": customers.db, "server_port": port, "in_recovery": in_recovery}
    if customer is None:
        return JsonResponse({"found": False, **where}, status=404)
    return JsonResponse({"found": True, "id": customer.pk, "name": customer.name, **where})
