"""The scheduler daemon: the control loop plus everything an operator needs around it.

- history CSV each period, daemon state saved atomically each period (a
  restart or a crash resumes credits and history; ``rescoin.ops.state``), each
  path locked so a second daemon on the same paths is refused; a history
  write error is said once and retried, never the end of the daemon;
- SIGTERM/SIGINT stop after the current period (flushing everything, and with
  ``restore_on_exit`` putting back every VM's original settings); SIGHUP
  reloads the configuration without losing history or credits;
- a root-only UNIX socket for ``rescoin status`` and an opt-in Prometheus
  endpoint.

On a real host the guard is always rescoin's (profile ``"rescoin"``), whatever
the policy: safety first, so a peer runs there as its ``"<peer>+guard"``
variant. Only a replayed trace (a ``sim:`` URI) uses the recipe's own profile,
as ``rescoin simulate`` does.
"""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace
from fnmatch import fnmatch
from typing import TYPE_CHECKING

import numpy as np

from rescoin import __version__
from rescoin.core.guard import Guard
from rescoin.core.history import History
from rescoin.core.loop import ControlLoop, HostUnavailableError, Step, run_daemon
from rescoin.core.predict import load_model
from rescoin.core.registry import build
from rescoin.core.resources import MEMORY
from rescoin.hosts.base import RESTORE_TIMEOUT, Host, HostSetup
from rescoin.hosts.dryrun import DryRunHost
from rescoin.offline.historycsv import HistoryWriter
from rescoin.ops.config import (
    RESTART_NEEDED,
    Config,
    ConfigError,
    DaemonConfig,
    agent_key,
    changed_keys,
    load,
    unmatched_vm_entries,
)
from rescoin.ops.paths import PathLock
from rescoin.ops.state import Saved, StateFile

if TYPE_CHECKING:  # imported where used: a daemon without them never loads them
    from rescoin.ops.metrics import Metrics
    from rescoin.ops.status import StatusServer

#: periods between two publications of the credit ledgers (one metadata write per VM)
LEDGER_EVERY = 10

log = logging.getLogger("rescoin.ops.daemon")


# -- the host -------------------------------------------------------------------------------
def build_host(cfg: Config, sim: dict | None = None, setup: HostSetup | None = None) -> Host:
    """The Host for ``cfg.daemon.uri``: a simulated one (sim:TRACE_DIR) or libvirt."""
    uri = cfg.daemon.uri
    if uri.startswith("sim:"):
        from rescoin.hosts.sim import SimHost
        from rescoin.offline.traces import load_trace, sample_trace_path

        sim = sim or {}
        trace = load_trace(uri[4:] or sample_trace_path(), vms=sim.get("vms"), vm_offset=sim.get("vm_offset", 0),
                           days=sim.get("days"),
                           start_day=sim.get("start_day", 0.0))
        return SimHost(trace, overcommit=sim.get("overcommit", 1.5))
    from rescoin.hosts.libvirt import LibvirtHost

    setup = setup or host_setup(cfg)
    return LibvirtHost(uri, config=setup.config, agents=setup.agents, managed=setup.managed,
                       vm_config=setup.vm_config, tcp_agents=setup.tcp_agents)


def host_setup(cfg: Config, old: HostSetup | None = None, old_cfg: Config | None = None) -> HostSetup:
    """What a host takes from ``cfg``, alike at start and on reload; an unchanged agent client is kept."""
    same_agents = old is not None and old_cfg is not None and (cfg.agent.timeout, cfg.agent.key_file) == (
        old_cfg.agent.timeout, old_cfg.agent.key_file)
    return HostSetup(config=cfg.host, agents=old.agents if same_agents and old is not None else _agents(cfg),
                     tcp_agents=dict(cfg.agent.tcp), vm_config=cfg.for_vm, managed=_managed(cfg))


def _agents(cfg: Config):
    from rescoin.hosts.agent import AgentClient

    return AgentClient(timeout=cfg.agent.timeout, key=agent_key(cfg))


def _managed(cfg: Config):
    pattern = cfg.daemon.vm_filter
    return lambda _uuid, name: fnmatch(name, pattern)


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None, sim: dict | None = None,
                 speed: float = 1.0, dry_run_host=None, overrides=None) -> None:
        self.cfg = cfg
        self.overrides = overrides or (lambda c: c)  # command-line options, kept across reloads
        self.config_path = config_path
        self.speed = speed
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.setup = host_setup(cfg)
        self.real_host: Host = build_host(cfg, sim, self.setup)  # the host this daemon built
        self.host: Host = self.real_host
        self.dry_run_host = dry_run_host or DryRunHost  # put on and taken off by reloads of daemon.dry_run
        self.host = self._host_for(cfg.daemon.dry_run)  # what the loop drives: real or wrapped
        self.applied_once = not cfg.daemon.dry_run  # only a daemon that changed VMs restores them on exit
        self.restore_timeout = RESTORE_TIMEOUT  # --restore-on-exit retries a hypervisor that does not answer
        self.state: StateFile | None = None
        self.writer: HistoryWriter | None = None
        self.status: StatusServer | None = None
        self.metrics: Metrics | None = None
        self._history_lock: PathLock | None = None
        try:
            saved = self._open_paths(cfg.daemon, window=60)
            self.history = saved.history
            self.loop = self._make_loop(cfg, self.history)
            self._serve_metrics(cfg)  # now, so a bad or busy address is reported before the daemon starts
        except BaseException:
            self._close_paths()  # nothing is left locked or bound by a daemon that did not start
            raise
        self.host.resume(saved.originals, saved.unrestored)  # a dry run keeps the pending restores waiting
        self.last_step: Step | None = None
        self.periods = 0
        self._vm_entries_checked = False

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
            from rescoin.ops.status import StatusServer

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
        own = self.host.period  # a replayed trace's
        return float(own) if self.cfg.daemon.uri.startswith("sim:") and own else self.cfg.daemon.period

    def _make_loop(self, cfg: Config, history: History, host=None) -> ControlLoop:
        try:
            parts = build(cfg.daemon.policy)
            if cfg.daemon.model:  # a model file feeds whichever policy runs
                parts = parts.with_predictor(load_model(cfg.daemon.model))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # a real host always gets rescoin's guard (a peer runs as "<peer>+guard"); a replay, the recipe's
        profile = parts.guard if cfg.daemon.uri.startswith("sim:") else "rescoin"
        return ControlLoop(host or self.host, parts, guard=Guard(cfg.guard, profile=profile), history=history,
                           period=cfg.daemon.period)

    # -- signals ------------------------------------------------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_event.set())

    def reload(self) -> None:
        """Re-read the configuration and apply every setting that can change live.

        History, credits and the host connection stay. The options in
        ``RESTART_NEEDED`` keep their running values and are named in the log
        line; a bad file (or a key file, model or reserve that cannot be used)
        is refused whole and the running configuration stays.
        """
        self.reload_event.clear()
        try:
            new = self.overrides(load(self.config_path))
            changed = changed_keys(self.cfg, new)
            restart = [k for k in changed if k in RESTART_NEEDED]  # all of them daemon.*
            kept = {k.removeprefix("daemon."): getattr(self.cfg.daemon, k.removeprefix("daemon.")) for k in restart}
            new = replace(new, daemon=replace(new.daemon, **kept))
            host = self._host_for(new.daemon.dry_run)
            loop = self._make_loop(new, self.history, host)
            self._reconfigure_host(new, host)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        except HostUnavailableError as e:  # the new reserve cannot be checked now: try again next period
            log.warning("reload postponed, keeping the running configuration: %s", e)
            self.reload_event.set()
            return
        if not self._serve_metrics(new, starting=False):
            new = replace(new, metrics=self.cfg.metrics)
        if host is not self.host:
            log.warning("dry run %s: actions are %s from now on", "on" if new.daemon.dry_run else "off",
                        "planned, not applied" if new.daemon.dry_run else "applied")
        self._use(host)
        self.cfg, self.loop = new, loop
        self.applied_once |= not new.daemon.dry_run
        self._vm_entries_checked = False  # new [vm] entries: checked against the VMs at the next period
        applied = [k for k in changed if k not in restart]
        log.info("configuration reloaded from %s (policy %s, period %g s%s)%s", self.config_path,
                 new.daemon.policy, new.daemon.period, f"; changed: {', '.join(applied)}" if applied else "",
                 f"; restart needed for: {', '.join(restart)}" if restart else "")

    def _host_for(self, dry_run: bool) -> Host:
        """The host the loop drives: the real one, or the real one wrapped so that nothing is applied."""
        if not dry_run:
            return self.real_host
        return self.host if self.host is not self.real_host else self.dry_run_host(self.real_host)

    def _use(self, host: Host) -> None:
        """Drive ``host`` from now on, handing it what the state file keeps (a dry run holds pending restores)."""
        if host is not self.host:
            host.resume(self.host.originals(), self.host.unrestored())
            self.host = host

    def _reconfigure_host(self, cfg: Config, host: Host) -> None:
        """Hand ``[host]``, ``[agent]``, ``vm_filter`` and the per-VM settings to the host; all or nothing."""
        old, new = self.setup, host_setup(cfg, self.setup, self.cfg)
        host.reconfigure(new)
        try:
            self.check_capacity(cfg, host)
        except BaseException:
            host.reconfigure(old)
            raise
        self.setup = new

    def check_capacity(self, cfg: Config | None = None, host: Host | None = None) -> None:
        """Connect and refuse host settings that leave the guests nothing (a reserve above the host's size)."""
        cfg = cfg or self.cfg
        cap = (host or self.host).capacity  # connects: a wrong URI raises here
        if cfg.daemon.uri.startswith("sim:"):
            return  # a replay's capacity comes from its trace, not from [host]
        if not cap.capacity[MEMORY] > 0:
            raise ConfigError(f"host.reserve_mib = {cfg.host.reserve_mib:g} leaves no memory for the guests: "
                              f"it must be below the host's memory")
        if cfg.host.reserve_cores >= cap.pcpus:
            raise ConfigError(f"host.reserve_cores = {cfg.host.reserve_cores:g} leaves no CPU for the guests: "
                              f"the host has {cap.pcpus}")

    def _serve_metrics(self, cfg: Config, starting: bool = True) -> bool:
        """Start, move or stop the metrics endpoint for ``cfg``; at start a failure raises, on reload it is logged."""
        m = cfg.metrics
        try:
            if m.enabled and self.metrics is None:
                from rescoin.ops.metrics import Metrics

                self.metrics = Metrics(m.listen)
            elif m.enabled and self.metrics is not None:
                self.metrics.serve(m.listen)
            elif self.metrics is not None:
                self.metrics.close()
                self.metrics = None
        except ConfigError as e:
            if starting:
                raise
            log.error("metrics endpoint unchanged: %s", e)
            return False
        return True

    def _warn_unmatched_vm_entries(self, step: Step) -> None:
        """Once per configuration: name the ``[vm."KEY"]`` entries that match no VM the host knows."""
        self._vm_entries_checked = True
        ids = list(zip(step.obs.vms.uuids.tolist(), step.obs.vms.names.tolist(), strict=False)) + self.host.known_vms()
        for key in unmatched_vm_entries(self.cfg, ids):
            log.warning('[vm."%s"] in %s matches no VM on %s (neither a name nor a UUID); check the spelling',
                        key, self.config_path or "the configuration", self.cfg.daemon.uri)

    # -- one period -------------------------------------------------------------------------------
    def step(self) -> Step | None:
        """One control step, after a pending reload (so the new configuration applies at once)."""
        if self.reload_event.is_set():
            self.reload()
        step = self.loop.step()
        if step is not None and not self._vm_entries_checked:
            self._warn_unmatched_vm_entries(step)
        return step

    def _after_step(self, step: Step) -> None:
        self.last_step = step
        self.periods += 1
        if self.writer is not None:
            self.writer.try_write(step, self.history)  # a full disk is said once; the loop goes on
        self._save_state()
        self._publish_ledger(step)
        if self.status is not None:
            self.status.publish(self, step)
        if self.metrics is not None:
            self.metrics.update(self, step)
        failed = sum(step.result.failed.values())
        log.info("period %d: %d VMs, %d actions%s, %.1f ms", self.history.t, step.obs.n, step.result.total,
                 f", {failed} failed" if failed else "", step.seconds * 1e3)

    def run(self, max_periods: int | None = None) -> int:
        d = self.cfg.daemon
        self.host.start()
        log.info("rescoin %s: policy %s on %s, period %.0f s", __version__, d.policy, d.uri, self.period)
        try:
            run_daemon(self, lambda: self.period, self.stop_event, self._after_step,
                       speed=self.speed, max_steps=max_periods)
        finally:
            self.close()
        log.info("stopped after %d periods", self.periods)
        return 0

    def _publish_ledger(self, step: Step) -> None:
        """Every ``LEDGER_EVERY`` periods, each VM's credit ledger goes to its host, to travel with it."""
        ledger = step.allocation.diagnostics.get("ledger")
        if ledger is None or self.periods % LEDGER_EVERY or not np.isfinite(ledger).any():
            return
        self.host.publish_ledger(step.obs.vms.uuids, ledger)

    def _save_state(self) -> None:
        if self.state is not None:
            try:
                self.state.save(self.history, self.host.originals(), self.host.unrestored())
            except OSError as e:
                log.warning("could not save state to %s: %s", self.state.path, e)

    def close(self) -> None:
        """Flush history, restore the VMs if asked, save the state, release the paths. Never raises."""
        if self.writer is not None:
            self.writer.close()
        pending = self.host.unrestored()
        if self.cfg.daemon.restore_on_exit and self.applied_once:
            self._use(self.real_host)  # what a live run applied is put back, even after a reload to dry run
            try:
                log.info("restored the original settings of %d VMs", self.host.restore(timeout=self.restore_timeout))
            except Exception:  # noqa: BLE001 - the state must still be saved
                log.exception("restoring the VMs' original settings failed")
        if self.periods or pending != self.host.unrestored():
            self._save_state()  # after restore: what it could not restore is saved for the next start
        self._close_paths()
        if self.metrics is not None:
            self.metrics.close()
