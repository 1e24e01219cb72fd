"""A raw request to a lab guest's agent, for the e2e tests only.

The e2e tests send ops the scheduler never sends (``chaos``: lie, stall,
exit) and read the reply as plain JSON, so they cannot use
rescoin.hosts.agent.AgentClient, which only asks for stats and validates the
reply. rescoin itself never uses this (it was rescoin.lab.agent_request).
"""
from __future__ import annotations

import json
import socket
import time
import uuid as uuidlib
from pathlib import Path


def agent_request(path: str | Path, op: str = "stats", timeout: float = 2.0, max_bytes: int = 65536,
                  **fields) -> dict | None:
    """Send one request to the agent behind the channel socket ``path`` and
    return its JSON reply, or None (no socket, no answer in time, not JSON).
    Replies carrying another request's nonce (left over from an earlier
    connection) are skipped."""
    nonce = uuidlib.uuid4().hex[:16]
    request = json.dumps({"op": op, "nonce": nonce, **fields}) + "\n"
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(request.encode())
            buf = b""
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    return None
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        reply = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(reply, dict) and reply.get("nonce", nonce) == nonce:
                        return reply
                if len(buf) > max_bytes:
                    return None
    except (TimeoutError, OSError):
        return None
    return None
