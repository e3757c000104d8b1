"""The OpenAPI document as the API really behaves, for clients and for schemathesis.

FastAPI generates the document from the routes; two things are added afterwards: floats are
documented as the wire writes them (a number or "NaN"/"Infinity"/"-Infinity"), and schemas
that a route declares by hand (the step batch, read from the raw body) have their ``$defs``
moved to ``components/schemas``, where their ``$ref``s can find them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

# How a float travels (client_hooks.wire): a JSON number, or one of the non-finite strings.
WIRE_FLOAT_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]
}
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def install_openapi(app: FastAPI) -> None:
    """Have ``app.openapi()`` (and ``/openapi.json``) serve the completed document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            hoist_defs(spec)
            settings = getattr(app.state, "settings", None)
            if settings is None or settings.auth != "required":
                allow_no_token(spec)
            app.openapi_schema = document_wire_floats(spec)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def allow_no_token(spec: dict[str, Any]) -> None:
    """A collector that may run open (``auth`` auto or off) accepts requests without a token:
    each operation's security requirement gets the empty alternative ``{}`` ("no token")."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            security = operation.get("security") if isinstance(operation, dict) else None
            if security and {} not in security:
                security.append({})


def document_wire_floats(node: Any) -> Any:
    """Make every unbounded ``{"type": "number"}`` say what the API really reads and writes:
    a number or "NaN"/"Infinity"/"-Infinity". Bounded numbers (``gt``, ``ge``...: finite by
    construction) stay as they are. Changes ``node`` in place."""
    if isinstance(node, list):
        for item in node:
            document_wire_floats(item)
    elif isinstance(node, dict):
        if node.get("type") == "number" and not any(k in node for k in _BOUNDS):
            del node["type"]
            node.update(WIRE_FLOAT_SCHEMA)
            return node
        for value in node.values():
            document_wire_floats(value)
    return node


def hoist_defs(spec: dict[str, Any]) -> None:
    """Move ``$defs`` found inside the document's schemas to ``components/schemas`` and point
    their ``#/$defs/X`` references there (inside an OpenAPI document ``#`` is the document)."""
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    found: dict[str, Any] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        for name, schema in node.pop("$defs", {}).items():
            found[name] = walk(schema)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node["$ref"] = "#/components/schemas/" + ref.removeprefix("#/$defs/")
        return {key: walk(value) for key, value in node.items()}

    spec["paths"] = walk(spec.get("paths", {}))
    for name, schema in found.items():
        if name in components and components[name] != schema:
            raise ValueError(f"two different schemas are named {name!r} in the OpenAPI spec")
        components[name] = schema
