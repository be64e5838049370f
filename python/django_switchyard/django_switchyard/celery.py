"""Celery: a task reads at least as fresh as what its sender had written when it sent it.

In the module that creates the Celery app, once::

    import django_switchyard.celery
    django_switchyard.celery.install()

No task changes. When a task is sent, the sender's causal token goes into the message's
headers (`switchyard_causal_token`); when a worker runs the task, the token is in force
around it, as with `use_token()`: a read alias's connection the task opens carries it
as a startup option, one already open gets a `SET`, and both are taken off again when
the task ends. So the classic race is gone: a view saves an object and sends a task
about it, the worker reads the replica before the standby has replayed the save, and
finds nothing.

The sender's token is the newest write on the write aliases (SWITCHYARD_WRITE_ALIASES)
whose connections are open and between transactions, read with `SHOW
switchyard.causal_token` (answered by Switchyard without a server round trip); without
one, the token in force where the task is sent (a request carrying the middleware's
cookie, an enclosing `use_token()`, a task sending a task). A task sent inside
`transaction.atomic()` carries the token of what was committed before: send it from
`transaction.on_commit()`, as Django advises anyway, so that the write it is about is
committed (and covered) when it runs.

Nothing here fails a task or a send: a malformed token is logged and ignored, a
database error is logged, and the task runs with reads as fresh as the proxy makes them
without a token.
"""
from __future__ import annotations

import logging
from typing import Any

from django.db import connections

from . import conf
from .causal import TokenScope, between_transactions, current_scope_token, current_token
from .tokens import is_valid_token

logger = logging.getLogger("django_switchyard")

#: The message header that carries the token.
HEADER = "switchyard_causal_token"

# task id -> the TokenScope open around it (a worker may run tasks in threads).
_scopes: dict[str | None, TokenScope] = {}


def sender_token() -> str:
    """The causal token a task sent now should carry ("" if none)."""
    found = ""
    for alias in conf.write_aliases():
        conn = connections[alias]
        if conn.connection is None or not between_transactions(conn):
            continue
        found = current_token(alias) or found
    return found or current_scope_token() or ""


def _on_publish(sender: str | None = None, headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    if headers is None or headers.get(HEADER):
        return  # no headers to carry it (protocol 1), or the caller set one itself
    try:
        token = sender_token()
    except Exception as exc:  # never fail a send
        logger.warning("no causal token for task %s: %s", sender, exc)
        return
    if token:
        headers[HEADER] = token


def _header(request: Any) -> object:
    """The token a task's request carries: Celery puts custom message headers on the
    request itself, or (some versions, some transports) under `headers`."""
    token = getattr(request, HEADER, None)
    if not token:
        token = (getattr(request, "headers", None) or {}).get(HEADER)
    return token or ""


def _on_prerun(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    token = _header(task.request)
    if not token:
        return
    if not is_valid_token(token):
        logger.warning("task %s carries a malformed causal token %r: ignored", task_id, token)
        return
    try:
        _scopes[task_id] = TokenScope(token, conf.read_aliases()).open()
    except Exception as exc:
        logger.warning("causal token not applied to task %s: %s", task_id, exc)


def _on_postrun(task_id: str | None = None, **kwargs: Any) -> None:
    scope = _scopes.pop(task_id, None)
    if scope is not None:
        scope.close()


def install() -> None:
    """Connect the signals (once; calling it again does nothing)."""
    from celery import signals

    signals.before_task_publish.connect(_on_publish, dispatch_uid="django_switchyard.publish", weak=False)
    signals.task_prerun.connect(_on_prerun, dispatch_uid="django_switchyard.prerun", weak=False)
    signals.task_postrun.connect(_on_postrun, dispatch_uid="django_switchyard.postrun", weak=False)
