"""The test project as an ASGI application (tests/python/django_asgi_check.py runs it
under uvicorn)."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sytest.settings")
application = get_asgi_application()
