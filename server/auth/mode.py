"""When the collector requires tokens.

``auth`` setting: ``required``, ``off``, or ``auto`` = required unless bound to a loopback
address. ``gradsentry serve`` resolves ``auto`` from ``--host`` before starting. An app built
by ``create_app()`` with ``auto`` and served some other way decides per request, from the
local address the connection arrived on (the ASGI ``server``, a socket address, never a
header): a loopback address, or no network address at all (a Unix socket, an in-process test
client), is open; any other address requires a token.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Literal

Mode = Literal["auto", "required", "off"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: object) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(str(host).strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    address = _ip(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def resolve(mode: Mode, host: str) -> Literal["required", "off"]:
    """The mode a collector bound to ``host`` runs in."""
    if mode == "auto":
        return "off" if is_loopback(host) else "required"
    return mode


def required_for(mode: Mode, server: Sequence[object] | None) -> bool:
    """Whether a request that arrived on ASGI ``server`` address must carry a token."""
    if mode != "auto":
        return mode == "required"
    address = _ip(server[0]) if server else None
    return address is not None and not address.is_loopback
