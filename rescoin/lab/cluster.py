"""``rescoin lab cluster``: two real libvirt hosts on this one machine (DESIGN 13b).

Each host is a network namespace (veth 10.77.0.N/24 to the other), entered
with ``unshare --mount --uts --cgroup`` so it has its own hostname, private
bind mounts over libvirt's directories, a fresh sysfs and cgroup mounts, its
own ``virtlogd`` and ``libvirtd`` (tcp on its own address only, auth none:
these test hosts only) and a child cgroup of the caller's in every v1
hierarchy, so the two daemons' ``machine/`` cgroups do not clash.

Everything made is recorded in ``STATE_FILE`` before it is made, so
``cluster_down`` from a fresh process removes exactly that (and nothing
rescoin did not create). Agent sockets live under ``SOCKET_DIR/<host>/``,
outside the private mounts, so the root namespace reaches them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

from rescoin.lab.base import LAB_ROOT, SOCKET_DIR, LabError, Progress, quiet
from rescoin.lab.domain import domain_xml
from rescoin.lab.lifecycle import _libvirt, _require_root, agent_stats  # noqa: PLC2701 - one lab

CLUSTER_ROOT = LAB_ROOT / "cluster"
STATE_FILE = CLUSTER_ROOT / "state.json"
CLUSTER_SOCKETS = SOCKET_DIR / "cluster"
DISKS = CLUSTER_ROOT / "disks"  # shared by both hosts: migrations need VIR_MIGRATE_UNSAFE
NET = "10.77.0"
HOST_PREFIX = "rescoin-h"
VM_PREFIX = "rescoin-cl-"
CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")
# private mount -> subdirectory of the host's directory
PRIVATE = {"/etc/libvirt": "etc", "/run/libvirt": "run", "/var/lib/libvirt": "lib",
           "/var/cache/libvirt": "cache", "/var/log/libvirt": "log"}
SYSTEM_CAPS = Path("/var/cache/libvirt/qemu/capabilities")


def host_names(n: int) -> list[str]:
    return [f"{HOST_PREFIX}{i}" for i in range(n)]


def unix_uri(host_dir: str | Path) -> str:
    """How the root namespace reaches a lab host's daemon."""
    return f"qemu+unix:///system?socket={host_dir}/run/libvirt-sock"


def tcp_uri(name: str) -> str:
    """How the lab daemons reach each other (names from their private /etc/hosts)."""
    return f"qemu+tcp://{name}/system"


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()}")
    return r


def read_state() -> dict | None:
    """What ``cluster_up`` made, or None when nothing is up."""
    try:
        return json.loads(STATE_FILE.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LabError(f"cannot read {STATE_FILE}: {e}") from None


def _save(state: dict) -> None:
    CLUSTER_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(STATE_FILE)


def _own_cgroup(ctl: str) -> Path:
    """The caller's cgroup directory in hierarchy ``ctl``."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if ctl in names.split(","):
            return Path("/sys/fs/cgroup") / ctl / path.lstrip("/")
    raise LabError(f"no cgroup v1 hierarchy {ctl} (DESIGN 13 needs cgroup v1)")


def _make_cgroups(name: str, state: dict) -> list[str]:
    made = []
    for ctl in CONTROLLERS:
        parent = _own_cgroup(ctl)
        d = parent / name
        state["cgroups"].append(str(d))  # recorded before it exists: down removes what is there
        _save(state)
        d.mkdir(exist_ok=True)
        if ctl == "cpuset":
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text((parent / f).read_text())
        made.append(str(d))
    return made


def _conf(addr: str, host_uuid: str) -> str:
    return (f'listen_tcp = 1\nlisten_tls = 0\nlisten_addr = "{addr}"\nauth_tcp = "none"\n'
            f'auth_unix_rw = "none"\nauth_unix_ro = "none"\nhost_uuid = "{host_uuid}"\n')


QEMU_CONF = 'user = "root"\ngroup = "root"\nsecurity_driver = "none"\nremember_owner = 0\n'


def _host_script(h: dict, hosts_file: Path) -> str:
    """The shell run inside the new mount/uts/cgroup namespaces: mounts, then the two daemons."""
    d = h["dir"]
    lines = ["set -e", f"hostname {h['name']}"]
    lines += [f"mount --bind {d}/{sub} {target}" for target, sub in PRIVATE.items()]
    lines += [f"mount --bind {hosts_file} /etc/hosts", "mount -t sysfs sysfs /sys",
              "mount -t tmpfs tmpfs /sys/fs/cgroup"]
    for ctl in CONTROLLERS:
        lines += [f"mkdir -p /sys/fs/cgroup/{ctl}", f"mount -t cgroup -o {ctl} cgroup /sys/fs/cgroup/{ctl}"]
    lines += [f"virtlogd -d -p {d}/virtlogd.pid",
              f"taskset -c 0 libvirtd -d -l -f {d}/etc/libvirtd.conf -p {d}/libvirtd.pid"]
    return "\n".join(lines)


def _start_host(h: dict, hosts_file: Path, state: dict) -> None:
    d = Path(h["dir"])
    for sub in PRIVATE.values():
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "log" / "qemu").mkdir(exist_ok=True)
    (d / "etc" / "libvirtd.conf").write_text(_conf(h["addr"], h["host_uuid"]))
    (d / "etc" / "qemu.conf").write_text(QEMU_CONF)
    caps = d / "cache" / "qemu" / "capabilities"
    caps.mkdir(parents=True, exist_ok=True)
    for f in SYSTEM_CAPS.glob("*.xml") if SYSTEM_CAPS.is_dir() else ():
        shutil.copy2(f, caps / f.name)  # avoids a capabilities probe on the first incoming migration
    Path(h["sockets"]).mkdir(parents=True, exist_ok=True)
    cgroups = _make_cgroups(h["name"], state)
    join = " ".join(f"echo $$ > {c}/tasks;" for c in cgroups)
    inner = _host_script(h, hosts_file)
    _run("nsenter", f"--net=/run/netns/{h['name']}", "sh", "-c",
         f"{join} exec unshare --mount --uts --cgroup --propagation private sh -c \"$0\"", inner)
    deadline = time.monotonic() + 15
    while not (d / "run" / "libvirt-sock").exists():
        if time.monotonic() > deadline:
            raise LabError(f"libvirtd of {h['name']} did not start (see {d}/log)")
        time.sleep(0.1)


def cluster_up(hosts: int = 2, vms: int = 0, *, memory_mib: int = 256, max_memory_mib: int = 384,
               loads: list[str] | None = None, progress: Progress | None = None) -> dict:
    """Bring up ``hosts`` lab hosts and ``vms`` guests on the first one (loads[i] each); returns the state.

    A cluster left from before is taken down first.
    """
    say = progress or quiet
    if hosts != 2:
        raise LabError(f"--hosts must be 2 (one veth pair joins the lab hosts), got {hosts}")
    _require_root("lab cluster up")
    if read_state() is not None:
        say("taking down the lab cluster left from before")
        cluster_down()
    t0 = time.monotonic()
    state: dict = {"hosts": [], "cgroups": [], "netns": [], "links": [], "vms": []}
    _save(state)
    try:
        _network(state)
        hosts_file = CLUSTER_ROOT / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{NET}.{i + 1} {n}\n" for i, n in enumerate(host_names(hosts))))
        for i, name in enumerate(host_names(hosts)):
            h = {"name": name, "addr": f"{NET}.{i + 1}", "dir": str(CLUSTER_ROOT / name),
                 "sockets": str(CLUSTER_SOCKETS / name), "host_uuid": str(uuidlib.uuid4())}
            h["uri"], h["tcp_uri"] = unix_uri(h["dir"]), tcp_uri(name)
            state["hosts"].append(h)
            _save(state)
            _start_host(h, hosts_file, state)
            say(f"{name}: libvirtd up at {h['addr']} ({h['uri']})")
        say(f"hosts up in {time.monotonic() - t0:.1f} s")
        if vms:
            start_vms(state, state["hosts"][0]["name"], vms, memory_mib=memory_mib,
                      max_memory_mib=max_memory_mib, loads=loads, progress=say)
    except BaseException:
        cluster_down()
        raise
    return state


def _network(state: dict) -> None:
    a, b = host_names(2)
    for ns in (a, b):
        state["netns"].append(ns)
        _save(state)
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
    state["links"].append("rc-veth0")
    _save(state)
    _run("ip", "link", "add", "rc-veth0", "netns", a, "type", "veth", "peer", "name", "rc-veth1", "netns", b)
    for i, (ns, dev) in enumerate(((a, "rc-veth0"), (b, "rc-veth1"))):
        _run("ip", "-n", ns, "addr", "add", f"{NET}.{i + 1}/24", "dev", dev)
        _run("ip", "-n", ns, "link", "set", dev, "up")


def host_of(state: dict, name: str) -> dict:
    for h in state["hosts"]:
        if h["name"] == name:
            return h
    raise LabError(f"no lab host {name!r} (hosts: {', '.join(h['name'] for h in state['hosts'])})")


def vm_paths(h: dict, vm: str) -> dict[str, str]:
    """The host-local agent socket and console log of ``vm`` on lab host ``h``."""
    return {"socket": f"{h['sockets']}/{vm}.agent", "console": f"{h['dir']}/log/qemu/{vm}.console.log"}


def start_vms(state: dict, host: str, count: int, *, memory_mib: int = 256, max_memory_mib: int = 384,
              loads: list[str] | None = None, first: int | None = None, timeout: float = 120.0,
              progress: Progress | None = None) -> list[str]:
    """Define and start ``count`` lab guests on ``host``; wait until every agent answers."""
    from rescoin.lab.image import build_image

    say = progress or quiet
    lv = _libvirt()
    h = host_of(state, host)
    image = build_image(progress=say)
    DISKS.mkdir(parents=True, exist_ok=True)
    start = len(state["vms"]) if first is None else first
    names = []
    conn = lv.open(h["uri"])
    try:
        for i in range(start, start + count):
            name = f"{VM_PREFIX}{i}"
            load = (loads or ["idle"])[(i - start) % len(loads or ["idle"])]
            disk = DISKS / f"{name}.img"
            state["vms"].append(name)
            _save(state)
            with open(disk, "wb") as f:
                f.truncate(16 * 2**20)
            p = vm_paths(h, name)
            xml = domain_xml(name, image.kernel, image.initrd, disk, p["socket"], memory_mib, max_memory_mib,
                             load=load, console_log=p["console"], disk_cache="writeback")
            try:
                conn.defineXML(xml).create()
            except lv.libvirtError as e:
                raise LabError(f"cannot start {name} on {host}: {e.get_error_message()}") from None
            names.append(name)
            say(f"started {name} on {host} (load {load})")
        deadline = time.monotonic() + timeout
        for name in names:
            while agent_stats(vm_paths(h, name)["socket"], timeout=1.0) is None:
                if time.monotonic() > deadline:
                    raise LabError(f"{name}: no agent answer within {timeout:.0f} s")
                time.sleep(0.3)
            say(f"{name}: agent answers")
    finally:
        conn.close()
    return names


def _remove_domains(uri: str) -> int:
    lv = _libvirt()
    try:
        conn = lv.open(uri)
    except lv.libvirtError:
        return 0
    n = 0
    try:
        for dom in conn.listAllDomains(0):
            for op in (dom.destroy, dom.undefine):
                with contextlib.suppress(lv.libvirtError):  # not running, or transient
                    op()
            n += 1
    finally:
        conn.close()
    return n


def _stop_pid(pidfile: Path, timeout: float = 10.0) -> None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _remove_cgroup(top: Path, timeout: float = 10.0) -> None:
    """Remove ``top`` and its children deepest first, once no task is left in them."""
    if not top.is_dir():
        return
    deadline = time.monotonic() + timeout
    dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]
    for d in dirs:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # tasks still leaving
                if time.monotonic() > deadline:
                    raise LabError(f"cannot remove cgroup {d}: tasks remain") from None
                time.sleep(0.05)


def cluster_down() -> int:
    """Remove everything the state file says ``cluster_up`` made; returns the hosts removed (0: nothing up)."""
    _require_root("lab cluster down")
    state = read_state()
    if state is None:
        return 0
    for h in state["hosts"]:
        d = Path(h["dir"])
        if (d / "run" / "libvirt-sock").exists():
            _remove_domains(h["uri"])
        _stop_pid(d / "libvirtd.pid")
        _stop_pid(d / "virtlogd.pid")
    for c in reversed(state["cgroups"]):
        _remove_cgroup(Path(c))
    for ns in state["netns"]:  # deleting a namespace deletes its end of the veth, and so the pair
        if Path(f"/run/netns/{ns}").exists():
            _run("ip", "netns", "del", ns, check=False)
    for h in state["hosts"]:
        shutil.rmtree(h["dir"], ignore_errors=True)
        shutil.rmtree(h["sockets"], ignore_errors=True)
    for vm in state["vms"]:
        (DISKS / f"{vm}.img").unlink(missing_ok=True)
    (CLUSTER_ROOT / "hosts").unlink(missing_ok=True)
    STATE_FILE.unlink(missing_ok=True)
    for p in (DISKS, CLUSTER_SOCKETS, CLUSTER_ROOT):
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    return len(state["hosts"])


def cluster_status() -> list[dict]:
    """One dict per lab host: name, addr, uri, up, and its VMs (name, state, memory, persistent)."""
    state = read_state()
    if state is None:
        return []
    lv = _libvirt()
    out = []
    for h in state["hosts"]:
        row = {"name": h["name"], "addr": h["addr"], "uri": h["uri"], "up": False, "vms": []}
        try:
            conn = lv.open(h["uri"])
        except lv.libvirtError:
            out.append(row)
            continue
        try:
            row["up"] = True
            for dom in conn.listAllDomains(0):
                st, _maxk, cur, _n, _t = dom.info()
                row["vms"].append({"name": dom.name(), "running": st == 1, "memory_mib": cur // 1024,
                                   "persistent": bool(dom.isPersistent())})
        finally:
            conn.close()
        out.append(row)
    return out

