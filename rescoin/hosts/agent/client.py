"""Querying many agents at once under one deadline."""

from __future__ import annotations

import errno
import json
import os
import secrets
import selectors
import socket
import time
from typing import Any

from rescoin.hosts.agent.protocol import (
    AgentError,
    AgentReport,
    StaleReply,
    _short,
    parse_reply,
)

# ---------------------------------------------------------------------------
# Querying many agents at once


def _parse_endpoint(endpoint) -> tuple[int, str | tuple[Any, ...]]:
    """``unix:/path`` or ``tcp:host:port`` (``tcp:[v6]:port``) -> (family, address).

    Host names are resolved here, before the sockets go non-blocking: use
    addresses (or names in /etc/hosts) so that a slow resolver cannot stall a query.
    """
    if not isinstance(endpoint, str):
        raise AgentError(f"bad endpoint {_short(endpoint)}")
    kind, _, rest = endpoint.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest
    if kind == "tcp":
        if rest.startswith("["):
            host, sep, port = rest[1:].partition("]:")
        else:
            host, sep, port = rest.rpartition(":")
        if sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except (OSError, UnicodeError, ValueError) as e:
                raise AgentError(f"cannot resolve {_short(host)}: {e}") from None
            family, _, _, _, addr = infos[0]
            return family, addr
    raise AgentError(f"bad endpoint {_short(endpoint)} (use unix:/path or tcp:host:port)")


class _Query:
    """One agent's request/reply exchange on a non-blocking socket."""

    def __init__(self, endpoint: str):
        family, addr = _parse_endpoint(endpoint)
        try:
            self.sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            raise AgentError(f"cannot make a socket: {e.strerror or e}") from None
        try:
            self.sock.setblocking(False)
            err = self.sock.connect_ex(addr)
        except (OSError, ValueError, TypeError, UnicodeError) as e:  # e.g. a NUL in the path
            self.sock.close()
            raise AgentError(f"cannot connect: {getattr(e, 'strerror', None) or e}") from None
        if err not in (0, errno.EINPROGRESS) and not (err == errno.EAGAIN and family != socket.AF_UNIX):
            self.sock.close()
            raise AgentError(f"cannot connect: {os.strerror(err)}")
        self.phase = "connecting"
        # the HMAC key is for TCP agents only: a virtio-serial channel is host-only
        self.signed = endpoint.startswith("tcp:")
        # a fresh nonce per agent and query: a reply meant for another VM or an
        # earlier query is never taken for this one
        self.nonce = secrets.token_hex(16)
        self.out = json.dumps({"op": "stats", "nonce": self.nonce}).encode() + b"\n"
        self.buf = b""
        self.received = 0

    def close(self) -> None:
        self.sock.close()


class AgentClient:
    """Queries many agents at once with one deadline, so a slow agent never stalls the loop.

    ``key`` signs TCP agents only (``tcp:`` endpoints); virtio-serial channels
    (``unix:`` endpoints) are host-only and answer unsigned, key or not.
    """

    def __init__(self, timeout: float = 1.0, max_reply: int = 65536, key: bytes | None = None):
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if max_reply < 64:
            raise ValueError("max_reply must be at least 64 bytes")
        self.timeout = float(timeout)
        self.max_reply = int(max_reply)
        self.key = key
        #: uuid -> why the last query for it failed (for logs and ``rescoin status``)
        self.last_errors: dict[str, str] = {}

    def query(self, endpoints: dict[str, str]) -> dict[str, AgentReport | None]:
        """Ask every agent in ``endpoints`` (vm uuid -> endpoint) for stats.

        Returns a report, or None, for every uuid; ``last_errors`` says why for
        each None. Returns within ``timeout`` (plus scheduling slack).
        """
        deadline = time.monotonic() + self.timeout
        results: dict[str, AgentReport | None] = dict.fromkeys(endpoints)
        errors: dict[str, str] = {}
        live: dict[str, _Query] = {}
        sel = selectors.DefaultSelector()
        try:
            for uuid, endpoint in endpoints.items():
                try:
                    q = _Query(endpoint)
                except AgentError as e:
                    errors[uuid] = str(e)
                    continue
                live[uuid] = q
                sel.register(q.sock, selectors.EVENT_WRITE, uuid)
            while live:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for skey, _ in sel.select(left):
                    uuid = skey.data
                    q = live[uuid]
                    try:
                        report = self._step(q, sel)
                    except AgentError as e:
                        errors[uuid] = str(e)
                        report = None
                    except OSError as e:
                        if e.errno in (errno.ECONNRESET, errno.EPIPE):
                            errors[uuid] = f"agent closed the connection while {q.phase}"
                        else:
                            errors[uuid] = f"{q.phase}: {e.strerror or e}"
                        report = None
                    else:
                        if report is None:
                            continue  # still in progress
                    results[uuid] = report
                    sel.unregister(q.sock)
                    q.close()
                    del live[uuid]
            for uuid, q in live.items():
                errors[uuid] = f"timeout after {self.timeout:g}s while {q.phase}"
        finally:
            for q in live.values():
                q.close()
            sel.close()
        self.last_errors = errors
        return results

    def _step(self, q: _Query, sel: selectors.BaseSelector) -> AgentReport | None:
        """Advance one exchange; a report when done, None while in progress."""
        if q.phase == "connecting":
            err = q.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise AgentError(f"cannot connect: {os.strerror(err)}")
            q.phase = "sending"
        if q.phase == "sending":
            try:
                sent = q.sock.send(q.out)
            except (BlockingIOError, InterruptedError):
                return None
            q.out = q.out[sent:]
            if not q.out:
                q.phase = "waiting for a reply"
                sel.modify(q.sock, selectors.EVENT_READ, sel.get_key(q.sock).data)
            return None
        try:
            data = q.sock.recv(min(65536, self.max_reply - q.received + 1))
        except (BlockingIOError, InterruptedError):
            return None
        if not data:
            raise AgentError("agent closed the connection without a complete reply")
        q.received += len(data)
        q.buf += data
        while True:
            line, sep, rest = q.buf.partition(b"\n")
            if not sep:
                break
            q.buf = rest
            if not line.strip():
                continue
            try:
                return parse_reply(line, key=self.key if q.signed else None, nonce=q.nonce)
            except StaleReply:
                continue  # a late reply to an earlier, timed-out query
        if q.received > self.max_reply:
            raise AgentError(f"reply longer than {self.max_reply} bytes")
        return None
