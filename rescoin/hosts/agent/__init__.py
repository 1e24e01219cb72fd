"""Host side of the guest-agent protocol (see guest_agent/README.md).

The host sends one request line ``{"op": "stats", "nonce": "<hex>"}`` and reads
one JSON reply line. Over virtio-serial the reply is the JSON object itself;
over TCP it is an envelope ``{"payload": "<reply JSON text>", "hmac": "<hex>"}``
signed with a shared key (HMAC-SHA256 over the payload text).

Everything that comes from a guest is untrusted. :func:`parse_reply` checks
every field's type and range and raises :class:`AgentError` for anything wrong,
never another exception. :class:`AgentClient` asks many agents at once under one
deadline, so a slow or broken agent only costs its own VM's data ("no agent data"
= ``None``), never a stall of the control loop.

Rooms: :mod:`.protocol` (one reply: parse and check; the shared key), :mod:`.signals`
(unmet-demand signals from reports), :mod:`.client` (many agents at once). Everything
callers use is importable from ``rescoin.hosts.agent``.
"""
from __future__ import annotations

from rescoin.hosts.agent.client import AgentClient
from rescoin.hosts.agent.protocol import (
    MAX_VALUE,
    PROTOCOL_VERSION,
    SIZE_SLACK,
    AgentError,
    AgentReport,
    StaleReply,
    check_size,
    load_key,
    parse_reply,
)
from rescoin.hosts.agent.signals import signals_from, swap_fault_pressure

__all__ = [
    "MAX_VALUE", "PROTOCOL_VERSION", "SIZE_SLACK", "AgentClient", "AgentError", "AgentReport",
    "StaleReply", "check_size", "load_key", "parse_reply", "signals_from", "swap_fault_pressure",
]
