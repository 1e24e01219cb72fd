"""``rescoin lab``: tiny real QEMU guests under libvirt, the guest agent inside.

The lab is for trying rescoin on real VMs on a machine without hardware
virtualisation (DESIGN.md section 13): software-emulated QEMU guests
(``<domain type='qemu'>``) that boot a Debian cloud kernel straight into a
busybox + Python initramfs. The initramfs starts the guest agent on the
virtio-serial port ``org.rescoin.agent.0`` and a load generator whose load
comes from the kernel command line (``rescoin.load=...``).

Pieces:

* :func:`build_image` builds and caches the guest kernel and initramfs under
  ``/var/lib/rescoin/lab/image/<key>/``; the key hashes every input, so a
  change to the agent, the load generator or the builder rebuilds.
* :func:`domain_xml` is the libvirt domain of one lab VM (pure; no I/O).
* :func:`lab_up`, :func:`lab_down`, :func:`lab_status` manage the VMs named
  ``rescoin-lab-N``.
* :func:`add_lab_parser` adds ``rescoin lab up|down|status|image``.

libvirt-python is imported lazily, so importing this module never needs it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from rescoin.errors import RescoinError
from rescoin.shipped import GUEST_AGENT_DIR

LAB_PREFIX = "rescoin-lab-"
LAB_ROOT = Path("/var/lib/rescoin/lab")
IMAGE_DIR = LAB_ROOT / "image"
DISK_DIR = LAB_ROOT / "disks"
LOG_DIR = LAB_ROOT / "logs"
SOCKET_DIR = Path("/run/rescoin/lab")
AGENT_CHANNEL = "org.rescoin.agent.0"
DEFAULT_URI = "qemu:///system"
DISK_MIB = 64
AGENT_TIMEOUT = 120.0          # seconds lab_up waits for every agent to answer
METADATA_NS = "https://rescoin.invalid/xmlns/lab/1"

AGENT_SOURCE = GUEST_AGENT_DIR / "rescoin_agent.py"
LOADGEN_SOURCE = GUEST_AGENT_DIR / "loadgen.py"

# name -> the load generator spec of each VM (VM i gets specs[i % len(specs)]);
# spec syntax: guest_agent/loadgen.py
SCENARIOS: dict[str, list[str]] = {
    "mixed": ["cpu:0.9", "cpu:0.9", "idle"],
    "cpu": ["cpu:0.9", "cpu:0.5", "cpu:0.2"],
    "memory": ["mem:grow:step=16,max=180,every=5", "idle"],
    "disk": ["disk:write:kibs=1024", "idle"],
    "idle": ["idle"],
}

Progress = Callable[[str], None]


class LabError(RescoinError):
    """A problem the operator can fix; the CLI prints it as one line and exits 2."""


def _quiet(msg: str) -> None:
    pass


# =============================================================================
# Guest image
# =============================================================================
IMAGE_FORMAT = 1               # bump when the builder changes what it produces
KERNEL_META = "linux-image-cloud-amd64"
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")
PYTHON = "python3.11"
# load order (DESIGN.md 13): virtio_ring before virtio; dependencies found in the
# modules' own .modinfo are loaded first anyway
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
           "virtio_balloon", "virtio_console", "virtio_blk")
# extension modules whose libraries are the interpreter's own plus these
PYTHON_EXTENSIONS_NEEDED = ("_json", "_hashlib")
# parts of the standard library the agent and the load generator never use
STDLIB_DROP = ("test", "idlelib", "ensurepip", "tkinter", "turtledemo", "lib2to3", "pydoc_data",
               "distutils", "venv", "sqlite3", "curses", "dbm", "unittest", "msilib", "__phello__",
               "config-3.11-x86_64-linux-gnu", "site-packages", "dist-packages",
               "turtle.py", "pydoc.py", "doctest.py", "tabnanny.py", "this.py", "antigravity.py",
               "_pydecimal.py", "pdb.py", "_sysconfigdata__x86_64-linux-gnu.py")
DYNLOAD_DROP = re.compile(r"^(_test|xx|_xx|_ctypes|_codecs_|_multibytecodec|audioop|ossaudiodev|nis|"
                          r"readline|_curses|_dbm|_gdbm|_sqlite3|_tkinter|_crypt|_lsprof)")
BUSYBOX = Path("/bin/busybox")

INIT_SCRIPT = r"""#!/bin/sh
# /init of a rescoin lab guest (written by rescoin.lab.build_image)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
fail() { echo "init: FATAL: $*"; sleep 1; poweroff -f; }
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
if [ -d /sys/fs/cgroup ]; then mount -t tmpfs cgroup /sys/fs/cgroup 2>/dev/null; fi
[ -r /proc/pressure/memory ] || echo "init: no /proc/pressure (PSI off)"
for m in $(cat /etc/rescoin/modules); do
    insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed"
done
NAME=rescoin-lab
LOAD=idle
for w in $(cat /proc/cmdline); do
    case "$w" in
        rescoin.load=*) LOAD="${w#rescoin.load=}" ;;
        rescoin.name=*) NAME="${w#rescoin.name=}" ;;
    esac
done
hostname "$NAME"
ip link set lo up 2>/dev/null
port=""
i=0
while [ $i -lt 200 ]; do
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat "$d/name" 2>/dev/null)" = "@CHANNEL@" ] && port="/dev/${d##*/}"
    done
    [ -n "$port" ] && [ -e "$port" ] && break
    port=""
    sleep 0.1
    i=$((i + 1))
done
[ -n "$port" ] || fail "no virtio-serial port named @CHANNEL@"
echo "init: agent port $port, load $LOAD"
(
    while :; do
        if [ -e /tmp/agent.disabled ]; then sleep 1; continue; fi
        python3 /opt/rescoin/rescoin_agent.py --transport virtio --test-hooks
        echo "init: agent exited with status $?, restarting in 1 s"
        sleep 1
    done
) &
python3 /opt/rescoin/loadgen.py "$LOAD" &
echo "init: up after $(cut -d' ' -f1 /proc/uptime) s"
while :; do sleep 3600; done
""".replace("@CHANNEL@", AGENT_CHANNEL)


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot ``kernel`` with ``initrd``."""

    kernel: Path
    initrd: Path
    key: str
    manifest: dict


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise LabError(f"{what}: {cmd[0]} not found (run scripts/setup-host)") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(f"{what} failed: {detail[-1] if detail else f'exit status {done.returncode}'}")
    return done.stdout


def _resolve_packages(say: Progress) -> dict[str, str]:
    """Package name -> version for the kernel (the real package behind the
    ``linux-image-cloud-amd64`` meta package) and the Python packages."""

    def query() -> dict[str, str]:
        deps = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True)
        m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", deps.stdout)
        if not m:
            return {}
        names = [m.group(1), *PYTHON_PACKAGES]
        show = subprocess.run(["apt-cache", "show", "--no-all-versions", *names], capture_output=True, text=True)
        found: dict[str, str] = {}
        for block in show.stdout.split("\n\n"):
            pkg = re.search(r"^Package: (\S+)", block, re.M)
            ver = re.search(r"^Version: (\S+)", block, re.M)
            if pkg and ver and pkg.group(1) in names:
                found.setdefault(pkg.group(1), ver.group(1))
        return found if len(found) == len(names) else {}

    try:
        found = query()
        if not found and os.geteuid() == 0:
            say("package lists do not know the guest packages; running apt-get update")
            _run(["apt-get", "update", "-q"], "apt-get update")
            found = query()
    except FileNotFoundError:
        raise LabError("apt-cache not found: the guest image is built from Debian packages") from None
    if not found:
        raise LabError(f"apt cannot find {KERNEL_META} and {', '.join(PYTHON_PACKAGES)} "
                       "(run 'apt-get update' as root; the Debian main archive must be reachable)")
    return found


def _fetch_debs(packages: dict[str, str], debs: Path, say: Progress) -> list[Path]:
    """The .deb files of these exact versions, downloaded once into ``debs``."""
    debs.mkdir(parents=True, exist_ok=True)
    have = {}
    for f in debs.glob("*.deb"):
        name, _, rest = f.name.partition("_")
        have[(name, rest.rsplit("_", 1)[0].replace("%3a", ":"))] = f
    missing = [p for p, v in packages.items() if (p, v) not in have]
    if missing:
        say(f"downloading {', '.join(missing)}")
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            try:                    # let apt's unprivileged download user write here
                shutil.chown(tmp, user="_apt")
            except (LookupError, PermissionError, OSError):
                pass
            _run(["apt-get", "download", "-q", *(f"{p}={packages[p]}" for p in missing)],
                 "apt-get download", cwd=Path(tmp))
            for f in Path(tmp).glob("*.deb"):
                name, _, rest = f.name.partition("_")
                target = debs / f.name
                os.replace(f, target)
                have[(name, rest.rsplit("_", 1)[0].replace("%3a", ":"))] = target
        for old in debs.glob("*.deb"):   # drop superseded versions of the same packages
            name = old.name.partition("_")[0]
            if name in packages and old not in {have.get((name, packages[name]))}:
                old.unlink(missing_ok=True)
    try:
        return [have[(p, v)] for p, v in packages.items()]
    except KeyError as e:
        raise LabError(f"apt-get download did not produce {e.args[0][0]} {e.args[0][1]}") from None


def _modinfo(ko: bytes) -> dict[str, str]:
    """key=value strings of a kernel module's .modinfo section (good enough: the
    keys we read, ``depends`` and ``name``, do not occur elsewhere)."""
    out = {}
    for m in re.finditer(rb"(?:^|\x00)(depends|name|vermagic)=([^\x00]*)", ko):
        out.setdefault(m.group(1).decode(), m.group(2).decode(errors="replace"))
    return out


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma  # not in every Python build; only needed for compressed modules

        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _collect_modules(kroot: Path, wanted: Iterable[str]) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(name, uncompressed .ko) in load order (dependencies first), and the
    wanted modules that are built into the kernel."""
    moddir = next(kroot.glob("lib/modules/*/kernel")).parent
    builtin_text = (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else ""
    builtin = {Path(line).name.split(".ko")[0].replace("-", "_") for line in builtin_text.split()}
    files = {}
    for f in moddir.rglob("*.ko*"):
        files.setdefault(f.name.split(".ko")[0].replace("-", "_"), f)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    builtin_hit: list[str] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name in builtin:
            builtin_hit.append(name)
            return
        if name not in files:
            raise LabError(f"kernel module {name} ({' <- '.join(chain) or 'wanted'}) is not in {moddir.name}")
        data = _read_module(files[name])
        for dep in filter(None, _modinfo(data).get("depends", "").split(",")):
            add(dep, (name, *chain))
        order.append((name, data))

    for name in wanted:
        add(name, ())
    return order, builtin_hit


def _ldd(path: Path, env: dict | None = None) -> dict[str, str]:
    """soname -> resolved path ("" when not found), the loader under its own path."""
    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env)
    libs = {}
    for line in done.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            soname, _, rest = line.partition("=>")
            target = rest.strip().split(" (")[0].strip()
            libs[soname.strip()] = "" if target == "not found" else target
        elif line.startswith("/"):
            loader = line.split(" (")[0].strip()
            libs[loader] = loader
    return libs


class _Cpio:
    """A newc cpio archive (what the kernel unpacks as initramfs), written in
    order, owned by root, with fixed timestamps so equal inputs give equal bytes."""

    MTIME = 1700000000

    def __init__(self, out) -> None:
        self.out = out
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, self.MTIME, len(data), 0, 0,
                  rdev[0], rdev[1], len(name) + 1, 0)
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
        self.out.write(head + b"\0" * (-len(head) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.dir(os.path.dirname(name))
        self.dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def node(self, name: str, kind: int, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, kind | mode, rdev=(major, minor))

    def tree(self, root: Path, prefix: str) -> None:
        """Every file, link and directory under ``root``, placed under ``prefix``."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            base = prefix if rel == "." else f"{prefix}/{rel}"
            self.dir(base)
            for d in list(dirnames):
                p = Path(dirpath, d)
                if p.is_symlink():
                    dirnames.remove(d)
                    self.symlink(f"{base}/{d}", os.readlink(p))
            for f in sorted(filenames):
                p = Path(dirpath, f)
                if p.is_symlink():
                    self.symlink(f"{base}/{f}", os.readlink(p))
                else:
                    self.file(f"{base}/{f}", p.read_bytes(), p.stat().st_mode & 0o777)

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def _image_key(agent: Path, packages: dict[str, str]) -> str:
    h = hashlib.sha256()
    parts = [f"format={IMAGE_FORMAT}", f"modules={MODULES}", f"packages={sorted(packages.items())}",
             f"drop={STDLIB_DROP}", f"dynload={DYNLOAD_DROP.pattern}", f"ext={PYTHON_EXTENSIONS_NEEDED}",
             INIT_SCRIPT]
    for p in parts:
        h.update(p.encode() + b"\0")
    for path in (agent, LOADGEN_SOURCE):
        h.update(path.read_bytes() + b"\0")
    st = BUSYBOX.stat()
    h.update(f"busybox={st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _host_files_unchanged(manifest: dict) -> bool:
    for path, (size, mtime) in manifest.get("host_files", {}).items():
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size != size or st.st_mtime_ns != mtime:
            return False
    return True


def build_image(agent: str | Path | None = None, *, force: bool = False, refresh: bool = False,
                cache_dir: str | Path = IMAGE_DIR, progress: Progress | None = None) -> GuestImage:
    """The guest kernel and initramfs, built once and cached.

    ``agent`` is the guest agent script to put at /opt/rescoin/rescoin_agent.py
    (default: this checkout's ``guest_agent/rescoin_agent.py``). ``refresh``
    asks apt again which kernel and Python versions to use (otherwise the
    versions found by the first build are kept); ``force`` rebuilds even when
    the cache holds this image. Needs write access to ``cache_dir`` and apt.
    """
    say = progress or _quiet
    agent = Path(agent) if agent is not None else AGENT_SOURCE
    cache = Path(cache_dir)
    for p, what in ((agent, "guest agent"), (LOADGEN_SOURCE, "load generator"), (BUSYBOX, "busybox")):
        if not p.is_file():
            hint = " (apt-get install busybox-static, or run scripts/setup-host)" if p == BUSYBOX else ""
            raise LabError(f"{what} not found at {p}{hint}")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(f"cannot create the image cache {cache}: {e.strerror} (run as root)") from None
    if not os.access(cache, os.W_OK):
        raise LabError(f"cannot write the image cache {cache} (run as root)")

    pinned = cache / "packages.json"
    packages = None
    if pinned.exists() and not refresh:
        try:
            packages = json.loads(pinned.read_text())
        except ValueError:
            packages = None
    if not packages:
        packages = _resolve_packages(say)
        _atomic_write(pinned, json.dumps(packages, indent=1, sort_keys=True).encode())
    key = _image_key(agent, packages)
    out = cache / key

    def cached() -> GuestImage | None:
        try:
            manifest = json.loads((out / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        if not _host_files_unchanged(manifest):
            return None
        return GuestImage(out / "vmlinuz", out / "initrd.gz", key, manifest)

    if not force and (hit := cached()):
        return hit
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one builder at a time
        if not force and (hit := cached()):       # somebody else just built it
            return hit
        t0 = time.monotonic()
        say(f"building guest image {key} in {out}")
        debs = _fetch_debs(packages, cache / "debs", say)
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".build-{key}-") as tmp:
            stage = Path(tmp)
            manifest = _build(agent, packages, debs, stage, say)
            manifest.update(key=key, build_seconds=round(time.monotonic() - t0, 1),
                            built=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            (stage / "out" / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
            if out.exists():
                shutil.rmtree(out)
            os.replace(stage / "out", out)
        _prune(cache, keep=out)
        say(f"guest image ready in {manifest['build_seconds']:.1f} s: initramfs "
            f"{manifest['initrd_bytes'] / 2**20:.1f} MiB, kernel {manifest['kernel_bytes'] / 2**20:.1f} MiB")
        return GuestImage(out / "vmlinuz", out / "initrd.gz", key, manifest)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _prune(cache: Path, keep: Path, how_many: int = 3) -> None:
    """Keep the newest few images (running VMs may still use the previous one)."""
    images = sorted((p for p in cache.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{16}", p.name)),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[how_many:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _build(agent: Path, packages: dict[str, str], debs: list[Path], stage: Path, say: Progress) -> dict:
    pkgroot = stage / "pkgroot"
    for deb in debs:
        say(f"unpacking {deb.name}")
        _run(["dpkg-deb", "-x", str(deb), str(pkgroot)], f"dpkg -x {deb.name}")
    (stage / "out").mkdir()

    # kernel and modules
    kernel = next(pkgroot.glob("boot/vmlinuz-*"), None)
    if kernel is None:
        raise LabError("the kernel package has no /boot/vmlinuz-*")
    kver = kernel.name[len("vmlinuz-"):]
    shutil.copyfile(kernel, stage / "out" / "vmlinuz")
    modules, builtin = _collect_modules(pkgroot, MODULES)
    say(f"kernel {kver}: modules {' '.join(n for n, _ in modules)}"
        + (f" (built in: {' '.join(builtin)})" if builtin else ""))

    # python: drop what the agent and the load generator never use
    pylib = pkgroot / "usr" / "lib" / PYTHON
    pybin = pkgroot / "usr" / "bin" / PYTHON
    for name in STDLIB_DROP:
        p = pylib / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for p in list(pylib.rglob("__pycache__")):
        shutil.rmtree(p, ignore_errors=True)
    dynload = pylib / "lib-dynload"
    for so in dynload.glob("*.so"):
        if DYNLOAD_DROP.match(so.name):
            so.unlink()

    # shared libraries: what python and the extensions the agent needs link to
    needed: dict[str, str] = {}
    for path in [pybin, *(next(dynload.glob(f"{e}.*.so")) for e in PYTHON_EXTENSIONS_NEEDED)]:
        for soname, target in _ldd(path).items():
            if not target:
                raise LabError(f"{path.name} needs {soname}, which this host does not have "
                               "(install the Debian package that ships it)")
            needed[soname] = target
    dropped = []
    for so in sorted(dynload.glob("*.so")):     # extensions needing anything else cannot load
        if any(s not in needed for s in _ldd(so)):
            so.unlink()
            dropped.append(so.name.split(".")[0])
    if dropped:
        say(f"python extensions left out (their libraries are not in the image): {' '.join(dropped)}")

    # byte-compile with the guest's own interpreter (same magic number, same
    # paths as in the guest); unchecked-hash pycs never look at timestamps
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    say("byte-compiling the standard library")
    _run([str(pybin), "-E", "-S", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
          "-s", str(pkgroot), "-p", "/", str(pylib)], "byte-compiling the standard library", env=env)
    # check the result imports what the agent needs, with the libraries we ship
    _run([str(pybin), "-E", "-S", "-c", "import json, hashlib, hmac, socket, select, argparse, threading; "
          "hashlib.sha256; json.dumps({})"], "testing the guest python", env=env)

    # initramfs
    say("writing the initramfs")
    raw = io.BytesIO()
    cpio = _Cpio(raw)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root", "var/log",
              "etc/rescoin", "opt/rescoin", "lib/modules", "lib64"):
        cpio.dir(d)
    cpio.node("dev/console", stat.S_IFCHR, 5, 1)
    cpio.node("dev/null", stat.S_IFCHR, 1, 3, 0o666)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            cpio.symlink(applet, "/bin/busybox")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/rescoin/modules", "".join(f"{n}\n" for n, _ in modules).encode())
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file(f"usr/bin/{PYTHON}", pybin.read_bytes(), 0o755)
    cpio.symlink("usr/bin/python3", PYTHON)
    cpio.tree(pylib, f"usr/lib/{PYTHON}")
    host_files = {}
    for soname, target in sorted(needed.items()):
        real = os.path.realpath(target)
        st = os.stat(real)
        host_files[real] = [st.st_size, st.st_mtime_ns]
        cpio.file(target, Path(real).read_bytes(), 0o755)
    cpio.file("opt/rescoin/rescoin_agent.py", agent.read_bytes(), 0o755)
    cpio.file("opt/rescoin/loadgen.py", LOADGEN_SOURCE.read_bytes(), 0o755)
    cpio.close()
    initrd = stage / "out" / "initrd.gz"
    with open(initrd, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(raw.getvalue())
    st = BUSYBOX.stat()
    return {
        "packages": packages,
        "kernel_version": kver,
        "modules": [n for n, _ in modules],
        "builtin_modules": builtin,
        "libraries": sorted(needed),
        "python_extensions_dropped": dropped,
        "host_files": host_files,
        "busybox": [st.st_size, st.st_mtime_ns],
        "initrd_bytes": initrd.stat().st_size,
        "initrd_uncompressed_bytes": len(raw.getvalue()),
        "kernel_bytes": (stage / "out" / "vmlinuz").stat().st_size,
    }


# =============================================================================
# Domain XML
# =============================================================================
def kernel_cmdline(name: str | None = None, load: str | None = None, extra: str = "") -> str:
    """The guest kernel command line: serial console, quiet, PSI on, the VM's
    name and load spec, then ``extra`` (whose keys win over the defaults)."""
    words = ["console=ttyS0", "quiet", "psi=1"]
    if name:
        words.append(f"rescoin.name={name}")
    if load:
        if any(c.isspace() for c in load):
            raise ValueError(f"a load spec cannot contain spaces: {load!r}")
        words.append(f"rescoin.load={load}")
    extra_words = extra.split()
    extra_keys = {w.split("=", 1)[0] for w in extra_words}
    return " ".join([w for w in words if w.split("=", 1)[0] not in extra_keys] + extra_words)


def domain_xml(name: str, kernel: str | Path, initrd: str | Path, disk: str | Path, agent_socket: str | Path,
               memory_mib: int = 256, max_memory_mib: int = 384, vcpus: int = 1, cmdline: str = "",
               uuid: str | None = None, *, load: str | None = None, console_log: str | Path | None = None,
               disk_cache: str = "none") -> str:
    """The libvirt domain of one lab VM.

    Software-emulated (``type='qemu'``; KVM hangs on these machines), direct
    kernel boot, a virtio balloon with a 2 s stats period, a small raw virtio
    disk, the serial console into ``console_log`` (default
    ``/var/lib/rescoin/lab/logs/<name>.console.log``) and the agent's
    virtio-serial channel bound to the host UNIX socket ``agent_socket``.
    ``cmdline`` is added to the default kernel command line
    (``console=ttyS0 quiet psi=1 rescoin.name=<name>``); ``load`` adds
    ``rescoin.load=<load>``. ``disk_cache`` is libvirt's cache mode
    (``none`` = O_DIRECT on the host, so blkio weights see the I/O).
    """
    if memory_mib < 32 or max_memory_mib < memory_mib:
        raise ValueError(f"need 32 <= memory ({memory_mib}) <= max memory ({max_memory_mib}) MiB")
    if vcpus < 1:
        raise ValueError(f"vcpus must be >= 1, got {vcpus}")
    console_log = console_log if console_log is not None else LOG_DIR / f"{name}.console.log"
    a = lambda v: quoteattr(str(v))  # noqa: E731 - attribute values, quoted and escaped
    t = lambda v: escape(str(v))     # noqa: E731 - text content
    io_attr = " io='native'" if disk_cache in ("none", "directsync") else ""
    uuid_line = f"\n  <uuid>{t(uuid)}</uuid>" if uuid else ""
    load_meta = f"<load>{t(load)}</load>" if load else ""
    return f"""<domain type='qemu'>
  <name>{t(name)}</name>{uuid_line}
  <title>rescoin lab VM</title>
  <metadata>
    <lab:lab xmlns:lab={a(METADATA_NS)}>{load_meta}</lab:lab>
  </metadata>
  <memory unit='MiB'>{int(max_memory_mib)}</memory>
  <currentMemory unit='MiB'>{int(memory_mib)}</currentMemory>
  <vcpu placement='static'>{int(vcpus)}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{t(kernel)}</kernel>
    <initrd>{t(initrd)}</initrd>
    <cmdline>{t(kernel_cmdline(name, load, cmdline))}</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache={a(disk_cache)}{io_attr}/>
      <source file={a(disk)}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path={a(console_log)}/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={a(console_log)}/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path={a(agent_socket)}/>
      <target type='virtio' name={a(AGENT_CHANNEL)}/>
    </channel>
    <memballoon model='virtio'>
      <stats period='2'/>
    </memballoon>
  </devices>
</domain>
"""


# =============================================================================
# Talking to the guest agent
# =============================================================================
def agent_request(path: str | Path, op: str = "stats", timeout: float = 2.0, max_bytes: int = 65536,
                  **fields) -> dict | None:
    """Send one request to the agent behind the channel socket ``path`` and
    return its JSON reply, or None (no socket, no answer in time, not JSON).
    Replies carrying another request's nonce (left over from an earlier
    connection) are skipped."""
    nonce = uuidlib.uuid4().hex[:16]
    request = json.dumps({"op": op, "nonce": nonce, **fields}) + "\n"
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(request.encode())
            buf = b""
            while time.monotonic() < deadline:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    return None
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        reply = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(reply, dict) and reply.get("nonce", nonce) == nonce:
                        return reply
                if len(buf) > max_bytes:
                    return None
    except (TimeoutError, OSError):
        return None
    return None


# =============================================================================
# The lab
# =============================================================================
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


def _check_scenario(scenario: str) -> list[str]:
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
    say = progress or _quiet
    specs = _check_scenario(scenario)
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
            if agent_request(sock, timeout=min(2.0, max(0.1, deadline - time.monotonic()))) is not None:
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
            reply = agent_request(sock_path, timeout=agent_timeout) if state == 1 else None
            total = (reply or {}).get("mem", {}).get("total_kib") if isinstance(reply, dict) else None
            rows.append({
                "name": dom.name(),
                "uuid": dom.UUIDString(),
                "state": _STATES.get(state, str(state)),
                "vcpus": ncpu,
                "memory_mib": cur_kib // 1024,
                "max_memory_mib": max_kib // 1024,
                "load": load or "idle",
                "agent": reply is not None,
                "agent_mem_total_mib": round(total / 1024) if isinstance(total, (int, float)) else None,
                "agent_socket": sock_path,
                "console_log": str(LOG_DIR / f"{dom.name()}.console.log"),
            })
        return rows
    finally:
        conn.close()


# =============================================================================
# Command line: rescoin lab ...
# =============================================================================
def _stderr(msg: str) -> None:
    print(f"rescoin lab: {msg}", file=sys.stderr, flush=True)


def _cli(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except LabError as e:
            print(f"rescoin: error: {e}", file=sys.stderr)
            return 2
    return run


def _cmd_up(args: argparse.Namespace) -> int:
    _check_scenario(args.scenario)
    t0 = time.monotonic()
    names = lab_up(args.vms, args.scenario, args.uri, args.memory, args.max_memory, args.vcpus,
                   wait_agent=not args.no_wait, progress=_stderr, timeout=args.timeout, agent=args.agent)
    print(f"lab up in {time.monotonic() - t0:.1f} s: {' '.join(names)}")
    print(f"agent sockets: {SOCKET_DIR}/<name>.agent   console logs: {LOG_DIR}/<name>.console.log")
    print("remove with: rescoin lab down")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    n = lab_down(args.uri)
    print(f"removed {n} lab VM(s)" if n else "no lab VMs")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    rows = lab_status(args.uri)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no lab VMs (start them with: rescoin lab up)")
        return 0
    head = f"{'NAME':<16} {'STATE':<10} {'VCPUS':>5} {'MEM MiB':>12} {'GUEST MiB':>9}  {'AGENT':<5}  LOAD"
    print(head)
    for r in rows:
        guest = "-" if r["agent_mem_total_mib"] is None else str(r["agent_mem_total_mib"])
        print(f"{r['name']:<16} {r['state']:<10} {r['vcpus']:>5} {r['memory_mib']:>5}/{r['max_memory_mib']:<6} "
              f"{guest:>9}  {'ok' if r['agent'] else '-':<5}  {r['load']}")
    return 0


def _cmd_image(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    image = build_image(agent=args.agent, force=args.force, refresh=args.refresh, progress=_stderr)
    m = image.manifest
    print(f"kernel {image.kernel} ({m['kernel_version']})")
    print(f"initrd {image.initrd} ({m['initrd_bytes'] / 2**20:.1f} MiB)")
    print(f"done in {time.monotonic() - t0:.2f} s")
    return 0


def add_lab_parser(subparsers) -> None:
    """Add ``lab up|down|status|image`` to an argparse sub-parser set; each
    action sets ``func`` (args -> exit code; errors print one line and give 2)."""
    scenarios = "; ".join(f"{k}: {' / '.join(v)}" for k, v in SCENARIOS.items())
    lab = subparsers.add_parser(
        "lab", help="real tiny QEMU guests under libvirt with the guest agent inside",
        description="Run a few tiny software-emulated QEMU guests under libvirt (qemu:///system), each "
                    "with the rescoin guest agent and a load generator inside. Needs root and a running "
                    "libvirtd: see scripts/setup-host.")
    actions = lab.add_subparsers(dest="lab_action", metavar="ACTION")
    lab.set_defaults(func=lambda _args: (lab.print_help(sys.stderr), 2)[1])

    def uri(p: argparse.ArgumentParser) -> None:
        p.add_argument("--uri", default=DEFAULT_URI, help=f"libvirt connection URI (default {DEFAULT_URI})")

    up = actions.add_parser("up", help="build the guest image if needed, start the lab VMs, wait for their agents",
                            description="Start lab VMs rescoin-lab-0..N-1 (lab VMs left from before are "
                                        "removed first) and wait until every guest agent answers. "
                                        f"Scenarios (load of VM i = entry i mod length): {scenarios}.")
    up.add_argument("--vms", type=int, default=3, help="how many VMs (default 3)")
    up.add_argument("--scenario", default="mixed", metavar="NAME",
                    help=f"load scenario: {', '.join(SCENARIOS)} (default mixed)")
    uri(up)
    up.add_argument("--memory", type=int, default=256, metavar="MiB", help="initial balloon size (default 256)")
    up.add_argument("--max-memory", type=int, default=384, metavar="MiB", help="maximum memory (default 384)")
    up.add_argument("--vcpus", type=int, default=1, help="vCPUs per VM (default 1)")
    up.add_argument("--timeout", type=float, default=AGENT_TIMEOUT,
                    help=f"seconds to wait for the agents (default {AGENT_TIMEOUT:.0f})")
    up.add_argument("--no-wait", action="store_true", help="do not wait for the agents to answer")
    up.add_argument("--agent", metavar="PATH", help=argparse.SUPPRESS)
    up.set_defaults(func=_cli(_cmd_up))

    down = actions.add_parser("down", help="destroy and undefine every lab VM, remove disks and sockets",
                              description="Destroy and undefine every rescoin-lab-* domain and remove their "
                                          "disks and agent sockets. Safe to run again.")
    uri(down)
    down.set_defaults(func=_cli(_cmd_down))

    status = actions.add_parser("status", help="list the lab VMs, their memory and whether their agents answer",
                                description="One line per lab VM: state, vCPUs, balloon/max memory, the "
                                            "guest's MemTotal as its agent reports it, and its load.")
    uri(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_cli(_cmd_status))

    image = actions.add_parser("image", help="build (or show the cached) guest kernel and initramfs",
                               description=f"Build the guest image into {IMAGE_DIR}/<key>/ from Debian "
                                           "packages (apt-get download); cached by a hash of its inputs.")
    image.add_argument("--force", action="store_true", help="rebuild even if cached")
    image.add_argument("--refresh", action="store_true",
                       help="ask apt again for the newest kernel and Python packages")
    image.add_argument("--agent", metavar="PATH", help="guest agent script to put in the image "
                                                       "(default guest_agent/rescoin_agent.py)")
    image.set_defaults(func=_cli(_cmd_image))


def main(argv: list[str] | None = None) -> int:
    """``python -m rescoin.lab ACTION ...`` (the same as ``rescoin lab ACTION ...``)."""
    parser = argparse.ArgumentParser(prog="python -m rescoin.lab")
    add_lab_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
