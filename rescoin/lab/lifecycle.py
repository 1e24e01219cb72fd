"""Lab VM lifecycle: ``lab_up``, ``lab_down``, ``lab_status`` of the domains named ``rescoin-lab-N``."""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
import time
from pathlib import Path

from rescoin.hosts.agent import AgentClient, AgentReport
from rescoin.lab.base import (
    AGENT_TIMEOUT,
    DEFAULT_URI,
    DISK_DIR,
    DISK_MIB,
    LAB_PREFIX,
    LOG_DIR,
    SCENARIOS,
    SOCKET_DIR,
    LabError,
    Progress,
    quiet,
)
from rescoin.lab.domain import domain_xml
from rescoin.lab.image import build_image


def agent_stats(sock: str | Path, timeout: float = 2.0) -> AgentReport | None:
    """The stats of the agent behind the channel socket ``sock``, or None (no
    socket, no answer in time, or a reply that does not validate)."""
    return AgentClient(timeout=timeout).query({"lab": f"unix:{sock}"})["lab"]


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise LabError("libvirt-python is not installed in this Python "
                       "(run: scripts/setup-host --venv .venv)") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)   # errors arrive as exceptions
    return libvirt


def _open(uri: str):
    libvirt = _libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LabError(f"cannot connect to {uri}: {e.get_error_message()} "
                       "(is libvirtd running? see scripts/setup-host)") from None


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise LabError(f"'{what}' needs root (it runs VMs under qemu:///system and writes /var/lib/rescoin)")


def check_scenario(scenario: str) -> list[str]:
    if scenario not in SCENARIOS:
        raise LabError(f"unknown scenario {scenario!r} (choose from {', '.join(SCENARIOS)})")
    return SCENARIOS[scenario]


def _lab_domains(conn) -> list:
    return sorted((d for d in conn.listAllDomains(0) if d.name().startswith(LAB_PREFIX)),
                  key=lambda d: _natural(d.name()))


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _direct_io_works(directory: Path) -> bool:
    """Whether the host file system takes O_DIRECT (libvirt cache='none' needs it)."""
    probe = directory / f".odirect-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | getattr(os, "O_DIRECT", 0), 0o600)
        os.close(fd)
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def _console_tail(name: str, lines: int = 5) -> str:
    try:
        text = (LOG_DIR / f"{name}.console.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no console output"
    return " | ".join(text[-lines:]) if text else "no console output"


def lab_up(vms: int = 3, scenario: str = "mixed", uri: str = DEFAULT_URI, memory_mib: int = 256,
           max_memory_mib: int = 384, vcpus: int = 1, wait_agent: bool = True, progress: Progress | None = None,
           *, timeout: float = AGENT_TIMEOUT, agent: str | Path | None = None) -> list[str]:
    """Define and start ``vms`` lab VMs (``rescoin-lab-0``, ...) running the
    loads of ``scenario``; wait (at most ``timeout`` s) until each one's agent
    answers on its socket. Lab VMs left from before are removed first.
    Returns the domain names."""
    say = progress or quiet
    specs = check_scenario(scenario)
    if vms < 1:
        raise LabError(f"--vms must be >= 1, got {vms}")
    if not 32 <= memory_mib <= max_memory_mib:
        raise LabError(f"need 32 <= memory ({memory_mib}) <= max memory ({max_memory_mib}) MiB")
    _require_root("lab up")
    libvirt = _libvirt()
    image = build_image(agent=agent, progress=say)
    conn = _open(uri)
    try:
        if removed := _remove_lab(conn):
            say(f"removed {removed} lab VM(s) left from before")
        for d in (DISK_DIR, LOG_DIR, SOCKET_DIR):
            d.mkdir(parents=True, exist_ok=True)
        cache = "none" if _direct_io_works(DISK_DIR) else "writeback"
        names: list[str] = []
        started: dict[str, float] = {}
        for i in range(vms):
            name = f"{LAB_PREFIX}{i}"
            load = specs[i % len(specs)]
            disk = DISK_DIR / f"{name}.img"
            with open(disk, "wb") as f:
                f.truncate(DISK_MIB * 2**20)
            sock = SOCKET_DIR / f"{name}.agent"
            sock.unlink(missing_ok=True)
            (LOG_DIR / f"{name}.console.log").unlink(missing_ok=True)
            xml = domain_xml(name, image.kernel, image.initrd, disk, sock, memory_mib, max_memory_mib, vcpus,
                             load=load, disk_cache=cache)
            try:
                dom = conn.defineXML(xml)
                dom.create()
            except libvirt.libvirtError as e:
                raise LabError(f"cannot start {name}: {e.get_error_message()}") from None
            started[name] = time.monotonic()
            names.append(name)
            say(f"started {name} (load {load})")
        if wait_agent:
            _wait_agents(conn, names, started, timeout, say)
        return names
    finally:
        conn.close()


def _wait_agents(conn, names: list[str], started: dict[str, float], timeout: float, say: Progress) -> None:
    deadline = time.monotonic() + timeout

    def wait_one(name: str) -> tuple[str, float | None, str]:
        dom = conn.lookupByName(name)
        sock = SOCKET_DIR / f"{name}.agent"
        while time.monotonic() < deadline:
            if not dom.isActive():
                return name, None, f"{name} stopped while booting: {_console_tail(name)}"
            if agent_stats(sock, timeout=min(2.0, max(0.1, deadline - time.monotonic()))) is not None:
                return name, time.monotonic() - started[name], ""
            time.sleep(0.2)
        return name, None, f"{name}: no agent answer on {sock} within {timeout:.0f} s: {_console_tail(name)}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(names)) as pool:
        problems = []
        for name, seconds, problem in pool.map(wait_one, names):
            if seconds is None:
                problems.append(problem)
            else:
                say(f"{name}: agent answered {seconds:.1f} s after start")
    if problems:
        raise LabError("; ".join(problems) + " (the VMs are left up to inspect; 'rescoin lab down' removes them)")


def _remove_lab(conn) -> int:
    import libvirt

    def remove(dom) -> None:
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                raise LabError(f"cannot stop {dom.name()}: {e.get_error_message()}") from None
        try:
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise LabError(f"cannot undefine {dom.name()}: {e.get_error_message()}") from None

    domains = _lab_domains(conn)
    if domains:     # destroying waits for each QEMU to exit: do them side by side
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(domains)) as pool:
            list(pool.map(remove, domains))
    count = len(domains)
    for directory, pattern in ((DISK_DIR, "*.img"), (SOCKET_DIR, "*.agent")):
        for f in directory.glob(f"{LAB_PREFIX}{pattern}"):
            f.unlink(missing_ok=True)
    return count


def lab_down(uri: str = DEFAULT_URI) -> int:
    """Destroy and undefine every ``rescoin-lab-*`` domain and remove their
    disks and agent sockets (console logs stay for a post-mortem). Returns how
    many domains were removed; running it again returns 0."""
    _require_root("lab down")
    conn = _open(uri)
    try:
        return _remove_lab(conn)
    finally:
        conn.close()


_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down", 5: "shut off",
           6: "crashed", 7: "suspended"}


def _round_mib(report: AgentReport | None) -> int | None:
    """The guest's MemTotal in whole MiB, None when unknown."""
    if report is None or math.isnan(report.mem_total_mib):
        return None
    return round(report.mem_total_mib)


def lab_status(uri: str = DEFAULT_URI, agent_timeout: float = 1.0) -> list[dict]:
    """One dict per lab VM: name, uuid, state, vcpus, memory_mib (balloon
    target), max_memory_mib, load, agent (True when it answered), agent_mem_total_mib,
    agent_socket, console_log."""
    from xml.etree import ElementTree

    conn = _open(uri)
    try:
        rows = []
        for dom in _lab_domains(conn):
            state, max_kib, cur_kib, ncpu, _ = dom.info()
            root = ElementTree.fromstring(dom.XMLDesc(0))
            cmdline = root.findtext("os/cmdline") or ""
            load = next((w.split("=", 1)[1] for w in cmdline.split() if w.startswith("rescoin.load=")), "")
            sock = root.find("devices/channel/source")
            sock_path = sock.get("path") if sock is not None else str(SOCKET_DIR / f"{dom.name()}.agent")
            report = agent_stats(sock_path, timeout=agent_timeout) if state == 1 and sock_path else None
            rows.append({
                "name": dom.name(),
                "uuid": dom.UUIDString(),
                "state": _STATES.get(state, str(state)),
                "vcpus": ncpu,
                "memory_mib": cur_kib // 1024,
                "max_memory_mib": max_kib // 1024,
                "load": load or "idle",
                "agent": report is not None,
                "agent_mem_total_mib": _round_mib(report),
                "agent_socket": sock_path,
                "console_log": str(LOG_DIR / f"{dom.name()}.console.log"),
            })
        return rows
    finally:
        conn.close()


# =============================================================================
