#!/usr/bin/env python3
"""rescoin guest agent: answers the host's questions about this guest.

One file, standard library only, Python 3.6 or newer.

Protocol: the host sends one request line, a JSON object such as
``{"op": "stats", "nonce": "3f9a..."}`` (a bare ``stats`` line works too);
the agent answers with one JSON line::

    {"v": 1, "ts": 1700000000.5, "nonce": "3f9a...",
     "mem": {"total_kib": ..., "available_kib": ..., "free_kib": ...,
             "swap_total_kib": ..., "swap_free_kib": ...},
     "vmstat": {"pgmajfault": ..., "pswpin": ...},
     "cpu": {"total_ticks": ..., "steal_ticks": ...},
     "psi": {"memory": {"some_avg10": ..., "some_avg60": ..., "some_total": ...,
                        "full_avg10": ..., ...}, "cpu": {...}, "io": {...}}}

Fields the guest does not have (old kernels: no MemAvailable, no PSI) are
left out. Unknown ops get ``{"v": 1, "error": "unknown op"}``.

Transports:

* ``--transport virtio`` (default): the virtio-serial port named
  ``org.rescoin.agent.0``. Host only, no guest network needed.
* ``--transport tcp --listen HOST:PORT --key-file PATH``: every reply is
  wrapped as ``{"payload": "<reply JSON text>", "hmac": "<hex HMAC-SHA256>"}``
  with the shared key. Listens on 127.0.0.1 unless told otherwise.

Run ``rescoin_agent.py --help`` for the options.
"""
import argparse
import errno
import hashlib
import hmac
import json
import os
import random
import select
import socket
import stat
import sys
import threading
import time

VERSION = 1
PORT_NAME = "org.rescoin.agent.0"
MAX_REQUEST = 4096          # bytes in one request line, newline included
DEFAULT_TCP_PORT = 9477
EOF_BACKOFF = 0.1           # seconds to sleep when the host side is not connected
REOPEN_BACKOFF = 2.0        # seconds between attempts to open a missing port
WRITE_TIMEOUT = 5.0         # give up on a reply the host does not take
TCP_IDLE_TIMEOUT = 300.0    # close TCP connections idle this long
MAX_TCP_CLIENTS = 64
NONCE_MAX = 128             # longest nonce echoed back
CHAOS_MODES = ("garbage", "hang", "exit", "normal", "lie", "huge")  # --test-hooks only

MEMINFO_FIELDS = (
    ("MemTotal", "total_kib"),
    ("MemAvailable", "available_kib"),
    ("MemFree", "free_kib"),
    ("SwapTotal", "swap_total_kib"),
    ("SwapFree", "swap_free_kib"),
)
VMSTAT_FIELDS = ("pgmajfault", "pswpin")
PSI_RESOURCES = ("memory", "cpu", "io")


def log(msg):
    sys.stderr.write("rescoin-agent: %s\n" % msg)
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Reading /proc


def _read_text(path):
    try:
        with open(path, "r") as f:
            return f.read()
    except (IOError, OSError, UnicodeDecodeError):
        return None


def _numbers(text, sep=None):
    """``name value`` lines (``name: value kB`` with sep=":") as a dict of non-negative ints."""
    values = {}
    for line in (text or "").splitlines():
        if sep:
            name, _, rest = line.partition(sep)
        else:
            name, _, rest = line.partition(" ")
        parts = rest.split()
        if name.strip() and parts:
            try:
                value = int(parts[0])
            except ValueError:
                continue
            if value >= 0:
                values[name.strip()] = value
    return values


def read_meminfo(proc):
    values = _numbers(_read_text(os.path.join(proc, "meminfo")), ":")
    return dict((dst, values[src]) for src, dst in MEMINFO_FIELDS if src in values)


def read_vmstat(proc):
    values = _numbers(_read_text(os.path.join(proc, "vmstat")))
    return dict((k, values[k]) for k in VMSTAT_FIELDS if k in values)


def read_cpu(proc):
    """Total and steal ticks from the aggregate ``cpu`` line of /proc/stat.

    The total is user+nice+system+idle+iowait+irq+softirq+steal: guest and
    guest_nice are already counted in user and nice.
    """
    text = _read_text(os.path.join(proc, "stat"))
    if text is None:
        return {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0] != "cpu":
            continue
        try:
            ticks = [int(p) for p in parts[1:9]]
        except ValueError:
            return {}
        if not ticks or min(ticks) < 0:
            return {}
        out = {"total_ticks": sum(ticks)}
        if len(ticks) >= 8:
            out["steal_ticks"] = ticks[7]
        return out
    return {}


def read_psi(proc):
    out = {}
    for res in PSI_RESOURCES:
        text = _read_text(os.path.join(proc, "pressure", res))
        if text is None:
            continue
        fields = {}
        for line in text.splitlines():
            parts = line.split()
            if not parts or parts[0] not in ("some", "full"):
                continue
            kind = parts[0]
            for item in parts[1:]:
                key, _, value = item.partition("=")
                try:
                    if key in ("avg10", "avg60", "avg300"):
                        number = float(value)
                        if not 0.0 <= number <= 100.0:
                            continue
                    elif key == "total":
                        number = int(value)
                        if number < 0:
                            continue
                    else:
                        continue
                except ValueError:
                    continue
                fields["%s_%s" % (kind, key)] = number
        if fields:
            out[res] = fields
    return out


def collect(proc):
    """Everything the agent knows about the guest, as a dict (no ``v``/``ts``)."""
    sections = (
        ("mem", read_meminfo(proc)),
        ("vmstat", read_vmstat(proc)),
        ("cpu", read_cpu(proc)),
        ("psi", read_psi(proc)),
    )
    return dict((name, data) for name, data in sections if data)


# ---------------------------------------------------------------------------
# Requests and replies


class Agent(object):
    """Turns request lines into reply lines. Shared by all transports."""

    def __init__(self, proc_root="/proc", key=None, test_hooks=False):
        self.proc_root = proc_root
        self.key = key
        self.test_hooks = test_hooks
        self.mode = "normal"
        self.mode_since = time.time()
        self._lock = threading.Lock()

    def _encode(self, obj):
        text = json.dumps(obj, separators=(",", ":"), sort_keys=True)
        if self.key is not None:
            mac = hmac.new(self.key, text.encode("utf-8"), hashlib.sha256).hexdigest()
            text = json.dumps({"payload": text, "hmac": mac}, separators=(",", ":"))
        return text.encode("utf-8") + b"\n"

    def stats(self, nonce=None, mode="normal"):
        reply = {"v": VERSION, "ts": time.time()}
        if nonce is not None:
            reply["nonce"] = nonce
        reply.update(collect(self.proc_root))
        if mode == "lie":
            self._lie(reply)
        elif mode == "huge":
            reply["mem"] = dict((name, 10 ** 18) for name in ("total_kib", "available_kib", "free_kib"))
            reply["vmstat"] = {"pgmajfault": 2 ** 64, "pswpin": 2 ** 64}
        return reply

    def _lie(self, reply):
        """Claim starvation while idle: almost nothing available, high pressure, counters racing."""
        mem = reply.setdefault("mem", {})
        total = mem.get("total_kib", 262144)
        mem.update(total_kib=total, available_kib=total // 100, free_kib=total // 200)
        busy = int((time.time() - self.mode_since) * 5000)
        reply["vmstat"] = {"pgmajfault": busy, "pswpin": busy}
        psi = reply.setdefault("psi", {})
        psi["memory"] = {"some_avg10": 90.0, "some_avg60": 80.0, "some_avg300": 50.0,
                         "full_avg10": 60.0, "full_avg60": 50.0, "full_avg300": 30.0}

    @staticmethod
    def _garbage():
        n = random.randint(8, 200)
        body = bytes(bytearray(random.choice(b"\x00\x01\xfe\xff{}[]\"\\qz#%") for _ in range(n)))
        return b"\xff" + body.replace(b"\n", b"?") + b"\n"

    def respond(self, line):
        """``handle`` that never raises: one odd request must not stop the agent."""
        if line is None:
            return self._encode({"v": VERSION, "error": "request too long"})
        try:
            return self.handle(line)
        except Exception as e:  # noqa: BLE001 - keep serving whatever happened
            log("internal error on a request: %r" % (e,))
            return self._encode({"v": VERSION, "error": "internal error"})

    def handle(self, line):
        """Reply bytes for one request line (without its newline), or None for no reply."""
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return None
        nonce = None
        if text == "stats":
            op, request = "stats", {}
        else:
            try:
                request = json.loads(text)
            except (ValueError, RecursionError):
                request = None
            if not isinstance(request, dict):
                return self._encode({"v": VERSION, "error": "bad request"})
            op = request.get("op")
            raw_nonce = request.get("nonce")
            if isinstance(raw_nonce, str) and len(raw_nonce) <= NONCE_MAX:
                nonce = raw_nonce

        if op == "chaos" and self.test_hooks:
            return self._chaos(request, nonce)

        with self._lock:
            mode = self.mode
        if mode == "hang":
            return None
        if mode == "garbage":
            return self._garbage()
        if op == "stats":
            return self._encode(self.stats(nonce, mode))
        reply = {"v": VERSION, "error": "unknown op"}
        if nonce is not None:
            reply["nonce"] = nonce
        return self._encode(reply)

    def _chaos(self, request, nonce):
        mode = request.get("mode")
        if mode not in CHAOS_MODES:
            return self._encode({"v": VERSION, "error": "bad chaos mode"})
        log("test hook: chaos mode %s" % mode)
        if mode == "exit":
            sys.stderr.flush()
            os._exit(3)
        with self._lock:
            self.mode = mode
            self.mode_since = time.time()
        reply = {"v": VERSION, "ok": True, "chaos": mode}
        if nonce is not None:
            reply["nonce"] = nonce
        return self._encode(reply)


class LineReader(object):
    """Splits a byte stream into lines of at most ``limit`` bytes.

    ``feed`` returns complete lines; an over-long line is dropped and reported
    once as ``None`` in the returned list.
    """

    def __init__(self, limit=MAX_REQUEST):
        self.limit = limit
        self.buf = b""
        self.skipping = False

    def reset(self):
        self.buf = b""
        self.skipping = False

    def feed(self, data):
        out = []
        self.buf += data
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                break
            line, self.buf = self.buf[:i], self.buf[i + 1:]
            if self.skipping:
                self.skipping = False
                continue
            if len(line) >= self.limit:
                out.append(None)
                continue
            out.append(line.rstrip(b"\r"))
        if len(self.buf) >= self.limit:
            if not self.skipping:
                out.append(None)
            self.skipping = True
            self.buf = b""
        return out


# ---------------------------------------------------------------------------
# Transport 1: virtio-serial


def find_port(sys_root="/sys", dev_root="/dev"):
    """The /dev/vportNpM whose virtio-ports name is org.rescoin.agent.0."""
    base = os.path.join(sys_root, "class", "virtio-ports")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        names = []
    for dev in names:
        name = _read_text(os.path.join(base, dev, "name"))
        if name is not None and name.strip() == PORT_NAME:
            return os.path.join(dev_root, dev)
    return os.path.join(dev_root, "virtio-ports", PORT_NAME)


def _write_all(fd, data, timeout=WRITE_TIMEOUT):
    """Write ``data`` to a non-blocking fd; False if the host did not take it in time."""
    deadline = time.time() + timeout
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
            continue
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                raise
        left = deadline - time.time()
        if left <= 0:
            return False
        select.select([], [fd], [], min(left, 1.0))
    return True


def serve_fd(agent, fd, stop=None):
    """Serve requests on an open port fd until it fails.

    Reading 0 bytes means the host side is not connected (or the peer closed):
    sleep a little and try again, forever.
    """
    _set_nonblocking(fd)
    reader = LineReader()
    connected = True
    announced = set()  # say each state once, not every period (the host reconnects per query)
    while stop is None or not stop.is_set():
        try:
            ready, _, _ = select.select([fd], [], [], 1.0)
        except (OSError, select.error) as e:
            if _errno(e) == errno.EINTR:
                continue
            raise
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                continue
            raise
        if not data:
            if connected:
                if "waiting" not in announced:
                    log("host side not connected; waiting for it")
                    announced.add("waiting")
                connected = False
            reader.reset()  # a half-read line from a vanished host is stale
            time.sleep(EOF_BACKOFF)
            continue
        if not connected:
            if "connected" not in announced:
                log("host side connected")
                announced.add("connected")
            connected = True
        for line in reader.feed(data):
            reply = agent.respond(line)
            if reply is None:
                continue
            try:
                if not _write_all(fd, reply):
                    log("host did not take a reply within %.0fs; dropped" % WRITE_TIMEOUT)
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    raise
                log("host went away before the reply was written")


def _errno(e):
    if hasattr(e, "errno") and e.errno is not None:
        return e.errno
    return e.args[0] if e.args else None


def _set_nonblocking(fd):
    import fcntl
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def run_virtio(agent, port=None, port_fd=None):
    if port_fd is not None:
        try:
            serve_fd(agent, port_fd)
        except OSError as e:
            log("port fd %d failed: %s" % (port_fd, e))
            return 1
        return 0
    complained = None
    while True:
        path = port or find_port()
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        except OSError as e:
            if complained != (path, e.errno):
                log("cannot open %s: %s; retrying every %.0fs" % (path, e.strerror, REOPEN_BACKOFF))
                complained = (path, e.errno)
            time.sleep(REOPEN_BACKOFF)
            continue
        complained = None
        log("serving on %s" % path)
        try:
            serve_fd(agent, fd)
        except OSError as e:
            log("port %s failed: %s; reopening" % (path, e))
            time.sleep(REOPEN_BACKOFF)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# Transport 2: TCP with HMAC


def load_key(path):
    """The shared key from ``path``; raises ValueError with a reason if unusable."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError("cannot read key file %s: %s" % (path, e.strerror)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("key file %s is not a regular file" % path)
    if st.st_mode & 0o077:
        raise ValueError(
            "key file %s is readable or writable by group/other (mode %o); run: chmod 600 %s"
            % (path, stat.S_IMODE(st.st_mode), path))
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except (IOError, OSError) as e:
        raise ValueError("cannot read key file %s: %s" % (path, e)) from None
    if len(key) < 16:
        raise ValueError("key file %s holds fewer than 16 bytes of key" % path)
    return key


def parse_listen(text):
    """``HOST:PORT``, ``[V6]:PORT`` or ``PORT`` (host 127.0.0.1)."""
    text = text.strip()
    host = "127.0.0.1"
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ValueError("bad listen address %r" % text)
        host, port = text[1:end], text[end + 2:]
    elif ":" in text:
        host, port = text.rsplit(":", 1)
        host = host or "127.0.0.1"
    else:
        port = text
    try:
        port = int(port)
    except ValueError:
        raise ValueError("bad port in listen address %r" % text) from None
    if not 0 <= port <= 65535:
        raise ValueError("port out of range in %r" % text)
    return host, port


def _serve_tcp_client(agent, conn, peer, slots):
    reader = LineReader()
    try:
        conn.settimeout(TCP_IDLE_TIMEOUT)
        while True:
            try:
                data = conn.recv(4096)
            except socket.timeout:
                return
            if not data:
                return
            for line in reader.feed(data):
                reply = agent.respond(line)
                if reply is not None:
                    conn.sendall(reply)
                if line is None:
                    return  # a client that sends 4 KiB lines is not the host
    except (OSError, socket.error):
        return
    finally:
        conn.close()
        slots.release()


def run_tcp(agent, host, port, print_listen=False):
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, socktype, proto, _, addr = infos[0]
    server = socket.socket(family, socktype, proto)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(addr)
    server.listen(16)
    bound = server.getsockname()
    log("listening on %s port %d (HMAC-SHA256 replies)" % (bound[0], bound[1]))
    if bound[0] in ("0.0.0.0", "::"):
        log("warning: listening on every interface: anyone who can reach this port can read "
            "this guest's statistics (replies are signed, not encrypted); prefer one address")
    if print_listen:
        sys.stdout.write("listening %s %d\n" % (bound[0], bound[1]))
        sys.stdout.flush()
    slots = threading.BoundedSemaphore(MAX_TCP_CLIENTS)
    while True:
        try:
            conn, peer = server.accept()
        except (OSError, socket.error) as e:
            if _errno(e) in (errno.EINTR, errno.ECONNABORTED):
                continue
            log("accept failed: %s" % e)
            time.sleep(0.5)
            continue
        if not slots.acquire(False):
            conn.close()
            continue
        t = threading.Thread(target=_serve_tcp_client, args=(agent, conn, peer, slots))
        t.daemon = True
        t.start()


# ---------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(
        prog="rescoin_agent.py",
        description="rescoin guest agent: reports memory, swap, steal time and PSI of this "
                    "guest to the host scheduler, over virtio-serial (default) or TCP with HMAC.")
    p.add_argument("--transport", choices=("virtio", "tcp"), default="virtio",
                   help="virtio: the virtio-serial port %s (default); tcp: signed replies over TCP"
                   % PORT_NAME)
    p.add_argument("--port", metavar="PATH",
                   help="virtio port device (default: the /dev/vport* named %s)" % PORT_NAME)
    p.add_argument("--port-fd", metavar="FD", type=int,
                   help="serve on this already open file descriptor instead of a device (tests)")
    p.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:%d" % DEFAULT_TCP_PORT,
                   help="TCP address to listen on (default 127.0.0.1:%d; give 0.0.0.0:PORT "
                        "explicitly to listen on every interface)" % DEFAULT_TCP_PORT)
    p.add_argument("--key-file", metavar="PATH",
                   help="shared HMAC key for the tcp transport (mode 0600, at least 16 bytes)")
    p.add_argument("--proc-root", metavar="DIR", default="/proc",
                   help="where to read meminfo, vmstat, stat and pressure/ (default /proc)")
    p.add_argument("--once", action="store_true",
                   help="print one stats reply to stdout and exit")
    p.add_argument("--test-hooks", action="store_true",
                   help="accept {\"op\": \"chaos\"} requests (lab VMs and end-to-end tests only)")
    p.add_argument("--print-listen", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.once:
        agent = Agent(args.proc_root)
        sys.stdout.write(json.dumps(agent.stats(), sort_keys=True) + "\n")
        sys.stdout.flush()
        return 0

    if args.transport == "tcp":
        if not args.key_file:
            log("the tcp transport needs --key-file (a shared key, mode 0600); refusing to start")
            return 2
        try:
            key = load_key(args.key_file)
        except ValueError as e:
            log("%s; refusing to start" % e)
            return 2
        try:
            host, port = parse_listen(args.listen)
        except ValueError as e:
            log(str(e))
            return 2
        agent = Agent(args.proc_root, key=key, test_hooks=args.test_hooks)
        if args.test_hooks:
            log("test hooks are ON (chaos requests accepted)")
        try:
            run_tcp(agent, host, port, print_listen=args.print_listen)
        except (OSError, socket.error) as e:
            log("cannot listen on %s: %s" % (args.listen, e))
            return 1
        return 0

    agent = Agent(args.proc_root, test_hooks=args.test_hooks)
    if args.test_hooks:
        log("test hooks are ON (chaos requests accepted)")
    return run_virtio(agent, port=args.port, port_fd=args.port_fd)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
