"""The test project's Celery app (tests/python/celery_causal_check.py): a broker at
SY_BROKER (a redis-server the check starts), and django_switchyard's Celery
integration when SY_CELERY_INTEGRATION=1."""
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sytest.settings")

app = Celery("sytest", broker=os.environ["SY_BROKER"], backend=os.environ["SY_BROKER"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

if os.environ.get("SY_CELERY_INTEGRATION") == "1":
    import django_switchyard.celery

    django_switchyard.celery.install()


@app.task
def customer_visible(pk):
    """Whether the customer is there, read as the router reads (on `replica`)."""
    from shop.models import Customer

    return Customer.objects.filter(pk=pk).exists()
