"""Parsing and checking one agent reply (untrusted input), and the shared key."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import stat
import time
from dataclasses import dataclass
from pathlib import Path

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
