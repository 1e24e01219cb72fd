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
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import os
import secrets
import selectors
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rescoin.core.resources import Resource

PROTOCOL_VERSION = 1
NAN = float("nan")
#: largest value accepted for any counter or size (64-bit kernel counters)
MAX_VALUE = float(2**64)
#: how far above the VM's configured memory a guest's MemTotal may be (rounding, hot-plugged DIMMs)
SIZE_SLACK = 0.05
#: half-saturation rates of the memory-pressure heuristic used without PSI
SWAPIN_HALF_RATE = 256.0  # pages/s swapped in (1 MiB/s with 4 KiB pages) -> 0.5
MAJFAULT_HALF_RATE = 1000.0  # major faults/s -> 0.5

_HEX = frozenset("0123456789abcdefABCDEF")
_MEM_FIELDS = ("total_kib", "available_kib", "free_kib", "swap_total_kib", "swap_free_kib")
_PSI_AVG_FIELDS = tuple(f"{kind}_{avg}" for kind in ("some", "full") for avg in ("avg10", "avg60", "avg300"))
_PSI_TOTAL_FIELDS = ("some_total", "full_total")


class AgentError(Exception):
    """Why a reply (or a query) was rejected, in words fit for the log."""


class StaleReply(AgentError):
    """A well-formed reply to some other request (its nonce does not match)."""


@dataclass(frozen=True)
class AgentReport:
    """What one guest agent said, in host units. NaN = the guest did not say."""

    ts: float  # guest clock, unix seconds
    mem_total_mib: float
    mem_available_mib: float
    mem_free_mib: float
    swap_total_mib: float
    swap_free_mib: float
    major_faults: float  # cumulative counters
    swap_in: float  # pages
    cpu_total_ticks: float
    cpu_steal_ticks: float
    psi_memory_some: float  # avg10, in %
    psi_memory_full: float
    psi_cpu_some: float
    psi_io_some: float

    @property
    def used_mib(self) -> float:
        return self.mem_total_mib - self.mem_available_mib


# ---------------------------------------------------------------------------
# Parsing


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_keys(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def _loads_object(text, what: str) -> dict:
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise AgentError(f"{what} is not UTF-8") from None
    elif not isinstance(text, str):
        raise AgentError(f"{what} must be bytes or str, not {type(text).__name__}")
    text = text.strip()
    if not text:
        raise AgentError(f"empty {what}")
    try:
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError, OverflowError) as e:
        raise AgentError(f"{what} is not valid JSON: {_short(e)}") from None
    if not isinstance(obj, dict):
        raise AgentError(f"{what} is not a JSON object")
    return obj


def _short(value, limit: int = 80) -> str:
    text = str(value)
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _section(obj: dict, name: str, where: str) -> dict:
    value = obj.get(name, {})
    if not isinstance(value, dict):
        raise AgentError(f"{where}{name} must be an object")
    return value


def _number(obj: dict, name: str, where: str, hi: float = MAX_VALUE) -> float:
    """``obj[name]`` as a finite float in [0, hi]; NaN if absent."""
    if name not in obj:
        return NAN
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AgentError(f"{where}{name} must be a number, not {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError:
        raise AgentError(f"{where}{name} is out of range") from None
    if not math.isfinite(x) or x < 0.0 or x > hi:
        raise AgentError(f"{where}{name} = {_short(value, 30)} is out of range [0, {hi:g}]")
    return x


def _not_above(small: float, big: float, what: str) -> None:
    if not math.isnan(small) and not math.isnan(big) and small > big:
        raise AgentError(what)


def _unwrap(obj: dict, key: bytes) -> dict:
    """The verified payload object of a signed envelope."""
    if set(obj) != {"payload", "hmac"}:
        raise AgentError("unsigned reply (expected {payload, hmac} envelope)")
    payload, mac = obj["payload"], obj["hmac"]
    if not isinstance(payload, str) or not isinstance(mac, str):
        raise AgentError("envelope payload and hmac must be strings")
    if len(mac) != 64 or not set(mac) <= _HEX:
        raise AgentError("envelope hmac is not 64 hex digits")
    expected = hmac.new(key, payload.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, bytes.fromhex(mac)):
        raise AgentError("bad hmac (wrong key or tampered reply)")
    return _loads_object(payload, "payload")


def parse_reply(line, *, key: bytes | None = None, nonce: str | None = None,
                now: float | None = None, max_age: float = 30.0) -> AgentReport:
    """Validate one reply line and turn it into an :class:`AgentReport`.

    With ``key``, the line must be a signed envelope with a correct HMAC and a
    payload ``ts`` within ``max_age`` seconds of ``now`` (default: the host's
    clock). With ``nonce``, the reply must echo it; a reply carrying another
    nonce raises :class:`StaleReply` (an :class:`AgentError`).

    Raises :class:`AgentError` on anything wrong, never another exception.
    """
    try:
        return _parse(line, key, nonce, now, max_age)
    except AgentError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError, UnicodeError) as e:  # belt and braces
        raise AgentError(f"malformed reply: {_short(e)}") from None


def _parse(line, key, nonce, now, max_age) -> AgentReport:
    obj = _loads_object(line, "reply")
    if key is not None:
        obj = _unwrap(obj, bytes(key))
    elif "payload" in obj and "hmac" in obj:
        raise AgentError("signed reply but no key configured")
    ts = _checked_ts(obj, key, nonce, now, max_age)
    return _report(obj, ts)


def _checked_ts(obj: dict, key, nonce, now, max_age) -> float:
    """The reply's ts, after the checks that come before its data: version, nonce, error, age."""
    version = obj.get("v")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise AgentError(f"unsupported protocol version {_short(version, 20)}")
    if nonce is not None:
        got = obj.get("nonce")
        if got is None:
            raise AgentError("reply does not echo the request nonce")
        if got != nonce:
            raise StaleReply("reply to another request (nonce mismatch)")
    if "error" in obj:
        raise AgentError(f"agent error: {_short(obj['error'])}")

    if "ts" not in obj:
        raise AgentError("reply has no ts")
    ts = _number(obj, "ts", "")
    if key is not None:
        if now is None:
            now = time.time()
        if not abs(now - ts) <= max_age:
            raise AgentError(f"stale reply: ts is {now - ts:+.1f}s from now (max {max_age:g}s)")
    return ts


def _report(obj: dict, ts: float) -> AgentReport:
    """The checked data sections of a reply, as an :class:`AgentReport`."""
    mem = _section(obj, "mem", "")
    total, avail, free, swap_total, swap_free = (_number(mem, f, "mem.") for f in _MEM_FIELDS)
    _not_above(avail, total, "mem.available_kib exceeds mem.total_kib")
    _not_above(free, total, "mem.free_kib exceeds mem.total_kib")
    _not_above(swap_free, swap_total, "mem.swap_free_kib exceeds mem.swap_total_kib")

    vmstat = _section(obj, "vmstat", "")
    majflt = _number(vmstat, "pgmajfault", "vmstat.")
    pswpin = _number(vmstat, "pswpin", "vmstat.")

    cpu = _section(obj, "cpu", "")
    cpu_total = _number(cpu, "total_ticks", "cpu.")
    cpu_steal = _number(cpu, "steal_ticks", "cpu.")
    _not_above(cpu_steal, cpu_total, "cpu.steal_ticks exceeds cpu.total_ticks")

    some10, full10 = _psi_avg10(_section(obj, "psi", ""))

    mib = 1.0 / 1024.0
    return AgentReport(
        ts=ts,
        mem_total_mib=total * mib,
        mem_available_mib=avail * mib,
        mem_free_mib=free * mib,
        swap_total_mib=swap_total * mib,
        swap_free_mib=swap_free * mib,
        major_faults=majflt,
        swap_in=pswpin,
        cpu_total_ticks=cpu_total,
        cpu_steal_ticks=cpu_steal,
        psi_memory_some=some10["memory"],
        psi_memory_full=full10["memory"],
        psi_cpu_some=some10["cpu"],
        psi_io_some=some10["io"],
    )


def _psi_avg10(psi: dict) -> tuple[dict[str, float], dict[str, float]]:
    """Check every PSI field; return the some/full avg10 of memory, cpu and io."""
    some10 = {}
    full10 = {}
    for res in ("memory", "cpu", "io"):
        where = f"psi.{res}."
        sec = _section(psi, res, "psi.")
        for name in _PSI_AVG_FIELDS:
            _number(sec, name, where, hi=100.0)
        for name in _PSI_TOTAL_FIELDS:
            _number(sec, name, where)
        some10[res] = _number(sec, "some_avg10", where, hi=100.0)
        full10[res] = _number(sec, "full_avg10", where, hi=100.0)
    return some10, full10


def check_size(report: AgentReport, max_mib: float) -> None:
    """Reject a report whose memory sizes no guest of ``max_mib`` MiB could have.

    Values up to 2**64 parse, but a MemTotal beyond the VM's configured size
    (plus a little for what the balloon reports differently) is a broken or
    hostile agent: the caller treats the VM as having no agent data this period,
    so the value never reaches forecasts or credits.
    """
    if not max_mib > 0 or not math.isfinite(max_mib):
        return
    limit = max_mib * (1.0 + SIZE_SLACK) + 64.0
    for name in ("mem_total_mib", "mem_available_mib", "mem_free_mib"):
        value = getattr(report, name)
        if value > limit:
            raise AgentError(f"{name.replace('_mib', '')} {value:.6g} MiB is beyond the VM's "
                             f"{max_mib:.0f} MiB: ignoring this agent's data")


def load_key(path: str | Path) -> bytes:
    """The shared HMAC key from ``path`` (surrounding whitespace stripped).

    Same rules as the guest agent: a regular file, not accessible by group or
    other, at least 16 bytes. Raises :class:`AgentError` with the reason.
    """
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise AgentError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise AgentError(f"key file {path} is readable or writable by group/other "
                             f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}")
        key = path.read_bytes().strip()
    except OSError as e:
        raise AgentError(f"cannot read key file {path}: {e.strerror}") from None
    if len(key) < 16:
        raise AgentError(f"key file {path} holds fewer than 16 bytes of key")
    return key


# ---------------------------------------------------------------------------
# Unmet-demand signals


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x)) if math.isfinite(x) else NAN


def _delta(now: float, before: float) -> float:
    """Counter increase; NaN if unknown or if the counter went backwards (guest rebooted)."""
    d = now - before
    return d if math.isfinite(d) and d >= 0 else NAN


def _saturating(rate: float, half: float) -> float:
    return rate / (rate + half) if math.isfinite(rate) and rate >= 0 else NAN


def swap_fault_pressure(swapped_in_pages: float, major_faults: float, seconds: float) -> float:
    """Memory pressure in [0, 1) from swap-in and major-fault counts over ``seconds``; NaN = unknown.

    ``rate / (rate + half_rate)`` for each, the larger of the two. The guest's
    agent counters and the host's balloon statistics go through this one rule.
    """
    if not (math.isfinite(seconds) and seconds > 0):
        return NAN
    known = [x for x in (_saturating(swapped_in_pages / seconds, SWAPIN_HALF_RATE),
                         _saturating(major_faults / seconds, MAJFAULT_HALF_RATE)) if not math.isnan(x)]
    return max(known) if known else NAN


def signals_from(report: AgentReport, prev: AgentReport | None = None) -> dict[Resource, float]:
    """Unmet-demand signals in [0, 1] (NaN = not known) from two consecutive reports.

    - ``Resource.MEMORY``: PSI memory "some" avg10 / 100; without PSI, a
      saturating function of the swap-in and major-fault rates between ``prev``
      and ``report`` (``rate / (rate + half_rate)``, the larger of the two).
    - ``Resource.CPU``: share of the guest's CPU ticks that were stolen between
      ``prev`` and ``report``.
    - ``Resource.DISK``: PSI io "some" avg10 / 100.
    """
    memory = report.psi_memory_some / 100.0
    steal = NAN
    if prev is not None:
        if math.isnan(memory):
            dt = report.ts - prev.ts
            memory = swap_fault_pressure(_delta(report.swap_in, prev.swap_in),
                                         _delta(report.major_faults, prev.major_faults), dt)
        d_total = _delta(report.cpu_total_ticks, prev.cpu_total_ticks)
        d_steal = _delta(report.cpu_steal_ticks, prev.cpu_steal_ticks)
        if d_total > 0 and not math.isnan(d_steal):
            steal = d_steal / d_total
    return {
        Resource.CPU: _clip01(steal),
        Resource.MEMORY: _clip01(memory),
        Resource.DISK: _clip01(report.psi_io_some / 100.0),
    }


# ---------------------------------------------------------------------------
# Querying many agents at once


def _parse_endpoint(endpoint) -> tuple[int, Any]:
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


__all__ = [
    "AgentClient",
    "AgentError",
    "AgentReport",
    "StaleReply",
    "check_size",
    "load_key",
    "parse_reply",
    "signals_from",
    "swap_fault_pressure",
]
