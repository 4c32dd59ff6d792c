"""One online request, checked and answered: the logic of the REST endpoint (``serving/rest.py``),
shared with the MLflow pyfunc (``serving/pyfunc.py``), so both accept and refuse the same requests.

A request is a JSON object (docs/serving.md shows real ones)::

    {"histories": [["item-1", "item-7"], [3, 5]], "k": 10, "exclude_seen": true, "strict": false}

- ``histories``: one list of item ids per user, oldest first; ids of the catalogue's own type
  (text or integers; ``serving/item_ids.py`` says exactly which ids name which items);
- ``k`` (default 10, or the catalogue size when smaller): items per user, from 1 to the catalogue
  size and at most ``Limits.max_k``;
- ``exclude_seen`` (default true): leave out the items of the user's history;
- ``strict`` (default false): refuse the request when any id is unknown.

The answer has, per history in order, ``item_ids`` and ``scores`` (best first), ``unknown`` (the
ids that name no item, as sent) and ``fallback``: true when no id of the history named an item, so
that the items are the most popular of the training data (scored by their training counts), not a
personal ranking. Under ``strict``, a history with an unknown id is refused instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from recsys.errors import UserError

__all__ = ["Limits", "Request", "RequestError", "parse_request", "answer"]

FIELDS = ("histories", "k", "exclude_seen", "strict")
DEFAULT_K = 10


class RequestError(UserError):
    """A request the client can fix. ``status`` is its HTTP status (400; 413 for one too large);
    ``details`` are extra fields of the error response (``unknown`` under ``strict``)."""

    def __init__(self, message: str, status: int = 400, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.details = details or {}


@dataclass(frozen=True)
class Limits:
    """Bounds on one request (the REST endpoint also bounds its body's bytes)."""

    max_batch: int = 256  #: histories per request
    max_k: int = 1000  #: items per history


@dataclass(frozen=True)
class Request:
    histories: list[list[Any]]
    k: int
    exclude_seen: bool
    strict: bool


def _shown(value: Any) -> str:
    """A value as the client wrote it (JSON), cut short."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {_shown(value)}")
    return value


def parse_request(body: Any, num_items: int, limits: Limits = Limits()) -> Request:
    """Check a decoded JSON body against the catalogue size and the limits; one clear message if bad."""
    if not isinstance(body, dict):
        raise RequestError(f'the request must be a JSON object with "histories", got {_shown(body)}')
    extra = [name for name in body if name not in FIELDS]
    if extra:
        raise RequestError(f"unknown field {_shown(extra[0])}; the fields are {', '.join(FIELDS)}")
    if "histories" not in body:
        raise RequestError('the request has no "histories" (a list of item-id lists, one per user)')
    histories = body["histories"]
    if not isinstance(histories, list) or not histories:
        raise RequestError(f"histories must be a non-empty list of item-id lists, got {_shown(histories)}")
    if len(histories) > limits.max_batch:
        raise RequestError(f"at most {limits.max_batch} histories per request, got {len(histories)}", status=413)
    for i, history in enumerate(histories):
        if not isinstance(history, list):
            raise RequestError(f"histories[{i}] must be a list of item ids, got {_shown(history)}")
    top = min(num_items, limits.max_k)
    k = body.get("k", min(DEFAULT_K, top))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
        bound = "the catalogue size" if top == num_items else "the server's limit"
        raise RequestError(f"k must be an integer from 1 to {top} ({bound}), got {_shown(k)}")
    return Request(histories, k, _flag(body, "exclude_seen", True), _flag(body, "strict", False))


def _refuse_unknown(unknown: list[list[Any]]) -> None:
    named = [(i, ids) for i, ids in enumerate(unknown) if ids]
    total = sum(len(ids) for _, ids in named)
    shown = "; ".join(f"histories[{i}]: {', '.join(_shown(v) for v in ids[:5])}" for i, ids in named[:5])
    more = " ..." if len(named) > 5 or any(len(ids) > 5 for _, ids in named[:5]) else ""
    raise RequestError(f"{total} unknown item id(s) (strict): {shown}{more}", details={"unknown": unknown})


def answer(model, request: Request) -> dict[str, Any]:
    """The response to a checked request, from a :class:`serving.SizedRecommender`."""
    rows, unknown = model.lookup(request.histories)
    if request.strict and any(unknown):
        _refuse_unknown(unknown)
    top_rows, scores = model.recommend_rows(rows, request.k, request.exclude_seen)
    results = [
        {
            "item_ids": [item for item, _ in items],
            "scores": [score for _, score in items],
            "unknown": missing,
            "fallback": not known,
        }
        for items, missing, known in zip(model.named(top_rows, scores), unknown, rows)
    ]
    return {"size": model.size, "k": request.k, "exclude_seen": request.exclude_seen, "results": results}
