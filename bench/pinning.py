"""Does rescoin's vCPU pinning raise or lower throughput and fairness on real guests? (issue 11, item 3)

    sudo .venv/bin/python bench/pinning.py [--uri qemu:///system] [--seconds 45] [--rounds 3]

Boots three lab guests (1 vCPU, 256 MiB, the lab image with
bench/pinning_guest.py as their load): two CPU-bound, one bursty (5 s on,
10 s off). The work is counted inside each guest (busy-loop iterations, sent
to the host over a virtio-serial port every half second). Each round runs two
arms, in alternating order, each for ``--seconds`` after a short settle:

* floating: every vCPU may run on every pCPU (libvirt's default);
* pinned: what rescoin's placement did before ``float_above`` (each busy vCPU
  pinned to its own pCPU set, the light one floating; see
  ``BalancePlacement`` and test_balance_pins_busy_vcpus_floats_light_ones_and_balances).

Per arm: work per second of each guest, the total, Jain's index over the two
busy guests, and the bursty guest's work per second of its on-phase (what a
VM that saved its share gets when it bursts). Prints one JSON object: every
window, the medians per arm, and pinned / floating ratios. The guests and their
files are removed at the end. Needs root and a libvirtd (scripts/setup-host).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

from footprint import measure, overlay_initrd, remove, with_channel  # bench/footprint.py

from rescoin.lab import LAB_ROOT, build_image, domain_xml

WORK = LAB_ROOT / "pinning"
PORT = "org.rescoin.pinning.0"
GUEST_SCRIPT = Path(__file__).with_name("pinning_guest.py")
LOADS = ("busy", "busy", "bursty")
NAMES = [f"rescoin-pin-{i}" for i in range(len(LOADS))]


class Counter(threading.Thread):
    """The latest (work, busy seconds) line one guest sent."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.latest = path, (0, 0.0)
        self.seen = threading.Event()

    def run(self) -> None:
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(self.path))
                    buf = b""
                    while chunk := s.recv(4096):
                        buf += chunk
                        *lines, buf = buf.split(b"\n")
                        for line in lines:
                            try:
                                d = json.loads(line)
                                self.latest = (int(d["work"]), float(d["busy_s"]))
                                self.seen.set()
                            except (ValueError, KeyError):
                                pass  # a line cut at connect time
            except OSError:
                time.sleep(0.5)


def start(conn) -> tuple[list, list[Counter]]:
    image = build_image()
    WORK.mkdir(parents=True, exist_ok=True)
    initrd = WORK / "initrd.gz"
    overlay_initrd(Path(image.initrd), initrd, GUEST_SCRIPT)
    doms, counters = [], []
    for name, load in zip(NAMES, LOADS, strict=True):
        disk, sock = WORK / f"{name}.img", WORK / f"{name}.sock"
        if not disk.exists():
            disk.write_bytes(b"\0" * (16 << 20))
        sock.unlink(missing_ok=True)
        xml = domain_xml(name, image.kernel, initrd, disk, WORK / f"{name}.agent", 256, 256, 1, load=load,
                         console_log=WORK / f"{name}.console.log")
        dom = conn.defineXML(with_channel(xml, sock, port=PORT))
        dom.create()
        doms.append(dom)
        c = Counter(sock)
        c.start()
        counters.append(c)
    return doms, counters


def pin(doms, pcpus: int, pinned: bool) -> None:
    import libvirt
    every = tuple([True] * pcpus)
    for i, (dom, load) in enumerate(zip(doms, LOADS, strict=True)):
        own = tuple(k == i % pcpus for k in range(pcpus))
        dom.pinVcpuFlags(0, own if pinned and load == "busy" else every, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def window(counters: list[Counter], seconds: float) -> dict:
    before = [c.latest for c in counters]
    t0 = time.monotonic()
    time.sleep(seconds)
    after = [c.latest for c in counters]
    dt = time.monotonic() - t0
    rate = [(a[0] - b[0]) / dt for a, b in zip(after, before, strict=True)]
    busy = [r for r, load in zip(rate, LOADS, strict=True) if load == "busy"]
    on = [(a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    burst = [(a[0] - b[0]) / s if s > 0 else 0.0
             for a, b, s, load in zip(after, before, on, LOADS, strict=True) if load == "bursty"]
    jain = sum(busy) ** 2 / (len(busy) * sum(r * r for r in busy)) if any(busy) else 0.0
    return {"work_per_s": [round(r) for r in rate], "total": round(sum(rate)), "jain_busy": round(jain, 4),
            "bursty_on_work_per_s": round(burst[0]) if burst else None}


def run(args: argparse.Namespace) -> dict:
    import libvirt
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(args.uri)
    for n in NAMES:
        remove(conn, n)
    pcpus = int(conn.getInfo()[2])
    try:
        doms, counters = start(conn)
        for c in counters:
            if not c.seen.wait(args.boot_timeout):
                raise SystemExit(f"pinning: a guest sent no work in {args.boot_timeout:.0f} s")
        rows = []
        for r in range(args.rounds):
            for arm in (("floating", "pinned") if r % 2 == 0 else ("pinned", "floating")):
                pin(doms, pcpus, arm == "pinned")
                time.sleep(args.settle)
                rows.append({"round": r, "arm": arm, **window(counters, args.seconds)})
                print(json.dumps(rows[-1]), file=sys.stderr)
        med = {arm: {k: statistics.median(x[k] for x in rows if x["arm"] == arm)
                     for k in ("total", "jain_busy", "bursty_on_work_per_s")} for arm in ("floating", "pinned")}
        ratio = {k: round(med["pinned"][k] / med["floating"][k], 4) if med["floating"][k] else None
                 for k in med["pinned"]}
        return {"host_pcpus": pcpus, "guests": dict(zip(NAMES, LOADS, strict=True)), "seconds": args.seconds,
                "windows": rows, "median": med, "pinned_over_floating": ratio}
    finally:
        for n in NAMES:
            remove(conn, n)
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", default="qemu:///system")
    p.add_argument("--seconds", type=float, default=45.0,
                   help="length of one measured window (default 45: three bursty cycles)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of both arms (default 3)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after a pin change before measuring")
    p.add_argument("--boot-timeout", type=float, default=240.0)
    p.add_argument("--results", help="also write the JSON object here")
    return measure("pinning", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
