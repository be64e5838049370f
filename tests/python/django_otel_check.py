#!/usr/bin/env python3
"""A Django view instrumented with OpenTelemetry (opentelemetry-instrumentation-django,
with its sqlcommenter option) queries PostgreSQL through Switchyard; the application's
spans go to the same OTLP/HTTP receiver as Switchyard's (tests/traces.rs checks that
they make one trace).

Prints `trace=<32 hex> span=<16 hex>`: the request span the view ran in.

Usage: django_otel_check.py --port P --otlp http://127.0.0.1:Q
"""
import argparse
import sys

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--otlp", required=True)
a = p.parse_args()

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

provider = TracerProvider(resource=Resource.create({"service.name": "django-app"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{a.otlp}/v1/traces")))
trace.set_tracer_provider(provider)

import django
from django.conf import settings
from django.http import JsonResponse
from django.urls import path

seen = {}


def view(request):
    from django.db import connection

    ctx = trace.get_current_span().get_span_context()
    seen["trace"], seen["span"] = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_class WHERE relname = %s", ["pg_class"])
        (n,) = cur.fetchone()
    return JsonResponse({"n": n})


urlpatterns = [path("count/", view)]

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": "127.0.0.1",
            "PORT": a.port,
            "NAME": "app",
            "USER": "app",
            "PASSWORD": "app",
        }
    },
    SQLCOMMENTER_WITH_OPENTELEMETRY=True,
)

from opentelemetry.instrumentation.django import DjangoInstrumentor

DjangoInstrumentor().instrument(is_sql_commentor_enabled=True)
django.setup()

from django.test import Client

r = Client().get("/count/")
if r.status_code != 200 or r.json()["n"] != 1:
    print(f"FAIL: {r.status_code} {r.content!r}")
    sys.exit(1)
provider.force_flush()
print(f"trace={seen['trace']} span={seen['span']}")
