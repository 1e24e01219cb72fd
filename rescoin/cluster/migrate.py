"""Carry out one ``Move`` as a libvirt live migration, with its preconditions and its result checked.

Preconditions (re-checked right before each move, never trusted from the
plan): both hosts reachable, the VM on the source, running, not already on the
target, room on the target after its reserve, and the rules still allowing
the target. Then ``migrateToURI3`` peer-to-peer to the target's tcp URI, and
the result read back from both daemons. The VM's credits travel in its
domain metadata (written before the move, read back on the target).

Every libvirt call goes through ``Libvirt.call`` (rescoin.hosts.libvirt), the
one place that decides what a libvirt error means.
"""
from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from rescoin.cluster.model import ClusterState, Move, Rules
from rescoin.cluster.rules import allowed_targets
from rescoin.errors import RescoinError
from rescoin.hosts.libvirt.connection import HostUnavailable, Libvirt, libvirt_module
from rescoin.hosts.libvirt.ledger import CREDITS_NS, parse_credits, read_credits, write_credits

__all__ = ["CREDITS_NS", "Executor", "Hosts", "MigrationError", "Outcome", "parse_credits", "read_credits",
           "write_credits"]

log = logging.getLogger("rescoin.cluster.migrate")

# outcome -> counted in rescoin_migrations_total{outcome=...}
OUTCOMES = ("ok", "refused", "failed", "precondition", "unverified")


class MigrationError(RescoinError):
    """A move that could not be carried out (said in one line)."""


@dataclass(frozen=True)
class Outcome:
    """What became of one move: ``ok`` or why not, and how long it took."""

    move: Move
    outcome: str  # one of OUTCOMES
    detail: str = ""
    seconds: float = 0.0
    downtime_ms: float | None = None  # the target's completed-job figure, when libvirt gives it

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class Hosts:
    """The libvirt connections of the cluster, by host name; ``peer`` is how the daemons reach each other."""

    uris: dict[str, str]  # host -> URI rescoin connects to
    peer: dict[str, str] = field(default_factory=dict)  # host -> URI the source daemon migrates to
    conns: dict[str, Libvirt] = field(default_factory=dict)

    def lv(self, host: str) -> Libvirt:
        """The connection to ``host`` (opened on first use)."""
        if host not in self.uris:
            raise MigrationError(f"unknown host {host!r} (hosts: {', '.join(self.uris)})")
        if host not in self.conns:
            self.conns[host] = Libvirt(self.uris[host])
        return self.conns[host]

    def close(self) -> None:
        for lv in self.conns.values():
            lv.close()


def _find(lv: Libvirt, uuid: str):
    """The domain with ``uuid`` on that host, or None."""
    conn = lv.connect()
    m = libvirt_module()
    try:
        return conn.lookupByUUIDString(uuid)
    except m.libvirtError:
        return None


def host_local_paths(xml: str, source: str, target: str) -> str | None:
    """The domain XML for the target with host-local paths renamed (None = nothing to rename).

    A channel socket or a console log under a directory named after the source
    host (``.../<source>/...``, as the lab cluster lays them out) moves to the
    same place under the target's name, so the two QEMUs never share a socket.
    """
    root = ET.fromstring(xml)
    changed = False
    for el in root.iterfind("devices/*/source[@path]"):
        path = el.get("path", "")
        if f"/{source}/" in path:
            el.set("path", path.replace(f"/{source}/", f"/{target}/"))
            changed = True
    return ET.tostring(root, encoding="unicode") if changed else None


DestXml = Callable[[str, str, str], "str | None"]
Precheck = Callable[[Move, ClusterState, Rules], str | None]


def room_check(move: Move, state: ClusterState, rules: Rules) -> str | None:
    """Why the target has no room for the VM after its reserve (None = it has)."""
    try:
        target = state.host(move.target)
    except KeyError:
        return f"target {move.target} is not in the cluster state"
    vm = next((v for v in state.vms if v.uuid == move.vm), None)
    if vm is None:
        return f"{move.name} is not in the cluster state"
    reserve = max(target.reserve_mib, rules.reserve_mib.get(target.name, 0.0))
    used = sum(v.memory_mib for v in state.on(target.name) if v.uuid != vm.uuid)
    free = target.memory_mib - reserve - used
    if vm.memory_mib > free:
        return f"no room on {target.name}: {move.name} needs {vm.memory_mib:.0f} MiB, {free:.0f} MiB free after reserve"
    if target.maintenance or target.name in rules.maintenance:
        return f"{target.name} is in maintenance"
    return None


def rules_check(move: Move, state: ClusterState, rules: Rules) -> str | None:
    """Why the rules forbid the move now (None = allowed): the shared ``allowed_targets``."""
    vm = next((v for v in state.vms if v.uuid == move.vm), None)
    if vm is None or move.target in allowed_targets(vm, state, rules):
        return None
    return f"rules forbid {move.target} for {vm.name}"


class Executor:
    """Runs moves one at a time and counts their outcomes (for the metrics and the log)."""

    def __init__(self, hosts: Hosts, shared_disks: bool = True, timeout: float = 120.0,
                 prechecks: tuple[Precheck, ...] = (room_check, rules_check),
                 dest_xml: DestXml | None = host_local_paths) -> None:
        self.hosts = hosts
        libvirt_module().registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions
        self.shared_disks = shared_disks
        self.timeout = timeout
        self.prechecks = prechecks
        self.dest_xml = dest_xml  # (xml, source, target) -> the target's XML, or None to keep it
        self.counts: Counter[str] = Counter()
        self.seconds: list[float] = []

    def _done(self, out: Outcome) -> Outcome:
        self.counts[out.outcome] += 1
        if out.ok:
            self.seconds.append(out.seconds)
        down = f", downtime {out.downtime_ms:.0f} ms" if out.downtime_ms is not None else ""
        log.log(logging.INFO if out.ok else logging.WARNING, "migration %s %s -> %s: %s%s (%.2f s%s)",
                out.move.name, out.move.source, out.move.target, out.outcome,
                f" ({out.detail})" if out.detail else "", out.seconds, down)
        return out

    def precheck(self, move: Move, state: ClusterState, rules: Rules) -> str | None:
        """Why ``move`` must not start now (None = go)."""
        try:
            src, dst = self.hosts.lv(move.source), self.hosts.lv(move.target)
            src.connect_now()
            dst.connect_now()
        except (HostUnavailable, MigrationError) as e:
            return str(e)
        if move.source == move.target:
            return "source and target are the same host"
        if _find(dst, move.vm) is not None:
            return f"{move.name} is already on {move.target}"
        dom = _find(src, move.vm)
        if dom is None:
            return f"{move.name} is no longer on {move.source}"
        ok, active = src.call("isActive", move.name, dom.isActive)
        if not (ok and active):
            return f"{move.name} is not running on {move.source}"
        for check in self.prechecks:
            if why := check(move, state, rules):
                return why
        return None

    def migrate(self, move: Move, state: ClusterState, rules: Rules, credits: tuple[float, ...] = ()) -> Outcome:
        """Check, migrate and verify one move; the VM keeps running on the source when it fails."""
        t0 = time.monotonic()
        if why := self.precheck(move, state, rules):
            return self._done(Outcome(move, "precondition", why))
        m = libvirt_module()
        src = self.hosts.lv(move.source)
        dom = _find(src, move.vm)
        if credits:
            write_credits(src, dom, credits)
        flags = (m.VIR_MIGRATE_LIVE | m.VIR_MIGRATE_PEER2PEER | m.VIR_MIGRATE_PERSIST_DEST
                 | m.VIR_MIGRATE_UNDEFINE_SOURCE)
        if self.shared_disks:
            flags |= m.VIR_MIGRATE_UNSAFE  # libvirt cannot tell the disk file is shared
        params: dict = {}
        if self.dest_xml is not None:
            ok, xml = src.call("XMLDesc", move.name, dom.XMLDesc, m.VIR_DOMAIN_XML_MIGRATABLE)
            if ok and (new := self.dest_xml(xml, move.source, move.target)):
                params[m.VIR_MIGRATE_PARAM_DEST_XML] = new
                params[m.VIR_MIGRATE_PARAM_PERSIST_XML] = new
        peer = self.hosts.peer.get(move.target, self.hosts.uris[move.target])
        try:
            dom.migrateToURI3(peer, params, flags)
        except m.libvirtError as e:
            running = _find(src, move.vm)
            still = running is not None and src.call("isActive", move.name, running.isActive)[1]
            where = "still running on the source" if still else "NOT running on the source"
            return self._done(Outcome(move, "refused", f"{e.get_error_message()}; {where}",
                                      time.monotonic() - t0))
        seconds = time.monotonic() - t0
        if problem := self.verify(move):
            return self._done(Outcome(move, "unverified", problem, seconds))
        return self._done(Outcome(move, "ok", f"{move.target} has it running and persistent", seconds,
                                  self.downtime_ms(move)))

    def downtime_ms(self, move: Move) -> float | None:
        """The guest's pause as the target's completed migration job measured it (None = not known)."""
        dst = self.hosts.lv(move.target)
        dom = _find(dst, move.vm)
        if dom is None:
            return None
        ok, stats = dst.call("jobStats", move.name, dom.jobStats,
                             libvirt_module().VIR_DOMAIN_JOB_STATS_COMPLETED, default={})
        value = stats.get("downtime") if ok else None
        return float(value) if value is not None else None

    def verify(self, move: Move) -> str | None:
        """Read the result back from both daemons: running and persistent on the target, gone from the source."""
        src, dst = self.hosts.lv(move.source), self.hosts.lv(move.target)
        there = _find(dst, move.vm)
        if there is None:
            return f"not found on {move.target}"
        if not (dst.call("isActive", move.name, there.isActive)[1]
                and dst.call("isPersistent", move.name, there.isPersistent)[1]):
            return f"not running and persistent on {move.target}"
        if _find(src, move.vm) is not None:
            return f"still defined on {move.source}"
        return None

    def credits_on(self, host: str, uuid: str) -> tuple[float, ...]:
        """The credit ledger stored in the VM's metadata on ``host`` (empty when none)."""
        lv = self.hosts.lv(host)
        dom = _find(lv, uuid)
        return read_credits(lv, dom) if dom is not None else ()
