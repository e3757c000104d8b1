"""JSON that keeps NaN and ±Inf: the wire convention of ``client_hooks.wire``.

Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity",
which every JSON parser reads; Postgres' json type refuses bare NaN tokens.
"""

from __future__ import annotations

import json
from typing import Any

from client_hooks.wire import dumps


def dumps_str(obj: Any) -> str:
    """Serialise for a JSON column (used as the engine's ``json_serializer``).

    Without a non-finite float the plain C encoder gives the same text (it refuses NaN/±Inf
    with ``allow_nan=False``), so the walk that rewrites them runs only when one is there:
    an alert state of a 128-layer run is ~1,000 floats, written on every ingest.
    """
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return dumps(obj).decode()
