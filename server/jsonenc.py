"""JSON that keeps NaN and ±Inf: the wire convention of ``client_hooks.wire``.

Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity",
which every JSON parser reads; Postgres' json type refuses bare NaN tokens.
"""

from __future__ import annotations

from typing import Any

from client_hooks.wire import dumps


def dumps_str(obj: Any) -> str:
    """Serialise for a JSON column (used as the engine's ``json_serializer``)."""
    return dumps(obj).decode()
