"""The libvirt connection: opened on demand, re-opened with backoff, and the one helper for libvirt errors.

Every libvirt call goes through ``Libvirt.call``, the one place that decides
what an error means: a vanished VM is dropped for the period, a dead
connection is closed (the next ``connect`` re-opens it, with backoff), a cgroup
write the kernel refused is an ``OSError``, anything else is logged with the
VM and the call. Nothing raises to the loop but ``HostUnavailableError``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from rescoin.hosts.base import HostUnavailableError

log = logging.getLogger("rescoin.libvirt")

HostUnavailable = HostUnavailableError  # one exception for every host; the daemon retries


def libvirt_module():
    """The ``libvirt`` module, or HostUnavailable saying how to install it."""
    try:
        import libvirt  # noqa: PLC0415 - optional dependency, needed only for real hosts
    except ImportError:  # pragma: no cover - depends on the machine
        raise HostUnavailable("libvirt-python is not installed: run scripts/setup-host or "
                              "`pip install libvirt-python`") from None
    return libvirt


class Libvirt:
    """The connection and the one helper that handles libvirt errors."""

    def __init__(self, uri: str, backoff_max: float = 30.0) -> None:
        self.uri = uri
        self.conn = None
        self.backoff = 1.0
        self.backoff_max = backoff_max
        self._next_try = 0.0
        self.calls: Counter[str] = Counter()  # per period, by call name
        self.errors: Counter[str] = Counter()  # since the start, by call name
        self.connected_once = False

    def connect(self) -> Any:
        try:
            lv = libvirt_module()
        except HostUnavailable as e:
            raise HostUnavailable(f"cannot connect to {self.uri}: {e}") from None
        if self.conn is not None:
            try:
                if self.conn.isAlive():
                    return self.conn
            except lv.libvirtError:
                pass
            log.warning("lost the connection to %s; reconnecting", self.uri)
            self.close()
        now = time.monotonic()
        if now < self._next_try:
            raise HostUnavailable(f"{self.uri} unavailable; next attempt in {self._next_try - now:.0f} s")
        try:
            self.conn = lv.open(self.uri)
        except lv.libvirtError as e:
            self._next_try = now + self.backoff
            self.backoff = min(self.backoff * 2, self.backoff_max)
            raise HostUnavailable(f"cannot connect to {self.uri}: {e}; retrying with backoff") from None
        if self.connected_once:
            log.warning("reconnected to %s", self.uri)
        self.connected_once = True
        self.backoff = 1.0
        return self.conn

    def connect_now(self) -> Any:
        """``connect`` without waiting out the per-period backoff (a restore keeps its own pace)."""
        self._next_try = 0.0
        return self.connect()

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):  # closing a dead connection may fail any way
                self.conn.close()
        self.conn = None

    def call(self, what: str, vm: str | None, fn: Callable, *args, default=None):
        """Run one libvirt call; returns ``(ok, value)``. Never raises a libvirt error."""
        lv = libvirt_module()
        self.calls[what] += 1
        try:
            return True, fn(*args)
        except OSError as e:  # a cgroup file the kernel refused, or a VM's cgroup that vanished
            self.errors[what] += 1
            log.warning("%s on VM %s failed: %s", what, vm, e)
            return False, default
        except lv.libvirtError as e:
            code = e.get_error_code()
            self.errors[what] += 1
            if code in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID):
                log.info("%s: VM %s is gone or not running (%s)", what, vm, e.get_error_message())
            elif code in (lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_RPC, lv.VIR_ERR_NO_CONNECT,
                          lv.VIR_ERR_INTERNAL_ERROR) and not self.alive():
                log.warning("%s failed (%s): connection to %s lost", what, e.get_error_message(), self.uri)
                self.close()
            else:
                log.warning("%s on VM %s failed: %s", what, vm, e.get_error_message())
            return False, default

    def alive(self) -> bool:
        try:
            return bool(self.conn is not None and self.conn.isAlive())
        except Exception:  # noqa: BLE001
            return False


class ErrorCounts:
    """The failed calls of ``lv`` since the last ``new()``: what each Observation and ApplyResult reports."""

    def __init__(self, lv: Libvirt) -> None:
        self.lv = lv
        self._seen: Counter[str] = Counter()

    def new(self) -> dict[str, int]:
        fresh = self.lv.errors - self._seen
        self._seen = Counter(self.lv.errors)
        return dict(fresh)
