"""A JSON response that writes NaN and ±Inf as the wire strings."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from client_hooks.wire import dumps


class WireJSONResponse(JSONResponse):
    """JSON with "NaN"/"Infinity"/"-Infinity" strings instead of invalid tokens."""

    def render(self, content: Any) -> bytes:
        if isinstance(content, BaseModel):
            return content.model_dump_json().encode()
        if isinstance(content, list) and content and isinstance(content[0], BaseModel):
            return b"[" + b",".join(m.model_dump_json().encode() for m in content) + b"]"
        return dumps(content)


# How a float travels (client_hooks.wire): a JSON number, or one of the non-finite strings.
WIRE_FLOAT_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]
}


def document_wire_floats(node: Any) -> Any:
    """Make every unbounded ``{"type": "number"}`` of an OpenAPI document say what the API
    really reads and writes: a number or "NaN"/"Infinity"/"-Infinity". Bounded numbers
    (``gt``, ``ge``…: finite by construction) stay as they are. Changes ``node`` in place."""
    if isinstance(node, list):
        for item in node:
            document_wire_floats(item)
    elif isinstance(node, dict):
        if node.get("type") == "number" and not any(
            k in node for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
        ):
            del node["type"]
            node.update(WIRE_FLOAT_SCHEMA)
            return node
        for value in node.values():
            document_wire_floats(value)
    return node
