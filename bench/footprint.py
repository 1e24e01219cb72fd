"""Guest memory footprint on a real QEMU guest: the calibration of rescoin/hosts/simmemory.py.

    sudo .venv/bin/python bench/footprint.py [--uri qemu:///system] [--keep] [--out samples.json]

Boots one lab guest (the project's lab image and domain, 1 vCPU, 1 GiB by
default) with bench/footprint_guest.py in place of the load generator and a
second virtio-serial port to drive it, samples the QEMU process's VmRSS
(host side, /proc/PID/status) every 0.5 s, and measures:

1. page cache fill: buffered read of the guest's disk -> RSS growth per MiB read (io_growth);
2. allocate, touch and free N MiB -> how much of it the host keeps;
3. idle growth of a settled guest -> MiB/hour and share of the gap (limit - RSS) per hour;
4. balloon reclaim: a lower live balloon target -> how fast RSS falls, where it ends, guest MemTotal.

Prints one JSON object; the raw samples go to --out. The guest and its files
are removed at the end (--keep leaves the guest running). Needs root and a
libvirtd (scripts/setup-host). Rerunnable: a guest left from before is removed first.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import io
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from rescoin.lab import LAB_ROOT, Cpio, build_image, domain_xml

NAME = "rescoin-footprint"
WORK = LAB_ROOT / "footprint"
PORT = "org.rescoin.footprint.0"
GUEST_SCRIPT = Path(__file__).with_name("footprint_guest.py")
MIB = 1 << 20


class Sampler(threading.Thread):
    """VmRSS of one process every ``every`` s, tagged with the phase running then."""

    def __init__(self, pid: int, ram_mib: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.ram_mib, self.every, self.phase = pid, ram_mib, every, "boot"
        self.samples: list[tuple[float, float, str]] = []
        self.ram: list[float] = []      # Rss of the guest-RAM mapping alone, per sample
        self.t0 = time.monotonic()
        self.stop_event = threading.Event()

    def rss(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS")

    def ram_rss(self) -> float:
        """Rss (MiB) of the guest's RAM mapping: the writable, non-executable anonymous
        mapping of the guest's size (QEMU's own heap and TCG code buffer are the rest of VmRSS)."""
        size = rss = 0
        best = -1.0
        with open(f"/proc/{self.pid}/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                    lo, hi = line.split()[0].split("-")
                    size = (int(hi, 16) - int(lo, 16)) // MIB if "x" not in line.split()[1] else 0
                elif line.startswith("Rss:") and self.ram_mib <= size <= self.ram_mib + 64:
                    rss = int(line.split()[1])
                    best = max(best, rss / 1024.0)
        return best

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.samples.append((round(time.monotonic() - self.t0, 2), round(self.rss(), 1), self.phase))
                self.ram.append(round(self.ram_rss(), 1))
            except (OSError, RuntimeError):
                return
            self.stop_event.wait(self.every)

    def now(self) -> float:
        return self.samples[-1][1] if self.samples else self.rss()

    def ram_now(self) -> float:
        return self.ram[-1] if self.ram else self.ram_rss()

    def of(self, phase: str) -> list[tuple[float, float]]:
        return [(t, r) for t, r, p in self.samples if p == phase]


class Guest:
    """JSON-line requests to footprint_guest.py over the extra channel's UNIX socket."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.buf = b""
        self.next_id = 0

    def ask(self, timeout: float = 300.0, **req) -> dict:
        self.next_id += 1
        self.sock.settimeout(timeout)
        self.sock.sendall((json.dumps({**req, "id": self.next_id}) + "\n").encode())
        reply: dict = {}
        while reply.get("id") != self.next_id:     # skip answers to requests that timed out
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise RuntimeError("guest channel closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"guest: {reply['error']}")
        return reply

    def wait_ready(self, timeout: float = 180.0) -> dict:
        """The first meminfo; retried because the guest opens its port some seconds after boot."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ask(timeout=5.0, op="meminfo")["meminfo"]
            except (TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise


def overlay_initrd(base: Path, out: Path, script: Path = GUEST_SCRIPT) -> None:
    """The lab initrd plus a second archive whose loadgen.py is ``script`` (the footprint helper),
    with footprint_guest.py beside it for scripts that import it (the kernel unpacks concatenated
    archives in order; later files win)."""
    raw = io.BytesIO()
    cpio = Cpio(raw)
    cpio.file("opt/rescoin/loadgen.py", script.read_bytes(), 0o755)
    cpio.file("opt/rescoin/footprint_guest.py", GUEST_SCRIPT.read_bytes(), 0o644)
    cpio.close()
    out.write_bytes(base.read_bytes() + gzip.compress(raw.getvalue(), mtime=0))


def random_disk(path: Path, mib: int) -> None:
    """A disk of random bytes (so no layer can shortcut zero pages)."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))


def with_channel(xml: str, sock: Path, free_page_reporting: bool = False, port: str = PORT) -> str:
    """The lab domain plus the footprint port (and, if asked, free page reporting on the balloon)."""
    if free_page_reporting:
        xml = xml.replace("<memballoon model='virtio'>", "<memballoon model='virtio' freePageReporting='on'>")
    chan = (f"    <channel type='unix'>\n      <source mode='bind' path='{sock}'/>\n"
            f"      <target type='virtio' name='{port}'/>\n    </channel>\n")
    return xml.replace("    <memballoon", chan + "    <memballoon", 1)


def remove(conn, name: str = NAME) -> bool:
    import libvirt
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    if dom.isActive():
        dom.destroy()
    dom.undefine()
    return True


def start_guest(conn, memory_mib: int, disk_mib: int, free_page_reporting: bool = False):
    """Define and start the guest; returns (domain, qemu pid, channel socket)."""
    image = build_image()
    WORK.mkdir(parents=True, exist_ok=True)
    initrd, disk, sock = WORK / "initrd.gz", WORK / "disk.img", WORK / "footprint.sock"
    overlay_initrd(Path(image.initrd), initrd)
    if not disk.exists() or disk.stat().st_size != disk_mib * MIB:
        random_disk(disk, disk_mib)
    sock.unlink(missing_ok=True)
    xml = domain_xml(NAME, image.kernel, initrd, disk, WORK / "agent.sock", memory_mib, memory_mib, 1,
                     load="idle", console_log=WORK / "console.log", disk_cache="writeback")
    dom = conn.defineXML(with_channel(xml, sock, free_page_reporting))
    dom.create()
    pid = int(Path(f"/run/libvirt/qemu/{NAME}.pid").read_text().strip())
    return dom, pid, sock


def balloon_features(dom) -> dict:
    """What the live domain says about free page reporting and deflate-on-oom."""
    from xml.etree import ElementTree
    bal = ElementTree.fromstring(dom.XMLDesc(0)).find("devices/memballoon")
    attrs = dict(bal.attrib) if bal is not None else {}
    return {"memballoon": attrs, "free_page_reporting": attrs.get("freePageReporting", "off (not set)"),
            "deflate_on_oom": attrs.get("autodeflate", "off (not set)")}


def settle(s: Sampler, phase: str, seconds: float) -> None:
    s.phase = phase
    time.sleep(seconds)


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS (MiB) over time, in MiB/hour."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 3600.0 * sum((t - mt) * (r - mr) for t, r in points) / den if den else 0.0


def measure_idle(s: Sampler, limit: float, seconds: float) -> dict:
    s.phase = "idle"
    time.sleep(seconds)
    pts = s.of("idle")
    rate = slope_per_hour(pts)
    start = pts[0][1]
    gap = limit - start
    return {"seconds": pts[-1][0] - pts[0][0], "rss_start_mib": start, "rss_end_mib": pts[-1][1],
            "mib_per_hour": round(rate, 2), "gap_mib": round(gap, 1),
            "share_of_gap_per_hour": round(rate / gap, 5) if gap > 0 else None}


def measure_read(s: Sampler, g: Guest, path: str, mib: int) -> dict:
    g.ask(op="drop_caches")
    settle(s, "read-before", 2.0)
    before, ram_before, cache0 = s.now(), s.ram_now(), g.ask(op="meminfo")["meminfo"]
    s.phase = "read"
    r = g.ask(op="read", path=path, mib=mib)
    settle(s, "read-after", 2.0)
    after, ram_after, cache1 = s.now(), s.ram_now(), g.ask(op="meminfo")["meminfo"]
    s.phase = "reread"
    r2 = g.ask(op="read", path=path, mib=mib)
    settle(s, "reread-after", 2.0)
    cached = (cache1["Cached"] + cache1["Buffers"] - cache0["Cached"] - cache0["Buffers"]) / 1024
    return {"mib_read": r["mib"], "seconds": round(r["seconds"], 2), "mib_s": round(r["mib"] / r["seconds"], 1),
            "rss_before_mib": before, "rss_after_mib": after, "rss_growth_mib": round(after - before, 1),
            "io_growth": round((after - before) / r["mib"], 3), "guest_cache_growth_mib": round(cached, 1),
            "ram_rss_growth_mib": round(ram_after - ram_before, 1),
            "reread_seconds": round(r2["seconds"], 2), "rss_growth_on_reread_mib": round(s.now() - after, 1)}


def measure_alloc(s: Sampler, g: Guest, mib: int) -> dict:
    g.ask(op="drop_caches")     # make room: the guest's free memory is what it hands out
    settle(s, "alloc-before", 2.0)
    before, ram_before, free0 = s.now(), s.ram_now(), g.ask(op="meminfo")["meminfo"]["MemFree"] / 1024
    s.phase = "alloc"
    a = g.ask(op="alloc", mib=mib)
    settle(s, "alloc-freed", 5.0)
    after, ram_after, free1 = s.now(), s.ram_now(), g.ask(op="meminfo")["meminfo"]["MemFree"] / 1024
    return {"mib": mib, "touch_seconds": round(a["seconds"], 2), "rss_before_mib": before,
            "rss_after_free_mib": after, "rss_kept_mib": round(after - before, 1),
            "kept_share": round((after - before) / mib, 3), "ram_rss_kept_mib": round(ram_after - ram_before, 1),
            "guest_free_before_mib": round(free0, 1), "guest_free_after_mib": round(free1, 1)}


def measure_balloon(s: Sampler, dom, g: Guest, target_mib: int, timeout: float) -> dict:
    import libvirt
    settle(s, "balloon-before", 2.0)
    before, ram_before = s.now(), s.ram_now()
    s.phase = "balloon"
    t0 = time.monotonic()
    dom.setMemoryFlags(target_mib * 1024, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    while time.monotonic() - t0 < timeout:     # until RSS has not moved by 1 MiB for 5 s
        time.sleep(1.0)
        pts = s.of("balloon")
        recent = [r for t, r in pts if t >= pts[-1][0] - 5.0]
        if time.monotonic() - t0 > 6.0 and max(recent) - min(recent) < 1.0:
            break
    pts = s.of("balloon")
    end, total = pts[-1][1], pts[-1][0] - pts[0][0]
    t_end = next(t for t, r in pts if r <= end + 1.0)      # first sample at the floor
    fall = t_end - s.of("balloon-before")[-1][0]           # from the last sample before the call
    mem = g.ask(op="meminfo")["meminfo"]
    return {"target_mib": target_mib, "rss_before_mib": before, "rss_end_mib": end,
            "reclaimed_mib": round(before - end, 1), "ram_rss_before_mib": ram_before,
            "ram_rss_end_mib": s.ram_now(), "seconds_to_settle": round(total, 1),
            "fall_seconds": round(fall, 2), "mib_s": round((before - end) / fall, 1) if fall > 0 else None,
            "guest_memtotal_mib": round(mem["MemTotal"] / 1024, 1),
            "guest_memfree_mib": round(mem["MemFree"] / 1024, 1),
            "balloon_stats": {k: v for k, v in dom.memoryStats().items() if isinstance(v, int)}}


def run(args: argparse.Namespace) -> dict:
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)   # errors arrive as exceptions
    conn = libvirt.open(args.uri)
    if remove(conn):
        print("removed a footprint guest left from before", file=sys.stderr)
    dom, pid, sock = start_guest(conn, args.memory, args.disk, args.free_page_reporting)
    s = Sampler(pid, args.memory)
    s.start()
    try:
        g = Guest(sock)
        info = g.wait_ready()
        settle(s, "settle", args.settle)
        out: dict = {"guest": {"memory_mib": args.memory, "vcpus": 1, "disk_mib": args.disk,
                               "memtotal_mib": round(info["MemTotal"] / 1024, 1),
                               "boot_rss_mib": s.now(), "boot_guest_ram_rss_mib": s.ram_now(),
                               **balloon_features(dom)}}
        out["idle"] = measure_idle(s, args.memory, args.idle)
        out["page_cache"] = measure_read(s, g, "/dev/vda", args.disk)
        out["alloc_free"] = measure_alloc(s, g, args.alloc)
        out["balloon"] = measure_balloon(s, dom, g, args.target, args.balloon_timeout)
        return out
    finally:
        s.stop_event.set()
        s.join(2.0)
        if args.out:
            rows = [[*x, r] for x, r in zip(s.samples, s.ram, strict=False)]
            Path(args.out).write_text(json.dumps({"columns": ["t_s", "vmrss_mib", "phase", "guest_ram_rss_mib"],
                                                  "samples": rows}))
        if not args.keep:
            remove(conn)
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", default="qemu:///system")
    p.add_argument("--keep", action="store_true", help="leave the guest running")
    p.add_argument("--out", help="write the raw RSS samples (t, MiB, phase) here")
    p.add_argument("--results", help="also write the JSON object here")
    p.add_argument("--memory", type=int, default=1024, help="guest memory MiB (default 1024)")
    p.add_argument("--disk", type=int, default=512, help="guest disk MiB, all read once (default 512)")
    p.add_argument("--alloc", type=int, default=256, help="MiB to allocate, touch and free (default 256)")
    p.add_argument("--target", type=int, default=256, help="balloon target MiB (default 256)")
    p.add_argument("--idle", type=float, default=180.0, help="seconds of idle sampling (default 180)")
    p.add_argument("--settle", type=float, default=20.0, help="seconds after boot before measuring")
    p.add_argument("--balloon-timeout", type=float, default=120.0)
    p.add_argument("--free-page-reporting", action="store_true",
                   help="turn on the balloon's free page reporting (off in the lab's domains)")
    args = p.parse_args(argv)
    return measure("footprint", run, args)


def measure(what: str, run, args: argparse.Namespace) -> int:
    """Run a lab benchmark as root, stamp when, how long and where, print the JSON, write --results."""
    if os.geteuid() != 0:
        print(f"{what}: needs root (runs guests under qemu:///system)", file=sys.stderr)
        return 2
    t0 = time.time()
    out = run(args)
    out["measured"] = {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                       "wall_seconds": round(time.time() - t0, 1), "command": " ".join(sys.argv),
                       "host": os.uname().nodename, "emulation": "TCG (<domain type='qemu'>)"}
    text = json.dumps(out, indent=2)
    print(text)
    if args.results:
        Path(args.results).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
