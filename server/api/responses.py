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
