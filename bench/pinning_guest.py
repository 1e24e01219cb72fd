#!/usr/bin/env python3
"""In-guest worker of bench/pinning.py (standard library only, runs in the lab initramfs).

Counts work inside the guest, where it is done: a busy loop adds 1 to a
counter, and every half second one JSON line goes to the host over the
virtio-serial port ``org.rescoin.pinning.0``:
``{"work": N, "busy_s": S}`` (iterations and busy-phase seconds so far).
The kind of load comes from ``rescoin.load=`` on the kernel command line:
``busy`` (always on) or ``bursty`` (5 s on, 10 s off).
"""
import contextlib
import json
import os
import sys
import time

from footprint_guest import find_port  # overlaid next to this file in /opt/rescoin by bench/pinning.py

PORT_NAME = "org.rescoin.pinning.0"
ON_S, OFF_S = 5.0, 10.0


def mode():
    with open("/proc/cmdline") as f:
        for w in f.read().split():
            if w.startswith("rescoin.load="):
                return w[len("rescoin.load="):]
    return "busy"


def main():
    fd = os.open(find_port(PORT_NAME, tries=600), os.O_WRONLY | os.O_NONBLOCK)
    bursty = mode() == "bursty"
    work, busy_s = 0, 0.0
    t0 = last = time.monotonic()
    while True:
        now = time.monotonic()
        on = not bursty or (now - t0) % (ON_S + OFF_S) < ON_S
        if on:
            for _ in range(2000):
                work += 1
            busy_s += time.monotonic() - now
        else:
            time.sleep(0.05)
        if time.monotonic() - last >= 0.5:
            last = time.monotonic()
            with contextlib.suppress(OSError):  # the host is not reading: keep counting
                os.write(fd, (json.dumps({"work": work, "busy_s": round(busy_s, 3)}) + "\n").encode())


if __name__ == "__main__":
    sys.exit(main())
