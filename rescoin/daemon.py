"""The scheduler daemon: the control loop plus everything an operator needs around it.

- history CSV each period, daemon state saved atomically each period (a
  restart or a crash resumes credits and history);
- SIGTERM/SIGINT stop after the current period (flushing everything, and with
  ``restore_on_exit`` putting back every VM's original settings); SIGHUP
  reloads the configuration without losing history or credits;
- a root-only UNIX socket for ``rescoin status`` and an opt-in Prometheus
  endpoint.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
from dataclasses import replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import Config, ConfigError, load
from .guard import Guard
from .history import History
from .historycsv import HistoryWriter
from .loop import ControlLoop, Step, run_daemon
from .policies import make_policy
from .predict import load_model

log = logging.getLogger("rescoin.daemon")


# -- state ------------------------------------------------------------------------------
def save_state(path: str | Path, history: History, host: Any) -> None:
    """Write history (with credits) and the VMs' original settings atomically: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = history.snapshot()
    originals = {u: s.original for u, s in getattr(host, "vms", {}).items()}
    originals.update({u: o for u, o in getattr(host, "saved_originals", {}).items() if u not in originals})
    arrays["originals"] = np.array(json.dumps(originals, default=_json_default))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(type(x))


def load_state(path: str | Path, window: int) -> tuple[History, dict]:
    """History and original VM settings from a state file; a missing or damaged file starts fresh."""
    path = Path(path)
    if not path.exists():
        return History(window), {}
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        originals = json.loads(str(arrays.pop("originals", "{}")))
        history = History.restore(arrays)
        log.info("resumed from %s: %d periods of history for %d VMs", path, history.t, history.n)
        return history, originals
    except Exception as e:  # noqa: BLE001 - a damaged state file must not stop the daemon
        broken = path.with_suffix(path.suffix + ".broken")
        path.replace(broken)
        log.warning("state file %s is damaged (%s); moved to %s and starting fresh", path, e, broken)
        return History(window), {}


# -- the host -------------------------------------------------------------------------------
def build_host(cfg: Config, sim: dict | None = None):
    """The Host for ``cfg.daemon.uri``: a simulated one (sim:TRACE_DIR) or libvirt."""
    uri = cfg.daemon.uri
    if uri.startswith("sim:"):
        from .hosts.sim import SimHost
        from .traces import load_trace, sample_trace_path

        sim = sim or {}
        trace = load_trace(uri[4:] or sample_trace_path(), vms=sim.get("vms"), vm_offset=sim.get("vm_offset", 0),
                           days=sim.get("days"),
                           start_day=sim.get("start_day", 0.0))
        return SimHost(trace, overcommit=sim.get("overcommit", 1.5))
    from .agent import AgentClient, load_key
    from .hosts.libvirt import HostSettings, LibvirtHost

    h = cfg.host
    settings = HostSettings(reserve_mib=h.reserve_mib, reserve_cores=h.reserve_cores, disk_kibs=h.disk_kibs,
                            net_kibs=h.net_kibs, stats_period=h.stats_period,
                            memtune_soft_limit=h.memtune_soft_limit)
    key = load_key(cfg.agent.key_file) if cfg.agent.key_file else None
    actuator = None
    if h.actuator == "cgroup":
        from .hosts.cgroupfs import CgroupActuator

        actuator = CgroupActuator()
    pattern = cfg.daemon.vm_filter
    host = LibvirtHost(uri, settings=settings, agents=AgentClient(timeout=cfg.agent.timeout, key=key),
                       managed=lambda _u, name: fnmatch(name, pattern), actuator=actuator,
                       vm_config=cfg.for_vm)
    if h.memory_mib > 0:
        host.memory_limit_mib = h.memory_mib
    host.tcp_agents = dict(cfg.agent.tcp)
    return host


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None, sim: dict | None = None,
                 speed: float = 1.0, dry_run_host=None, overrides=None) -> None:
        self.cfg = cfg
        self.overrides = overrides or (lambda c: c)  # command-line options, kept across reloads
        self.config_path = config_path
        self.speed = speed
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.host = build_host(cfg, sim)
        if dry_run_host is not None:
            self.host = dry_run_host(self.host)
        window = 60
        self.history, originals = load_state(cfg.daemon.state_file, window) if cfg.daemon.state_file else (
            History(window), {})
        inner = getattr(self.host, "host", self.host)
        if hasattr(inner, "saved_originals"):
            inner.saved_originals = originals
        self.loop = self._make_loop(cfg, self.history)
        self.writer = HistoryWriter(cfg.daemon.history_dir, self.host.capacity.name) if cfg.daemon.history_dir else None
        self.status = None
        self.metrics = None
        self.last_step: Step | None = None
        self.periods = 0

    @property
    def period(self) -> float:
        trace_period = getattr(getattr(self.host, "host", self.host), "period", None)
        return float(trace_period) if self.cfg.daemon.uri.startswith("sim:") and trace_period else self.cfg.daemon.period

    def _make_loop(self, cfg: Config, history: History) -> ControlLoop:
        try:
            policy = make_policy(cfg.daemon.policy)
            predictor = load_model(cfg.daemon.model) if cfg.daemon.model else "auto"
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return ControlLoop(self.host, policy, predictor=predictor, guard=Guard(cfg.guard), history=history,
                           period=cfg.daemon.period)

    # -- signals ------------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_event.set())

    def reload(self) -> None:
        """Re-read the configuration; history, credits and the host connection stay."""
        self.reload_event.clear()
        try:
            new = self.overrides(load(self.config_path))
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        if new.daemon.uri != self.cfg.daemon.uri:
            log.warning("daemon.uri changed: it takes effect on restart, not on reload")
            new = replace(new, daemon=replace(new.daemon, uri=self.cfg.daemon.uri))
        try:
            loop = self._make_loop(new, self.history)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        inner = getattr(self.host, "host", self.host)
        if hasattr(inner, "vm_config"):
            inner.vm_config = new.for_vm
            pattern = new.daemon.vm_filter
            inner.managed = lambda _u, name: fnmatch(name, pattern)
        self.cfg, self.loop = new, loop
        log.info("configuration reloaded from %s (policy %s, period %.0f s)", self.config_path,
                 new.daemon.policy, new.daemon.period)

    # -- one period -------------------------------------------------------------------------------
    def step(self) -> Step | None:
        """One control step, after a pending reload (so the new configuration applies at once)."""
        if self.reload_event.is_set():
            self.reload()
        return self.loop.step()

    def _after_step(self, step: Step) -> None:
        self.last_step = step
        self.periods += 1
        if self.writer is not None:
            self.writer.write(step, self.history)
        if self.cfg.daemon.state_file:
            try:
                save_state(self.cfg.daemon.state_file, self.history, getattr(self.host, "host", self.host))
            except OSError as e:
                log.warning("could not save state to %s: %s", self.cfg.daemon.state_file, e)
        if self.status is not None:
            self.status.publish(self, step)
        if self.metrics is not None:
            self.metrics.update(self, step)
        failed = sum(step.result.failed.values())
        log.info("period %d: %d VMs, %d actions%s, %.1f ms", self.history.t, step.obs.n, step.result.total,
                 f", {failed} failed" if failed else "", step.seconds * 1e3)

    def run(self, max_periods: int | None = None) -> int:
        d = self.cfg.daemon
        if d.status_socket:
            from .status import StatusServer

            self.status = StatusServer(d.status_socket)
            self.status.start()
        if self.cfg.metrics.enabled:
            from .metrics import Metrics

            self.metrics = Metrics(self.cfg.metrics.listen)
        if hasattr(self.host, "start_events"):
            self.host.start_events()
        log.info("rescoin %s: policy %s on %s, period %.0f s", __version__, d.policy, d.uri, self.period)
        try:
            run_daemon(self, lambda: self.period, self.stop_event, self._after_step,
                       speed=self.speed, max_steps=max_periods)
        finally:
            self.close()
        log.info("stopped after %d periods", self.periods)
        return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.cfg.daemon.state_file and self.periods:
            try:
                save_state(self.cfg.daemon.state_file, self.history, getattr(self.host, "host", self.host))
            except OSError as e:
                log.warning("could not save state: %s", e)
        if self.cfg.daemon.restore_on_exit and hasattr(self.host, "restore"):
            log.info("restored the original settings of %d VMs", self.host.restore())
        if self.status is not None:
            self.status.close()
        if self.metrics is not None:
            self.metrics.close()
