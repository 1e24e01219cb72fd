"""CgroupActuator: CPU shares, CPU caps, blkio weights and vCPU pins written to a VM's cgroups.

The same three calls as :class:`~rescoin.hosts.actuators.LibvirtActuator`,
made by writing the cgroup files libvirt itself writes, without a libvirt
round trip. ``LibvirtHost.apply`` runs each returned function through
``Libvirt.call``, which records an ``OSError`` as a failed action; every
failure here (a VM that vanished, a file the kernel refused) is an
``OSError``.

Finding a VM's cgroups. libvirt writes the QEMU pid to
``/run/libvirt/qemu/<name>.pid``; ``/proc/<pid>/cgroup`` says where that
process lives, per controller. The main QEMU thread sits in the VM's
``emulator/`` child for the controllers libvirt splits per thread (cpu,
cpuacct, cpuset), so ``emulator`` is stripped; the VM's vCPU threads are in
the sibling ``vcpuN/`` groups. Seen on this machine (cgroup v1, libvirtd
without systemd-machined)::

    /sys/fs/cgroup/cpu/machine/qemu-59-NAME.libvirt-qemu/{cpu.shares,emulator/,vcpu0/,vcpu1/}
    /sys/fs/cgroup/cpuset/machine/qemu-59-NAME.libvirt-qemu/vcpu0/cpuset.cpus
    /sys/fs/cgroup/blkio/machine/qemu-59-NAME.libvirt-qemu/blkio.bfq.weight   (no vcpu children)

With systemd the VM is a scope (``machine.slice/machine-qemu\\x2d1\\x2dNAME.scope``)
and newer libvirt nests its groups one level lower, in ``<scope>/libvirt/``;
weights are relative among siblings, so they go to the scope (which competes
with the other VMs) and per-vCPU settings to ``<scope>/libvirt/vcpuN``. When
the pid file is missing, the VM's directory is found by scanning for a
``qemu-<id>-*.libvirt-qemu`` or ``machine-qemu\\x2d<id>\\x2d*.scope`` directory.
Paths are cached per VM UUID; a write that fails with ENOENT (the VM
restarted: new pid, new directory) resolves them again once and retries.

Values, cgroup v1 (written through cgroupspy nodes; plain writes where
cgroupspy has no attribute):

* shares -> ``cpu.shares`` of the VM's group (2..262144);
* quota (cores) -> ``cpu.cfs_period_us`` = 100000 and ``cpu.cfs_quota_us`` of
  every ``vcpuN`` (per vCPU, as libvirt's ``vcpu_quota``; -1 = no cap);
* blkio weight (10..1000) -> ``blkio.bfq.weight`` of the VM's group when the
  kernel has it (BFQ; CFQ and its ``blkio.weight`` were removed in Linux 5.0),
  else ``blkio.weight``: the order libvirt uses. BFQ's default weight is 100
  (CFQ's was 500), so the BFQ file gets :func:`blkio_to_io_weight` too and
  CFQ's the value unchanged;
* pins -> ``vcpuN/cpuset.cpus`` as a CPU list ("0-3,8").

cgroup v2 (plain writes, no cgroupspy: it only knows v1):

* shares -> ``cpu.weight`` by :func:`shares_to_weight`, the mapping runc
  (opencontainers/runc PR 4785, runc 1.3.2 / 1.4) and crun (containers/crun
  issue 1721) moved to after kubernetes issue 131216: a quadratic in log2
  space through 2 -> 1, 1024 -> 100 and 262144 -> 10000, so the v1 default
  keeps the v2 default's share next to unmanaged siblings (the old linear
  ``1 + (shares - 2) * 9999 // 262142`` made 1024 a weight of 39);
* quota -> ``vcpuN/cpu.max`` "QUOTA 100000", or "max 100000" for no cap;
* blkio weight -> ``io.bfq.weight`` "N" if present, else ``io.weight``
  "default N", with N from :func:`blkio_to_io_weight` (see there: the v1
  default 500 becomes the v2 default 100, ratios kept);
* pins -> ``vcpuN/cpuset.cpus``.

cgroup v2 is detected by ``<root>/cgroup.controllers`` (the unified hierarchy
mounted at the root); a hybrid system with only an empty cgroup2 at
``<root>/unified`` is v1.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from rescoin.hosts.actuators import QUOTA_PERIOD_US, Call, quota_us

log = logging.getLogger("rescoin.cgroupfs")

SHARES_MIN, SHARES_MAX = 2, 262144
WEIGHT_MIN, WEIGHT_MAX = 1, 10000
BLKIO_MIN, BLKIO_MAX, BLKIO_DEFAULT = 10, 1000, 500  # v1 blkio.weight (CFQ), the scale rescoin plans in
IO_DEFAULT = 100  # v2 io.weight's default, and BFQ's (v1 blkio.bfq.weight, v2 io.bfq.weight)
V1_CONTROLLERS = ("cpu", "cpuset", "blkio")  # the ones rescoin writes
SCAN_DEPTH = 3  # how deep under a controller root a VM's directory is looked for


# -- pure conversions -------------------------------------------------------------------------
def shares_to_weight(shares: int) -> int:
    """cgroup v1 ``cpu.shares`` (2..262144) as a v2 ``cpu.weight`` (1..10000), as runc and crun map it now.

    With l = log2(shares): weight = ceil(10^((l^2 + 125 l) / 612 - 7/34)), the
    parabola through (1, 0), (10, 2) and (18, 4) in (log2 shares, log10 weight),
    so 2 -> 1, 1024 (v1 default) -> 100 (v2 default), 262144 -> 10000. This is
    ``ConvertCPUSharesToCgroupV2Value`` of opencontainers/cgroups after runc PR
    4785 (kubernetes issue 131216: the linear mapping gave 1024 -> 39, less than
    an unmanaged sibling at the default 100). Non-decreasing; every weight is hit.
    """
    shares = min(max(int(shares), SHARES_MIN), SHARES_MAX)
    if shares == SHARES_MIN:
        return WEIGHT_MIN
    if shares == SHARES_MAX:
        return WEIGHT_MAX
    l = math.log2(shares)  # noqa: E741 - the formula's own name
    return min(WEIGHT_MAX, math.ceil(10 ** ((l * l + 125 * l) / 612 - 7 / 34)))


def weight_to_shares(weight: int) -> int:
    """The inverse of :func:`shares_to_weight`: the smallest shares value giving ``weight``."""
    weight = min(max(int(weight), WEIGHT_MIN), WEIGHT_MAX)
    lo, hi = SHARES_MIN, SHARES_MAX  # shares_to_weight is non-decreasing: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        if shares_to_weight(mid) < weight:
            lo = mid + 1
        else:
            hi = mid
    return lo


def blkio_to_io_weight(weight: int) -> int:
    """A v1 blkio weight (10..1000, CFQ default 500) as a weight next to a default of 100.

    For v2 ``io.weight`` (1..10000, default 100) and v2 BFQ's ``io.bfq.weight``
    (1..1000, default 100). v1 files are written unscaled, as libvirt writes them.
    Weights are shares among siblings, so the scale is
    proportional, ``round(weight * 100 / 500)``: rescoin's default 500 becomes 100
    and keeps the share an unmanaged sibling at the default has, and two VMs keep
    their ratio (up to rounding; 10..1000 -> 2..200). systemd converts BlockIOWeight=
    to io.weight the same way (``cgroup_weight_blkio_to_io`` in src/core/cgroup.c,
    which truncates where this rounds). Writing 500 unchanged, as libvirt's
    ``virCgroupV2SetBlkioWeight`` does, gave a managed VM five times the share of
    any unmanaged group.
    """
    weight = min(max(int(weight), BLKIO_MIN), BLKIO_MAX)
    return min(max(round(weight * IO_DEFAULT / BLKIO_DEFAULT), WEIGHT_MIN), WEIGHT_MAX)


def io_weight_to_blkio(weight: int) -> int:
    """The inverse of :func:`blkio_to_io_weight`, on the 10..1000 blkio scale rescoin plans in."""
    return min(max(int(weight) * BLKIO_DEFAULT // IO_DEFAULT, BLKIO_MIN), BLKIO_MAX)


def cpulist(cpumap: Iterable[bool]) -> str:
    """A CPU map (one bool per pCPU, any length) as a kernel CPU list: ``"0-3,8"``."""
    on = [i for i, b in enumerate(cpumap) if b]
    parts: list[str] = []
    start = prev = None
    for c in on:
        if prev is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = c
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def parse_cpulist(text: str) -> set[int]:
    """``"0-3,8"`` -> ``{0, 1, 2, 3, 8}`` (an empty list is an empty set)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` -> controller -> path ("" is the v2 unified hierarchy)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _is_vm_dir(name: str) -> bool:
    return name.endswith(".libvirt-qemu") or (name.startswith("machine-qemu") and name.endswith(".scope"))


def _split_vm_path(path: str) -> tuple[str, str]:
    """A cgroup path of a QEMU thread -> (the VM's group for weights, the parent of ``vcpuN``)."""
    parts = [p for p in path.split("/") if p]
    if parts and (parts[-1] == "emulator" or re.fullmatch(r"vcpu\d+|iothread\d+", parts[-1])):
        parts.pop()
    base = "/" + "/".join(parts)
    if parts and parts[-1] == "libvirt" and len(parts) > 1:  # systemd scope with libvirt's nested group
        return "/" + "/".join(parts[:-1]), base
    return base, base


@dataclass
class VMCgroups:
    """Where one VM's cgroups are: per controller ("" = v2 unified), relative to that hierarchy."""

    pid: int | None
    version: int
    top: dict[str, str]  # controller -> the VM's own group (shares, blkio weight)
    vcpus: dict[str, str]  # controller -> the group holding vcpuN/


class CgroupActuator:
    """Writes CPU shares, caps, blkio weights and pins straight into a VM's cgroups (v1 or v2)."""

    name = "cgroup"

    def __init__(self, root: str | os.PathLike = "/sys/fs/cgroup", *, run_dir: str | os.PathLike = "/run/libvirt/qemu",
                 proc: str | os.PathLike = "/proc", version: int | None = None) -> None:
        self.root = Path(root)
        self.run_dir = Path(run_dir)
        self.proc = Path(proc)
        self._version = version  # None: detect from root at first use
        self._cache: dict[str, VMCgroups] = {}

    # -- the Actuator protocol ---------------------------------------------------------------
    def cpu(self, state, dom, shares: int | None, quota: float | None) -> Call:
        """``shares`` None = unchanged; ``quota`` None = unchanged, NaN = remove the cap, else cores."""
        q = None if quota is None else quota_us(quota, state.vcpus)
        return "cgroup.cpu", self._run, (state, dom, lambda g: self._write_cpu(g, state, shares, q))

    def blkio(self, state, dom, weight: int) -> Call:
        return "cgroup.blkio", self._run, (state, dom, lambda g: self._write_blkio(g, int(weight)))

    def pin(self, state, dom, vcpu: int, cpumap: tuple[bool, ...]) -> Call:
        cpus = cpulist(cpumap)
        return "cgroup.cpuset", self._run, (state, dom, lambda g: self._write_pin(g, int(vcpu), cpus))

    # -- reading back ---------------------------------------------------------------------------
    def read_back(self, state, dom=None) -> dict[str, Any]:
        """What the VM's cgroup files say now.

        ``shares`` (v2: derived from ``cpu_weight``), ``quota`` and ``period``
        per vCPU (quota -1 = no cap), ``blkio`` weight on the 10..1000 scale
        (None when the kernel has no weight file; ``io_weight`` is the value in a
        file whose default is 100, before :func:`io_weight_to_blkio`), ``cpuset`` per vCPU as a CPU list,
        and the ``paths``
        used. Raises OSError when the VM's cgroups cannot be found.
        """
        return self._run(state, dom, lambda g: self._read(g, state))

    def forget(self, uuid: str | None = None) -> None:
        """Drop cached paths (of one VM, or all)."""
        if uuid is None:
            self._cache.clear()
        else:
            self._cache.pop(uuid, None)

    @property
    def version(self) -> int:
        if self._version is None:
            self._version = 2 if (self.root / "cgroup.controllers").exists() else 1
        return self._version

    # -- running one operation with its paths -------------------------------------------------
    def _run(self, state, dom, op: Callable[[VMCgroups], Any]) -> Any:
        """Run ``op`` on the VM's cgroups; on ENOENT with cached paths, resolve again and retry once."""
        cached = self._cache.get(state.uuid)
        groups = cached or self._resolve(state, dom)
        try:
            return _io(lambda: op(groups))
        except FileNotFoundError:
            self._cache.pop(state.uuid, None)
            if cached is None:
                raise
        log.info("cgroups of VM %s moved (restarted?); looking them up again", state.name)
        groups = self._resolve(state, dom)
        return _io(lambda: op(groups))

    def _resolve(self, state, dom) -> VMCgroups:
        try:
            groups = self._from_pid(state.name) or self._from_scan(state.name, dom)
        except ValueError as e:  # a garbled pid file or /proc entry
            raise OSError(errno.EINVAL, f"cannot find the cgroups of VM {state.name}: {e}") from None
        if groups is None:
            raise FileNotFoundError(errno.ENOENT, f"VM {state.name} is not running (no QEMU pid, no cgroup found)")
        self._cache[state.uuid] = groups
        log.debug("VM %s cgroups: %s", state.name, groups)
        return groups

    def _from_pid(self, name: str) -> VMCgroups | None:
        try:
            pid = int((self.run_dir / f"{name}.pid").read_text().strip())
            text = (self.proc / str(pid) / "cgroup").read_text()
        except FileNotFoundError:
            return None
        where = _parse_proc_cgroup(text)
        top, vcpus = {}, {}
        for c in ("",) if self.version == 2 else V1_CONTROLLERS:
            path = where.get(c)
            if path is not None and any(_is_vm_dir(p) for p in path.split("/")):
                top[c], vcpus[c] = _split_vm_path(path)
        if ("" if self.version == 2 else "cpu") not in top:
            return None  # a stale pid file: that pid is some other process now
        return VMCgroups(pid, self.version, top, vcpus)

    def _from_scan(self, name: str, dom) -> VMCgroups | None:
        """No pid file: the directory named after the domain's id, under the cpu hierarchy."""
        try:
            dom_id = int(dom.ID()) if dom is not None else -1
        except Exception:  # noqa: BLE001 - a dead domain handle: nothing to scan for
            return None
        if dom_id < 0:
            return None
        prefixes = (f"qemu-{dom_id}-", f"machine-qemu\\x2d{dom_id}\\x2d")
        base = self.root if self.version == 2 else self.root / "cpu"
        found = None
        for dirpath, dirnames, _ in os.walk(base):
            depth = len(Path(dirpath).relative_to(base).parts)
            hits = [d for d in dirnames if _is_vm_dir(d) and d.startswith(prefixes)]
            if hits:
                found = Path(dirpath, hits[0])
                break
            if depth >= SCAN_DEPTH - 1:
                dirnames[:] = []
        if found is None:
            return None
        rel = "/" + found.relative_to(base).as_posix()
        inner = rel + "/libvirt" if (found / "libvirt").is_dir() else rel
        top, vcpus = _split_vm_path(inner)
        keys = ("",) if self.version == 2 else V1_CONTROLLERS
        log.info("VM %s has no pid file in %s; found its cgroup %s by its id", name, self.run_dir, rel)
        return VMCgroups(None, self.version, dict.fromkeys(keys, top), dict.fromkeys(keys, vcpus))

    # -- paths and nodes --------------------------------------------------------------------------
    def _dir(self, g: VMCgroups, controller: str, where: str = "top", vcpu: int | None = None) -> Path:
        key = "" if g.version == 2 else controller
        groups = g.top if where == "top" else g.vcpus
        if key not in groups:  # libvirt does not manage this controller (qemu.conf cgroup_controllers)
            raise OSError(errno.EOPNOTSUPP, f"the VM has no {controller} cgroup of its own")
        rel = groups[key].lstrip("/")
        base = self.root if g.version == 2 else self.root / controller
        path = base / rel if rel else base
        return path / f"vcpu{vcpu}" if vcpu is not None else path

    def _cpuset_of(self, g: VMCgroups, vcpu: int) -> Any:
        """The CPU list one vCPU's cpuset holds, as cgroupspy reads it."""
        return self._node(g, "cpuset", "vcpus", vcpu).controller.get_property(b"cpuset.cpus")

    def _node(self, g: VMCgroups, controller: str, where: str = "top", vcpu: int | None = None):
        """A cgroupspy node (v1) for one of the VM's groups, built from its path without walking the tree."""
        from cgroupspy.nodes import Node  # noqa: PLC0415 - only v1 needs it

        node = Node(str(self.root).encode())
        node = Node(controller.encode(), parent=node)  # sets the node's controller type
        rel = self._dir(g, controller, where, vcpu).relative_to(self.root / controller)
        for part in rel.parts:
            node = Node(part.encode(), parent=node)
        return node

    # -- writes ------------------------------------------------------------------------------------
    def _write_cpu(self, g: VMCgroups, state, shares: int | None, quota: int | None) -> None:
        if shares is not None:
            shares = min(max(int(shares), SHARES_MIN), SHARES_MAX)
            if g.version == 2:
                _write(self._dir(g, "cpu") / "cpu.weight", str(shares_to_weight(shares)))
            else:
                _io(lambda: setattr(self._node(g, "cpu").controller, "shares", shares))
        if quota is not None:
            for v in range(max(int(state.vcpus), 1)):
                if g.version == 2:
                    value = "max" if quota < 0 else str(quota)
                    _write(self._dir(g, "cpu", "vcpus", v) / "cpu.max", f"{value} {QUOTA_PERIOD_US}")
                else:
                    ctl = self._node(g, "cpu", "vcpus", v).controller
                    # period first (as libvirt does); -1 removes the cap
                    _io(partial(setattr, ctl, "cfs_period_us", QUOTA_PERIOD_US))
                    _io(partial(setattr, ctl, "cfs_quota_us", quota))

    def _write_blkio(self, g: VMCgroups, weight: int) -> None:
        """``weight`` on the 10..1000 blkio scale; v2's files (default 100) get it scaled.

        v1 files take it unscaled, as libvirt's own ``blkiotune`` writes them there: both
        actuators, and libvirt reading the weight back, then agree on one host.
        """
        scaled = blkio_to_io_weight(weight)
        if g.version == 2:
            d = self._dir(g, "io")
            if (d / "io.bfq.weight").exists():
                _write(d / "io.bfq.weight", str(scaled))
            elif (d / "io.weight").exists():
                _write(d / "io.weight", f"default {scaled}")
            else:
                _no_weight(d, "io.bfq.weight nor io.weight")
            return
        d = self._dir(g, "blkio")
        ctl = self._node(g, "blkio").controller
        if (d / "blkio.bfq.weight").exists():
            _io(lambda: ctl.set_property(b"blkio.bfq.weight", min(max(int(weight), BLKIO_MIN), BLKIO_MAX)))
        elif (d / "blkio.weight").exists():  # CFQ: default 500, rescoin's own scale
            _io(lambda: setattr(ctl, "weight", min(max(int(weight), BLKIO_MIN), BLKIO_MAX)))
        else:
            _no_weight(d, "blkio.bfq.weight nor blkio.weight")

    def _write_pin(self, g: VMCgroups, vcpu: int, cpus: str) -> None:
        if not cpus:
            raise OSError(errno.EINVAL, f"empty CPU map for vCPU {vcpu}")
        if g.version == 2:
            _write(self._dir(g, "cpuset", "vcpus", vcpu) / "cpuset.cpus", cpus)
        else:
            ctl = self._node(g, "cpuset", "vcpus", vcpu).controller
            _io(lambda: ctl.set_property(b"cpuset.cpus", cpus))

    # -- reads -------------------------------------------------------------------------------------
    def _read(self, g: VMCgroups, state) -> dict[str, Any]:
        vcpus = range(max(int(state.vcpus), 1))
        out: dict[str, Any] = {"version": g.version, "pid": g.pid}
        if g.version == 2:
            top = self._dir(g, "cpu")
            weight = int(_read(top / "cpu.weight"))
            out.update(cpu_weight=weight, shares=weight_to_shares(weight))
            out["quota"], out["period"] = [], []
            for v in vcpus:
                q, _, p = _read(self._dir(g, "cpu", "vcpus", v) / "cpu.max").partition(" ")
                out["quota"].append(-1 if q == "max" else int(q))
                out["period"].append(int(p) if p else None)
            out["io_weight"] = None
            if (top / "io.bfq.weight").exists():
                out["io_weight"] = int(_read(top / "io.bfq.weight").split()[-1])
            elif (top / "io.weight").exists():
                line = next((ln for ln in _read(top / "io.weight").splitlines() if ln.startswith("default")), "")
                out["io_weight"] = int(line.split()[1]) if line else None
            out["blkio"] = None if out["io_weight"] is None else io_weight_to_blkio(out["io_weight"])
            out["cpuset"] = [_read(self._dir(g, "cpuset", "vcpus", v) / "cpuset.cpus") for v in vcpus]
            out["paths"] = {"cpu": str(top), "vcpus": str(self._dir(g, "cpu", "vcpus"))}
            return out
        cpu = self._node(g, "cpu").controller
        out["shares"] = _io(lambda: cpu.shares)
        out["quota"], out["period"] = [], []
        for v in vcpus:
            ctl = self._node(g, "cpu", "vcpus", v).controller
            q = _io(partial(getattr, ctl, "cfs_quota_us"))  # cgroupspy reads -1 as None
            out["quota"].append(-1 if q is None else q)
            out["period"].append(_io(partial(getattr, ctl, "cfs_period_us")))
        out["blkio"] = out["io_weight"] = None  # also when libvirt manages no blkio cgroup for the VM
        if "blkio" in g.top:
            blk = self._dir(g, "blkio")
            if (blk / "blkio.bfq.weight").exists():  # written unscaled on v1, as libvirt does
                out["blkio"] = out["io_weight"] = int(_read(blk / "blkio.bfq.weight").split()[-1])
            elif (blk / "blkio.weight").exists():
                out["blkio"] = int(_read(blk / "blkio.weight").split()[-1])
        out["cpuset"] = [_io(partial(self._cpuset_of, g, v))
                         for v in vcpus]
        out["paths"] = {c: str(self._dir(g, c)) for c in V1_CONTROLLERS if c in g.top}
        out["paths"]["vcpus"] = str(self._dir(g, "cpu", "vcpus"))
        return out


def _write(path: Path, value: str) -> None:
    """Write an existing cgroup file (never create one: a missing file is ENOENT, as on cgroupfs)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # O_TRUNC: what `echo N >` does; kernfs ignores it
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _no_weight(d: Path, which: str) -> None:
    if not d.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such cgroup", str(d))
    # libvirt says the same: "blkio weight is valid only for bfq or cfq scheduler"
    raise OSError(errno.EOPNOTSUPP, f"no {which} in {d}: the disks' I/O scheduler is neither BFQ nor CFQ")


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read().strip()


def _io(fn: Callable[[], Any]) -> Any:
    """Run a cgroup access; parsing errors become OSError, the one error LibvirtHost records."""
    try:
        return fn()
    except OSError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        raise OSError(errno.EINVAL, f"cgroup value: {e}") from None
