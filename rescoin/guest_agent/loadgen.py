#!/usr/bin/env python3
"""Load generator for rescoin lab guests (standard library only, Python 3.6+).

The load is a spec string, several specs joined by ``+``::

    idle                                 nothing
    cpu:0.8                              busy-loop 80 % of the time on one worker
    cpu:0.8,threads=2                    ... on two workers (processes: no GIL contention)
    mem:grow:step=32,max=200,every=5     allocate and touch 32 MiB every 5 s up to 200 MiB, hold
    mem:hold:64                          allocate and touch 64 MiB at once, hold
    disk:write:kibs=512                  write ~512 KiB/s to /dev/vda (O_DIRECT, fsync each second)
    disk:read:kibs=512                   read ~512 KiB/s from /dev/vda (O_DIRECT)

Options for disk: ``path=/dev/vdb`` (a device or a file), ``block=64`` (KiB per I/O).

Where the spec comes from: the command line arguments (joined with ``+``), else
``rescoin.load=...`` on the kernel command line, else ``idle``. While running, the
file ``/tmp/loadgen.cmd`` is read every second; when it holds a spec different
from the current one, the load switches to it (delete the file to keep the
current load).

Each spec runs in its own child process, so switching load is "kill the
children, start new ones" and memory is given back at once. A worker that
dies (the guest's OOM killer prefers them) is started again after 10 s.
"""
import contextlib
import mmap
import os
import signal
import sys
import time

CMD_FILE = "/tmp/loadgen.cmd"
MIB = 1 << 20
PAGE = mmap.PAGESIZE
RESTART_DELAY = 10   # seconds before a worker that died is started again


def log(msg):
    sys.stderr.write("loadgen: %s\n" % msg)
    sys.stderr.flush()


class SpecError(ValueError):
    pass


# -- parsing ------------------------------------------------------------------------------
def _number(text, what, kind=float, minimum=0.0):
    try:
        v = kind(text)
    except ValueError:
        raise SpecError("%s: %r is not a number" % (what, text)) from None
    if v < minimum:
        raise SpecError("%s: must be >= %s, got %s" % (what, minimum, text))
    return v


def _options(text, what):
    """``a=1,b=2`` -> {"a": "1", "b": "2"}; bare words are returned under their position."""
    out = {}
    if not text:
        return out
    for i, part in enumerate(text.split(",")):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
        else:
            out[i] = part
    return out


def parse_one(spec):
    """One spec -> (kind, params dict). Raises SpecError."""
    spec = spec.strip()
    if spec in ("", "idle", "none"):
        return ("idle", {})
    head, _, rest = spec.partition(":")
    if head == "cpu":
        opts = _options(rest, "cpu")
        duty = _number(opts.pop(0, "1.0"), "cpu duty cycle")
        if duty > 1.0:
            raise SpecError("cpu duty cycle must be in [0, 1], got %s" % duty)
        threads = int(_number(opts.pop("threads", "1"), "cpu threads", int, 1))
        _no_more(opts, spec)
        return ("cpu", {"duty": duty, "threads": threads})
    if head == "mem":
        mode, _, rest = rest.partition(":")
        if mode == "hold":
            opts = _options(rest, "mem:hold")
            mib = _number(opts.pop(0, opts.pop("mib", "64")), "mem:hold MiB", int, 1)
            _no_more(opts, spec)
            return ("mem", {"step": mib, "max": mib, "every": 0.0})
        if mode == "grow":
            opts = _options(rest, "mem:grow")
            step = _number(opts.pop("step", "32"), "mem:grow step", int, 1)
            top = _number(opts.pop("max", "256"), "mem:grow max", int, 1)
            every = _number(opts.pop("every", "5"), "mem:grow every", float, 0.0)
            _no_more(opts, spec)
            return ("mem", {"step": step, "max": top, "every": every})
        raise SpecError("mem mode must be grow or hold, got %r" % mode)
    if head == "disk":
        mode, _, rest = rest.partition(":")
        if mode not in ("write", "read"):
            raise SpecError("disk mode must be write or read, got %r" % mode)
        opts = _options(rest, "disk")
        kibs = _number(opts.pop("kibs", opts.pop(0, "512")), "disk kibs", float, 1.0)
        block = _number(opts.pop("block", "64"), "disk block KiB", int, 4)
        path = opts.pop("path", "/dev/vda")
        _no_more(opts, spec)
        return ("disk", {"mode": mode, "kibs": kibs, "block": block, "path": path})
    raise SpecError("unknown load %r (use cpu:, mem:grow:, mem:hold:, disk:write:, disk:read: or idle)" % spec)


def _no_more(opts, spec):
    if opts:
        raise SpecError("%s: unknown option(s) %s" % (spec, ", ".join(str(k) for k in opts)))


def parse(text):
    """A ``+``-joined spec string -> list of (kind, params); 'idle' parts are dropped."""
    parts = [parse_one(p) for p in text.split("+")]
    return [p for p in parts if p[0] != "idle"]


# -- workers (each runs in a child process until killed) ---------------------------------------
def run_cpu(duty, period=0.1):
    busy = duty * period
    if busy <= 0:
        while True:
            time.sleep(3600)
    while True:
        start = time.monotonic()
        x = 0
        while time.monotonic() - start < busy:
            for _ in range(1000):
                x += 1
        left = period - (time.monotonic() - start)
        if left > 0:
            time.sleep(left)


def run_mem(step, max, every):
    chunks = []
    held = 0
    while held < max:
        n = min(step, max - held)
        buf = bytearray(n * MIB)
        buf[::PAGE] = b"\x01" * len(range(0, len(buf), PAGE))   # touch every page
        chunks.append(buf)
        held += n
        log("mem: holding %d MiB" % held)
        if held < max and every > 0:
            time.sleep(every)
    while True:
        # re-touch now and then so the pages stay hot (and visible to the balloon)
        time.sleep(30)
        for buf in chunks:
            buf[::PAGE] = b"\x02" * len(range(0, len(buf), PAGE))


def _open_disk(path, mode):
    flags = os.O_RDWR if mode == "write" else os.O_RDONLY
    direct = getattr(os, "O_DIRECT", 0)
    if not os.path.exists(path) and mode == "write" and not path.startswith("/dev/"):
        flags |= os.O_CREAT
    try:
        return os.open(path, flags | direct, 0o644), bool(direct)
    except OSError:
        return os.open(path, flags, 0o644), False


def run_disk(mode, kibs, block, path):
    try:
        fd, direct = _open_disk(path, mode)
    except OSError as e:
        log("disk: cannot open %s: %s; idling" % (path, e))
        while True:
            time.sleep(3600)
    size = os.lseek(fd, 0, os.SEEK_END)
    bsize = block * 1024
    if size < bsize:
        size = 64 * MIB if mode == "write" and not path.startswith("/dev/") else size
    if size < bsize:
        log("disk: %s is smaller than one block; idling" % path)
        while True:
            time.sleep(3600)
    buf = mmap.mmap(-1, bsize)          # page aligned, as O_DIRECT needs
    buf.write(os.urandom(min(bsize, 4096)) * (bsize // min(bsize, 4096)))
    log("disk: %s %s at %.0f KiB/s in %d KiB blocks%s"
        % (mode, path, kibs, block, " (O_DIRECT)" if direct else ""))
    per_second = kibs * 1024.0
    offset = 0
    done = 0.0
    t0 = time.monotonic()
    last_sync = t0
    while True:
        if offset + bsize > size:
            offset = 0
        try:
            if mode == "write":
                os.lseek(fd, offset, os.SEEK_SET)
                os.write(fd, buf)
            else:
                os.lseek(fd, offset, os.SEEK_SET)
                os.readv(fd, [buf])
        except OSError as e:
            log("disk: %s failed at offset %d: %s" % (mode, offset, e))
            time.sleep(1)
            continue
        offset += bsize
        done += bsize
        now = time.monotonic()
        if mode == "write" and now - last_sync >= 1.0:
            os.fsync(fd)
            last_sync = now
        ahead = done / per_second - (now - t0)   # seconds ahead of the target rate
        if ahead > 0:
            time.sleep(ahead)
        if now - t0 > 60:                        # forget old history: keep the rate "recent"
            t0, done = now, 0.0


WORKERS = {"cpu": run_cpu, "mem": run_mem, "disk": run_disk}


def spawn(kind, params):
    """Fork one worker; returns its pid. Workers are the first the guest's OOM
    killer picks (the agent must survive memory pressure)."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("800")
        except (IOError, OSError):
            pass
        try:
            WORKERS[kind](**params)
        except BaseException as e:   # noqa: BLE001 - a worker must never return into the loop
            log("%s worker failed: %s" % (kind, e))
        finally:
            os._exit(1)
    return pid


def start(parts):
    """Start the workers of a parsed spec; returns {pid: (kind, params)}."""
    workers = {}
    for kind, params in parts:
        params = dict(params)
        copies = params.pop("threads", 1) if kind == "cpu" else 1
        for _ in range(copies):
            workers[spawn(kind, params)] = (kind, params)
    return workers


def stop(pids):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _describe(status):
    if os.WIFSIGNALED(status):
        return "signal %d" % os.WTERMSIG(status)
    return "exit status %d" % os.WEXITSTATUS(status)


def spec_from_cmdline(path="/proc/cmdline"):
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    for w in words:
        if w.startswith("rescoin.load="):
            return w[len("rescoin.load="):]
    return None


def read_cmd_file():
    try:
        with open(CMD_FILE) as f:
            text = f.read().strip()
    except OSError:
        return None
    return text or None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    spec = "+".join(argv) if argv else (spec_from_cmdline() or "idle")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    workers = {}          # pid -> (kind, params)
    restart = []          # (when, kind, params) of workers that died
    current = None
    try:
        while not stopping:
            wanted = read_cmd_file() or spec
            if wanted != current:
                current = wanted
                try:
                    parts = parse(wanted)
                except SpecError as e:
                    # keep whatever runs now; the message is printed once per bad spec
                    log("bad spec %r: %s (load unchanged)" % (wanted, e))
                else:
                    stop(list(workers))
                    workers, restart = start(parts), []
                    log("load: %s (%d worker%s)" % (wanted, len(workers), "" if len(workers) == 1 else "s"))
            # a worker that died (killed by the OOM killer, say) comes back after a pause,
            # so a memory load keeps pressing until the host gives the guest more memory
            for pid in list(workers):
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done, status = pid, 0
                if done:
                    kind, params = workers.pop(pid)
                    log("%s worker ended (%s); restarting it in %d s" % (kind, _describe(status), RESTART_DELAY))
                    restart.append((time.monotonic() + RESTART_DELAY, kind, params))
            now = time.monotonic()
            for item in [r for r in restart if r[0] <= now]:
                restart.remove(item)
                workers[spawn(item[1], item[2])] = (item[1], item[2])
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop(list(workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
