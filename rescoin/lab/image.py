"""The guest image: a Debian cloud kernel and a busybox + Python initramfs, built from apt packages and cached."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rescoin.lab.apt import fetch_debs, resolve_packages, run
from rescoin.lab.base import (
    AGENT_CHANNEL,
    AGENT_SOURCE,
    IMAGE_DIR,
    LOADGEN_SOURCE,
    LabError,
    Progress,
    quiet,
)
from rescoin.lab.cpio import Cpio

IMAGE_FORMAT = 1               # bump when the builder changes what it produces
PYTHON = "python3.11"
# load order (README, "Trying it on real VMs: the lab"): virtio_ring before virtio; dependencies found in the
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


def _modinfo(ko: bytes) -> dict[str, str]:
    """key=value strings of a kernel module's .modinfo section (good enough: the
    keys we read, ``depends`` and ``name``, do not occur elsewhere)."""
    out: dict[str, str] = {}
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
    files: dict[str, Path] = {}
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
    say = progress or quiet
    agent = Path(agent) if agent is not None else AGENT_SOURCE
    cache = Path(cache_dir)
    _check_inputs(agent, cache)
    packages = _pinned_packages(cache, refresh, say)
    key = _image_key(agent, packages)
    out = cache / key
    if not force and (hit := _cached(out, key)):
        return hit
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # one builder at a time
        if not force and (hit := _cached(out, key)):       # somebody else just built it
            return hit
        return _build_into(out, agent, packages, say)


def _check_inputs(agent: Path, cache: Path) -> None:
    """Fail early, with a hint, when an input is missing or the cache is not writable."""
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


def _pinned_packages(cache: Path, refresh: bool, say: Progress) -> dict[str, str]:
    """The package versions the first build chose (kept in the cache), or apt's newest with ``refresh``."""
    pinned = cache / "packages.json"
    packages = None
    if pinned.exists() and not refresh:
        try:
            packages = json.loads(pinned.read_text())
        except ValueError:
            packages = None
    if not packages:
        packages = resolve_packages(say)
        _atomic_write(pinned, json.dumps(packages, indent=1, sort_keys=True).encode())
    return packages


def _cached(out: Path, key: str) -> GuestImage | None:
    """The image in ``out`` if it is complete and the host files it copied have not changed."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not _host_files_unchanged(manifest):
        return None
    return GuestImage(out / "vmlinuz", out / "initrd.gz", key, manifest)


def _build_into(out: Path, agent: Path, packages: dict[str, str], say: Progress) -> GuestImage:
    """Build the image in a staging directory next to ``out``, then move it into place (under the lock)."""
    cache, key = out.parent, out.name
    t0 = time.monotonic()
    say(f"building guest image {key} in {out}")
    debs = fetch_debs(packages, cache / "debs", say)
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
    """Unpack the packages into ``stage`` and make ``stage/out/{vmlinuz,initrd.gz}``; returns the manifest."""
    pkgroot = stage / "pkgroot"
    for deb in debs:
        say(f"unpacking {deb.name}")
        run(["dpkg-deb", "-x", str(deb), str(pkgroot)], f"dpkg -x {deb.name}")
    (stage / "out").mkdir()
    kver, modules, builtin = _take_kernel(pkgroot, stage / "out" / "vmlinuz", say)
    pylib = pkgroot / "usr" / "lib" / PYTHON
    pybin = pkgroot / "usr" / "bin" / PYTHON
    dynload = _trim_python(pylib)
    needed, dropped = _shared_libraries(pybin, dynload, say)
    _compile_python(pkgroot, pybin, pylib, say)
    say("writing the initramfs")
    raw = io.BytesIO()
    host_files = _write_initramfs(Cpio(raw), agent, modules, pybin, pylib, needed)
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


def _take_kernel(pkgroot: Path, vmlinuz: Path, say: Progress) -> tuple[str, list[tuple[str, bytes]], list[str]]:
    """Copy the kernel to ``vmlinuz``; returns its version, the modules to load and those built in."""
    kernel = next(pkgroot.glob("boot/vmlinuz-*"), None)
    if kernel is None:
        raise LabError("the kernel package has no /boot/vmlinuz-*")
    kver = kernel.name[len("vmlinuz-"):]
    shutil.copyfile(kernel, vmlinuz)
    modules, builtin = _collect_modules(pkgroot, MODULES)
    say(f"kernel {kver}: modules {' '.join(n for n, _ in modules)}"
        + (f" (built in: {' '.join(builtin)})" if builtin else ""))
    return kver, modules, builtin


def _trim_python(pylib: Path) -> Path:
    """Drop what the agent and the load generator never use; returns lib-dynload."""
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
    return dynload


def _shared_libraries(pybin: Path, dynload: Path, say: Progress) -> tuple[dict[str, str], list[str]]:
    """The host libraries python and the extensions the agent needs link to (soname -> path),
    and the extensions left out because they need anything else."""
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
    return needed, dropped


def _compile_python(pkgroot: Path, pybin: Path, pylib: Path, say: Progress) -> None:
    """Byte-compile with the guest's own interpreter (same magic number, same
    paths as in the guest; unchecked-hash pycs never look at timestamps), then
    check it imports what the agent needs, with the libraries we ship."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    say("byte-compiling the standard library")
    run([str(pybin), "-E", "-S", "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
          "-s", str(pkgroot), "-p", "/", str(pylib)], "byte-compiling the standard library", env=env)
    run([str(pybin), "-E", "-S", "-c", "import json, hashlib, hmac, socket, select, argparse, threading; "
          "hashlib.sha256; json.dumps({})"], "testing the guest python", env=env)


def _write_initramfs(cpio: Cpio, agent: Path, modules: list[tuple[str, bytes]], pybin: Path, pylib: Path,
                     needed: dict[str, str]) -> dict[str, list[int]]:
    """Write the whole initramfs into ``cpio`` (and close it); returns the host
    files copied in (path -> [size, mtime_ns]) so a change to them rebuilds."""
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
    host_files: dict[str, list[int]] = {}
    for target in (needed[soname] for soname in sorted(needed)):
        real = os.path.realpath(target)
        st = os.stat(real)
        host_files[real] = [st.st_size, st.st_mtime_ns]
        cpio.file(target, Path(real).read_bytes(), 0o755)
    cpio.file("opt/rescoin/rescoin_agent.py", agent.read_bytes(), 0o755)
    cpio.file("opt/rescoin/loadgen.py", LOADGEN_SOURCE.read_bytes(), 0o755)
    cpio.close()
    return host_files
