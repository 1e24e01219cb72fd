"""``rescoin status``: what the running daemon sees and does, read over a root-only UNIX socket.

The daemon publishes one JSON snapshot per period; each client connection
gets the latest snapshot and is closed. The socket is mode 0600 (root only);
a directory rescoin creates for it is 0700, an existing one is left as it is.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from rescoin.core.resources import RESOURCES, UNITS
from rescoin.ops.paths import PathError, PathLock, reason

log = logging.getLogger("rescoin.ops.status")

_MAX_SUN_PATH = 107  # sockaddr_un.sun_path is 108 bytes on Linux, with the terminating NUL


def _num(x: Any) -> float | None:
    x = float(x)
    return round(x, 4) if np.isfinite(x) else None


def snapshot(daemon, step) -> dict:
    """Per VM: usage, forecast, allocation, credit, last actions, agent health; per host: capacity, contention."""
    obs, h = step.obs, daemon.history
    cap = obs.host.capacity
    credit = step.allocation.diagnostics["combined_credit"]  # the policy's own; NaN (None) without credits
    fc = step.forecast.value if step.forecast is not None else np.full_like(obs.usage, np.nan)
    done = step.result.actions  # None: the host does not say (simulated): every planned change took effect
    vms = []
    for i in range(obs.n):
        uuid = str(obs.vms.uuids[i])
        vms.append({
            "name": str(obs.vms.names[i]), "uuid": uuid,
            "usage": {r.label: _num(obs.usage[i, r]) for r in RESOURCES},
            "forecast": {r.label: _num(fc[i, r]) for r in RESOURCES},
            "allocation": {r.label: _num(step.allocation.amount[i, r]) for r in RESOURCES},
            "balloon_mib": _num(step.plan.controls.balloon[i]), "cpu_shares": _num(step.plan.controls.shares[i]),
            "credit": _num(credit[i]),
            "last_actions": [f"{k}{'' if ok else ' FAILED'}" for k, ok in done.get(uuid, [])] if done is not None
            else [k for k, m in step.plan.changed.items() if k != "pin" and m[i]],
            "agent": obs.health[i] if obs.health is not None else "simulated",
        })
    demand = np.nansum(fc, axis=0)
    return {
        "version": 1, "ts": obs.ts, "period": h.t, "policy": daemon.cfg.daemon.policy, "uri": daemon.cfg.daemon.uri,
        "step_ms": round(step.seconds * 1e3, 2),
        "host": {"capacity": {r.label: _num(cap[r]) for r in RESOURCES}, "pcpus": obs.host.pcpus,
                 "reserve_mib": daemon.cfg.host.reserve_mib,
                 "forecast_demand": {r.label: _num(demand[r]) for r in RESOURCES},
                 "contention": {r.label: bool(np.isfinite(cap[r]) and demand[r] > cap[r]) for r in RESOURCES}},
        "actions": {"applied": step.result.applied, "failed": step.result.failed, "errors": step.result.errors[-10:]},
        "vms": vms,
    }


class StatusServer:
    """Serves the latest snapshot on a UNIX socket (mode 0600) that only this process removes.

    A missing parent directory is created 0700; an existing one (``/run``,
    ``/tmp``) keeps its mode. A path that holds anything but a stale socket is
    refused, never unlinked.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._data = b'{"version": 1, "starting": true}\n'
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None  # the socket this process bound
        self._lock: PathLock | None = None  # on PATH.lock: one daemon per socket
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def start(self) -> None:
        """Lock and bind the socket, or raise PathError saying why the path cannot be used."""
        where = f"status socket {self.path}"
        if len(os.fsencode(self.path)) > _MAX_SUN_PATH:
            raise PathError(f"{where}: the path is longer than a UNIX socket allows ({_MAX_SUN_PATH} bytes)")
        parent = self.path.parent
        if not parent.is_dir():
            if parent.exists():
                raise PathError(f"{where}: {parent} is not a directory")
            try:
                parent.mkdir(parents=True, mode=0o700)
                os.chmod(parent, 0o700)  # ours, just made: root only, whatever the umask
            except OSError as e:
                raise PathError(f"{where}: cannot create {parent}: {reason(e)}") from None
        lock = self._lock = PathLock(self.path.with_name(self.path.name + ".lock"), self.path).acquire()
        try:
            self._bind(where)
        except BaseException:
            lock.release()
            raise
        self._thread = threading.Thread(target=self._serve, name="status", daemon=True)
        self._thread.start()

    def _bind(self, where: str) -> None:
        self._remove_stale(where)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window in which others may connect
        try:
            sock.bind(str(self.path))
        except OSError as e:
            sock.close()
            raise PathError(f"{where}: cannot bind: {reason(e)}") from None
        finally:
            os.umask(old)
        st = os.stat(self.path, follow_symlinks=False)
        self._inode = (st.st_dev, st.st_ino)
        sock.listen(8)
        sock.settimeout(0.5)
        self._sock = sock

    def _remove_stale(self, where: str) -> None:
        """Unlink a socket left by a dead daemon; refuse anything else, or a socket someone answers on."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
            raise PathError(f"{where} exists and is {kind}; rescoin will not remove it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # nobody listens: a socket left by a daemon that died
                return
        raise PathError(f"{where} is in use by another process; stop it or give another path")

    def publish(self, daemon, step) -> None:
        try:
            self._data = (json.dumps(snapshot(daemon, step)) + "\n").encode()
        except Exception:  # noqa: BLE001 - status must never break the loop
            log.exception("could not build the status snapshot")

    def _serve(self) -> None:
        assert self._sock is not None  # bound in start(), before this thread runs
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                try:
                    conn.settimeout(1.0)
                    conn.sendall(self._data)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop serving and remove the socket, only if it is still the one this process bound."""
        self._closed.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._inode is not None:
            try:
                st = os.stat(self.path, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == self._inode:
                    self.path.unlink()
            except OSError:
                pass
            self._inode = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def query(path: str | Path, timeout: float = 2.0) -> dict:
    """The daemon's latest snapshot; raises OSError/ValueError with a reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n") and time.monotonic() < deadline:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def render(snap: dict, width: int | None = None):
    """The snapshot as rich renderables that fit ``width`` (default: stdout's, 80 for a pipe).

    A host line, forecast demand against capacity with units, the per-VM table
    (units under the headers) and this period's actions as a table.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from rescoin.view import Col, fit_tables

    if snap.get("starting"):
        return Table(title="rescoin is starting: no period finished yet")
    host = snap["host"]
    cap, dem, cont = host["capacity"], host["forecast_demand"], host["contention"]
    units = {r.label: UNITS[r] for r in RESOURCES}
    head = (f"[bold]rescoin[/] {snap['policy']} on {snap['uri']}  period {snap['period']}  "
            f"step {snap['step_ms']} ms  reserve {host['reserve_mib']:.0f} MiB")
    res = "forecast demand / capacity:  " + "  ".join(
        f"{k} {dem[k] or 0:.{1 if k == 'cpu' else 0}f}/{cap[k] or 0:.0f} {units.get(k, '')}"
        f"{' [red]CONTENDED[/]' if cont[k] else ''}"
        for k in cap)
    cols = [Col("VM", "left"), Col("cpu use\ncores"), Col("cpu fc\ncores"), Col("cpu alloc\ncores"),
            Col("mem use\nMiB"), Col("mem fc\nMiB"), Col("balloon\nMiB"), Col("credit"),
            Col("last actions", "left", wrap=24), Col("agent", "left", wrap=24)]

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    rows = [[vm["name"], f(vm["usage"]["cpu"]), f(vm["forecast"]["cpu"]), f(vm["allocation"]["cpu"]),
             f(vm["usage"]["memory"], "{:.0f}"), f(vm["forecast"]["memory"], "{:.0f}"),
             f(vm["balloon_mib"], "{:.0f}"), f(vm["credit"], "{:+.3f}"),
             ", ".join(vm["last_actions"]) or "-", vm["agent"]]
            for vm in sorted(snap["vms"], key=lambda v: -(v["usage"]["cpu"] or 0))]
    parts: list = [head, res, *fit_tables(None, cols, rows, width)]
    acts = snap["actions"]
    applied, failed = acts.get("applied") or {}, acts.get("failed") or {}
    kinds = sorted(set(applied) | set(failed))
    if kinds:
        parts += fit_tables("actions this period", [Col("action", "left"), Col("applied"), Col("failed")],
                            [[k, str(applied.get(k, 0)), str(failed.get(k, 0))] for k in kinds], width)
    else:
        parts.append("actions this period: none")
    parts += [Text.assemble(("error: ", "red"), str(e)) for e in acts.get("errors") or []]
    return Group(*parts)
