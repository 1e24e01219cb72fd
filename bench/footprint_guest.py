#!/usr/bin/env python3
"""In-guest helper of bench/footprint.py (standard library only, runs in the lab initramfs).

The lab guest has no command channel (its agent only reports), so footprint.py
boots the lab image with this file in place of the load generator and a second
virtio-serial port ``org.rescoin.footprint.0``. Requests are JSON lines, one
reply line each:

    {"op": "meminfo"}                       /proc/meminfo in KiB
    {"op": "drop_caches"}                   sync; echo 3 > /proc/sys/vm/drop_caches
    {"op": "read", "path": "/dev/vda", "mib": 512}   buffered read (fills the page cache)
    {"op": "alloc", "mib": 256}            allocate, touch every page, free
"""
import json
import mmap
import os
import sys
import time

PORT_NAME = "org.rescoin.footprint.0"
MIB = 1 << 20


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    return out


def read(path, mib):
    t0 = time.monotonic()
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < mib:
            if not f.read(MIB):
                break
            done += 1
    return {"mib": done, "seconds": time.monotonic() - t0}


def alloc(mib):
    t0 = time.monotonic()
    m = mmap.mmap(-1, mib * MIB)
    for off in range(0, mib * MIB, mmap.PAGESIZE):
        m[off] = 1
    touched = time.monotonic() - t0
    m.close()
    return {"mib": mib, "seconds": touched}


def handle(req):
    op = req.get("op")
    if op == "meminfo":
        return {"meminfo": meminfo()}
    if op == "drop_caches":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return {}
    if op == "read":
        return read(req["path"], int(req["mib"]))
    if op == "alloc":
        return alloc(int(req["mib"]))
    return {"error": "unknown op %r" % op}  # noqa: UP031 - the guest may run Python 3.6


def find_port(name=PORT_NAME, tries=300):
    """The /dev node of the virtio-serial port called ``name`` (bench/pinning_guest.py uses it too)."""
    for _ in range(tries):
        base = "/sys/class/virtio-ports"
        for d in os.listdir(base) if os.path.isdir(base) else []:
            try:
                with open(os.path.join(base, d, "name")) as f:
                    if f.read().strip() == name:
                        return "/dev/" + d
            except OSError:
                pass
        time.sleep(0.1)
    raise SystemExit("no virtio-serial port " + name)


def main():
    fd = os.open(find_port(), os.O_RDWR)
    buf = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            time.sleep(0.2)   # host not connected
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = {}
            try:
                req = json.loads(line)
                reply = handle(req)
            except Exception as e:  # noqa: BLE001 - report it, keep serving
                reply = {"error": "%s: %s" % (type(e).__name__, e)}  # noqa: UP031
            reply["id"] = req.get("id") if isinstance(req, dict) else None
            os.write(fd, (json.dumps(reply) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
