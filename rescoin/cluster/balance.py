"""The cluster balancer on real hosts: plan, apply an approved plan, run continuously, pick a host for a new VM.

A round is: collect a ``ClusterState`` from every host, ask the balancer for
moves, and (unless dry-run) carry each out through the ``Executor``, which
re-checks its preconditions on a fresh state first. The balancer is told
every outcome (``moved``) so it keeps its history. Nothing here parses
arguments or prints; ``rescoin.cli.balance`` does.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from rescoin.cluster.collect import Collector
from rescoin.cluster.migrate import Executor, Hosts, MigrationError, Outcome, room_check, rules_check
from rescoin.cluster.model import Balancer, ClusterState, Move, Rules
from rescoin.errors import RescoinError
from rescoin.hosts.libvirt.connection import HostUnavailable, Libvirt
from rescoin.ops.metrics import ClusterMetrics

log = logging.getLogger("rescoin.cluster.balance")


class BalanceError(RescoinError):
    """A cluster balancing problem the operator can fix."""


def balancer(name: str, **options) -> Balancer:
    """The balancer ``name`` from ``rescoin.cluster.balancers`` (c-sim's registry)."""
    try:
        from rescoin.cluster.balancers import build  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise BalanceError(f"balancer {name!r}: rescoin.cluster.balancers is not on this branch") from None
    try:
        return build(name, **options)
    except (KeyError, ValueError) as e:
        raise BalanceError(f"balancer {name!r}: {e}") from None


def discover(uris: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Each host's name (its daemon's hostname) -> URI, and -> the URI a peer daemon migrates to.

    A remote URI (``qemu+tcp://``, ``qemu+ssh://``, ``qemu+tls://``) is its own peer
    URI; a local one (``qemu:///``, ``qemu+unix://``) is reached by peers as
    ``qemu+tcp://<hostname>/system``.
    """
    names: dict[str, str] = {}
    peers: dict[str, str] = {}
    for uri in uris:
        lv = Libvirt(uri)
        try:
            conn = lv.connect()
            ok, hostname = lv.call("getHostname", None, conn.getHostname)
        except HostUnavailable as e:
            raise BalanceError(str(e)) from None
        finally:
            lv.close()
        if not ok:
            raise BalanceError(f"cannot read the host name of {uri}")
        if hostname in names:
            raise BalanceError(f"{uri} and {names[hostname]} are the same host ({hostname})")
        names[hostname] = uri
        remote = urlsplit(uri).netloc and "+unix" not in uri
        peers[hostname] = uri if remote else f"qemu+tcp://{hostname}/system"
    return names, peers


@dataclass
class Cluster:
    """The hosts, the collector, the executor, the rules and the metrics of one balancing session."""

    collector: Collector
    executor: Executor
    rules: Rules
    metrics: ClusterMetrics | None = None

    @classmethod
    def open(cls, uris: list[str], rules: Rules, capacity: dict[str, tuple[float, float]] | None = None,
             metrics: ClusterMetrics | None = None, shared_disks: bool = True) -> Cluster:
        names, peers = discover(uris)
        collector = Collector(names, capacity=dict(capacity or {}), reserve_mib=dict(rules.reserve_mib))
        return cls(collector, Executor(Hosts(names, peers), shared_disks=shared_disks), rules, metrics)

    def close(self) -> None:
        self.collector.close()
        self.executor.hosts.close()
        if self.metrics is not None:
            self.metrics.close()

    def state(self) -> ClusterState:
        return self.collector.collect()

    def plan(self, bal: Balancer, state: ClusterState | None = None) -> tuple[ClusterState, list[Move]]:
        """The moves ``bal`` proposes now (changes nothing)."""
        state = state or self.state()
        moves = bal.plan(state, self.rules)
        if self.metrics is not None:
            self.metrics.rounds.inc()
            self.metrics.planned.inc(len(moves))
        return state, moves

    def carry_out(self, moves: list[Move], bal: Balancer | None = None) -> list[Outcome]:
        """Each move on a fresh state (preconditions re-checked), the balancer told of each outcome."""
        outcomes = []
        for move in moves:
            state = self.state()
            vm = next((v for v in state.vms if v.uuid == move.vm), None)
            try:
                out = self.executor.migrate(move, state, self.rules, credits=vm.credits if vm else ())
            except MigrationError as e:
                out = Outcome(move, "precondition", str(e))
            if self.metrics is not None:
                self.metrics.migrated(out.outcome, out.seconds)
            if bal is not None:
                bal.moved(move, out.ok, state.now)
            outcomes.append(out)
        return outcomes

    def run(self, bal: Balancer, interval: float, *, once: bool = False, dry_run: bool = False,
            stop: threading.Event | None = None) -> list[Outcome]:
        """Balance every ``interval`` s until ``stop`` is set (or one round with ``once``)."""
        stop = stop or threading.Event()
        done: list[Outcome] = []
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                _state, moves = self.plan(bal)
            except HostUnavailable as e:  # a host that is down this round: try again next round
                log.warning("balance round skipped: %s", e)
                moves = []
            for m in moves:
                log.info("%s %s %s -> %s: %s", "would move" if dry_run else "moving", m.name, m.source,
                         m.target, m.reason)
            if moves and not dry_run:
                done += self.carry_out(moves, bal)
            if once:
                break
            stop.wait(max(0.0, interval - (time.monotonic() - t0)))
        return done


def plan_json(state: ClusterState, moves: list[Move]) -> dict:
    """A plan to review and approve: the moves and the hosts they were planned on."""
    return {"version": 1, "planned_at": time.time(),
            "hosts": {h.name: h.uri for h in state.hosts}, "moves": [asdict(m) for m in moves]}


def load_plan(path: str | Path) -> list[Move]:
    """The moves of a plan file written by ``plan --json``."""
    try:
        data = json.loads(Path(path).read_text())
        return [Move(**m) for m in data["moves"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BalanceError(f"cannot read plan {path}: {e}") from None


def best_node(state: ClusterState, rules: Rules, vcpus: int, memory_mib: float) -> tuple[str, str]:
    """The host a new VM should start on: it fits after reserves, then the most memory left as a share."""
    probe_uuid = "00000000-0000-0000-0000-000000000000"
    best: tuple[float, str, str] | None = None
    refusals = []
    from rescoin.cluster.model import VmInfo

    vm = VmInfo(probe_uuid, "(new VM)", "", vcpus, memory_mib)
    probe = replace(state, vms=(*state.vms, vm))
    for h in state.hosts:
        move = Move(probe_uuid, vm.name, "", h.name, "best-node")
        if why := room_check(move, probe, rules) or rules_check(move, probe, rules):
            refusals.append(why)
            continue
        used = sum(v.memory_mib for v in state.on(h.name)) + memory_mib
        cpu = sum(v.cpu_forecast for v in state.on(h.name)) + vcpus
        free_share = 1.0 - used / max(h.memory_mib - max(h.reserve_mib, rules.reserve_mib.get(h.name, 0)), 1.0)
        score = free_share - 0.5 * cpu / max(h.cpus, 1.0)
        if best is None or score > best[0]:
            best = (score, h.name, f"{free_share:.0%} of its memory left after the VM")
    if best is None:
        raise BalanceError("no host can take the VM: " + "; ".join(refusals or ["no hosts"]))
    return best[1], best[2]


def plan_table(state: ClusterState, moves: list[Move], width: int = 80) -> str:
    """The plan as an 80-column table with a legend."""
    lines = [f"{'VM':<16} {'FROM':<12} {'TO':<12} {'SCORE':>6} {'GAIN':>6} {'COST':>6}  REASON"]
    for m in moves:
        row = f"{m.name[:16]:<16} {m.source[:12]:<12} {m.target[:12]:<12} {m.score:>6.2f} {m.gain:>6.2f} " \
              f"{m.cost:>6.2f}  "
        lines.append(row + m.reason[:max(0, width - len(row))])
    if not moves:
        lines.append("(no moves: the cluster is balanced as far as the balancer can tell)")
    lines.append("")
    lines.append("SCORE: the balancer's score of the target; GAIN, COST: its expected improvement")
    lines.append("and the migration's cost (its unit, see REASON). Nothing was changed.")
    for h in state.hosts:
        lines.append(f"{h.name[:12]:<12} {len(state.on(h.name))} VMs, {h.memory_mib:.0f} MiB, "
                     f"contention {h.contention:.2f}")
    return "\n".join(lines)
