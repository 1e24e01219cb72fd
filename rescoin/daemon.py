"""The scheduler daemon: the control loop plus everything an operator needs around it.

- history CSV each period, daemon state saved atomically each period (a
  restart or a crash resumes credits and history; ``rescoin.state``), each
  path locked so a second daemon on the same paths is refused; a history
  write error is said once and retried, never the end of the daemon;
- SIGTERM/SIGINT stop after the current period (flushing everything, and with
  ``restore_on_exit`` putting back every VM's original settings); SIGHUP
  reloads the configuration without losing history or credits;
- a root-only UNIX socket for ``rescoin status`` and an opt-in Prometheus
  endpoint.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace
from fnmatch import fnmatch

from . import __version__
from .config import Config, ConfigError, DaemonConfig, load
from .guard import Guard
from .history import History
from .historycsv import HistoryWriter
from .hosts.restore import RESTORE_TIMEOUT
from .loop import ControlLoop, Step, run_daemon
from .paths import PathLock
from .policies import make_policy
from .predict import load_model
from .state import Saved, StateFile

log = logging.getLogger("rescoin.daemon")


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
        self.restore_timeout = RESTORE_TIMEOUT  # --restore-on-exit retries a hypervisor that does not answer
        self.state: StateFile | None = None
        self.writer: HistoryWriter | None = None
        self.status = None
        self.metrics = None
        self._history_lock: PathLock | None = None
        try:
            saved = self._open_paths(cfg.daemon, window=60)
            self.history = saved.history
            self.loop = self._make_loop(cfg, self.history)
        except BaseException:
            self._close_paths()  # nothing is left locked or bound by a daemon that did not start
            raise
        inner = getattr(self.host, "host", self.host)
        if hasattr(inner, "saved_originals"):
            inner.saved_originals = saved.originals
            inner.pending_restore = saved.unrestored
            inner.restore_at_start = not cfg.daemon.dry_run  # a dry run changes nothing, not even that
        self.last_step: Step | None = None
        self.periods = 0

    def _open_paths(self, d: DaemonConfig, window: int) -> Saved:
        """State file, history directory and status socket, each checked and locked; PathError if unusable.

        Every path is checked before the state is loaded, so a bad one is the only line printed.
        """
        if d.state_file:
            self.state = StateFile(d.state_file).open()
        if d.history_dir:
            self.writer = HistoryWriter(d.history_dir, self.host.capacity.name)
            self._history_lock = PathLock(self.writer.dir / "rescoin.lock", self.writer.dir).acquire()
        if d.status_socket:
            from .status import StatusServer

            self.status = StatusServer(d.status_socket)
            self.status.start()
        return self.state.load(window) if self.state is not None else Saved(History(window))

    def _close_paths(self) -> None:
        """Stop serving status and release every lock; the files stay as they are."""
        if self.status is not None:
            self.status.close()
        if self._history_lock is not None:
            self._history_lock.release()
        if self.state is not None:
            self.state.close()

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
            self.writer.try_write(step, self.history)  # a full disk is said once; the loop goes on
        self._save_state()
        if self.status is not None:
            self.status.publish(self, step)
        if self.metrics is not None:
            self.metrics.update(self, step)
        failed = sum(step.result.failed.values())
        log.info("period %d: %d VMs, %d actions%s, %.1f ms", self.history.t, step.obs.n, step.result.total,
                 f", {failed} failed" if failed else "", step.seconds * 1e3)

    def run(self, max_periods: int | None = None) -> int:
        d = self.cfg.daemon
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

    def _save_state(self) -> None:
        if self.state is not None:
            try:
                self.state.save(self.history, getattr(self.host, "host", self.host))
            except OSError as e:
                log.warning("could not save state to %s: %s", self.state.path, e)

    def close(self) -> None:
        """Flush history, restore the VMs if asked, save the state, release the paths. Never raises."""
        if self.writer is not None:
            self.writer.close()
        inner = getattr(self.host, "host", self.host)
        pending = set(getattr(inner, "pending_restore", ()))
        if self.cfg.daemon.restore_on_exit and hasattr(self.host, "restore"):
            try:
                log.info("restored the original settings of %d VMs", self.host.restore(timeout=self.restore_timeout))
            except Exception:  # noqa: BLE001 - the state must still be saved
                log.exception("restoring the VMs' original settings failed")
        if self.periods or pending != set(getattr(inner, "pending_restore", ())):
            self._save_state()  # after restore: what it could not restore is saved for the next start
        self._close_paths()
        if self.metrics is not None:
            self.metrics.close()
