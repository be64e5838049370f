"""Django integration for Switchyard, the HA proxy for PostgreSQL and MySQL / MariaDB
(Django's postgresql backend, or its mysql backend with mysqlclient).

- `django_switchyard.middleware.CausalReadsMiddleware`: a user's requests after a
  request that wrote read at least as fresh as that write (a causal token carried in a
  short-lived signed cookie), and so do reads on a read alias after a write on a write
  alias within one request.
- `django_switchyard.routers.PrimaryReplicaRouter`: writes to `default`, reads to the
  replica alias (Switchyard's read-only endpoint).
- `django_switchyard.causal`: `current_token()` and `use_token()`, for carrying a write's
  freshness anywhere else (a Celery task, a management command).
"""
from __future__ import annotations

__version__ = "0.3.0"  # keep equal to pyproject.toml's (scripts/install-deps.sh compares them)
