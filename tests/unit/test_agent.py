"""The guest agent (run for real as a subprocess) and the host side in rescoin.hosts.agent."""
from __future__ import annotations

import ast
import contextlib
import hashlib
import hmac
import importlib.util
import json
import math
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import fields, replace
from pathlib import Path

import pytest

from rescoin.core.resources import Resource
from rescoin.hosts.agent import (
    AgentClient,
    AgentError,
    AgentReport,
    StaleReply,
    check_size,
    load_key,
    parse_reply,
    signals_from,
)

AGENT = Path(__file__).resolve().parents[2] / "guest_agent" / "rescoin_agent.py"


def _old_python() -> str | None:
    """A Python 3.6 or 3.7 on this machine, to run the agent as old guests would."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which("python3.6"), shutil.which("python3.7"),
                  *sorted(str(p) for p in pyenv.glob("3.[67].*/bin/python3"))]
    for path in candidates:
        if path and subprocess.run([path, "-c", "import sys; assert sys.version_info[:2] <= (3, 7)"],
                                   capture_output=True, timeout=10).returncode == 0:
            return path
    return None


OLD_PYTHON = _old_python()
#: the agent is run under the test's Python and, where there is one, under Python 3.6/3.7
PYTHONS = pytest.mark.parametrize("python", [
    pytest.param(sys.executable, id="py-current"),
    pytest.param(OLD_PYTHON, id="py-old",
                 marks=pytest.mark.skipif(OLD_PYTHON is None, reason="no python3.6/3.7 here")),
])
KEY = b"0123456789abcdef0123456789abcdef"

MEMINFO = """\
MemTotal:        2048000 kB
MemFree:          512000 kB
MemAvailable:    1024000 kB
Buffers:           10000 kB
SwapTotal:       1048576 kB
SwapFree:        1000000 kB
"""
VMSTAT = "nr_free_pages 128000\npgmajfault 1234\npswpin 56\npswpout 78\n"
STAT = "cpu  100 5 50 1000 20 3 2 70 9 0\ncpu0 100 5 50 1000 20 3 2 70 9 0\nintr 1 2 3\n"
PSI = {
    "memory": "some avg10=1.50 avg60=1.00 avg300=0.50 total=12345\n"
              "full avg10=0.25 avg60=0.10 avg300=0.05 total=2345\n",
    "cpu": "some avg10=12.00 avg60=8.00 avg300=4.00 total=99999\n",
    "io": "some avg10=3.00 avg60=2.00 avg300=1.00 total=555\n"
          "full avg10=2.00 avg60=1.00 avg300=0.50 total=444\n",
}


# ---------------------------------------------------------------------------
# helpers


@pytest.fixture
def proc_root(tmp_path):
    root = tmp_path / "proc"
    (root / "pressure").mkdir(parents=True)
    (root / "meminfo").write_text(MEMINFO)
    (root / "vmstat").write_text(VMSTAT)
    (root / "stat").write_text(STAT)
    for name, text in PSI.items():
        (root / "pressure" / name).write_text(text)
    return root


@pytest.fixture
def short_dir():
    """A short directory for UNIX socket paths (108-byte limit)."""
    path = tempfile.mkdtemp(prefix="rca", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn():
    """Start the agent script; every process is killed at the end of the test."""
    procs = []

    def start(*args, pass_fds=(), stdout=subprocess.DEVNULL, python=sys.executable):
        p = subprocess.Popen([python, str(AGENT), *map(str, args)], stdin=subprocess.DEVNULL,
                             stdout=stdout, stderr=subprocess.PIPE, pass_fds=pass_fds)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)
        for stream in (p.stdout, p.stderr):
            if stream:
                stream.close()


def read_line(sock: socket.socket, timeout: float = 3.0) -> bytes | None:
    """One line from ``sock``, or None if none arrives within ``timeout``."""
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return None
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    line, _, rest = buf.partition(b"\n")
    assert not rest, "one reply per request"
    return line


def ask(sock, request, timeout=3.0):
    if not isinstance(request, bytes):
        request = json.dumps(request).encode()
    sock.sendall(request + b"\n")
    return read_line(sock, timeout)


def check_report(r: AgentReport) -> None:
    assert r.mem_total_mib == pytest.approx(2000.0)
    assert r.mem_available_mib == pytest.approx(1000.0)
    assert r.mem_free_mib == pytest.approx(500.0)
    assert r.swap_total_mib == pytest.approx(1024.0)
    assert r.swap_free_mib == pytest.approx(1000000 / 1024)
    assert r.used_mib == pytest.approx(1000.0)
    assert (r.major_faults, r.swap_in) == (1234, 56)
    assert (r.cpu_total_ticks, r.cpu_steal_ticks) == (1250, 70)  # guest ticks are inside user
    assert (r.psi_memory_some, r.psi_memory_full, r.psi_cpu_some, r.psi_io_some) == (1.5, 0.25, 12.0, 3.0)
    assert abs(r.ts - time.time()) < 30


@pytest.fixture
def virtio_agent(spawn, proc_root):
    """The agent serving a socketpair end as if it were /dev/vport0p1; returns (host end, process)."""

    def start(*extra, python=sys.executable):
        host, guest = socket.socketpair()
        p = spawn("--transport", "virtio", "--port-fd", guest.fileno(), "--proc-root", proc_root,
                  *extra, pass_fds=(guest.fileno(),), python=python)
        guest.close()
        return host, p

    return start


def write_key(path: Path, mode: int = 0o600, key: bytes = KEY) -> Path:
    path.write_bytes(key + b"\n")
    path.chmod(mode)
    return path


def start_tcp_agent(spawn, proc_root, key_file, *extra, python=sys.executable):
    p = spawn("--transport", "tcp", "--listen", "127.0.0.1:0", "--key-file", key_file,
              "--proc-root", proc_root, "--print-listen", *extra, stdout=subprocess.PIPE, python=python)
    ready = select.select([p.stdout], [], [], 10)[0]
    assert ready, "agent did not start listening"
    words = p.stdout.readline().split()
    assert words[:1] == [b"listening"], p.stderr.read() if p.poll() is not None else words
    return p, f"tcp:{words[1].decode()}:{int(words[2])}"


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def load_agent_module():
    spec = importlib.util.spec_from_file_location("rescoin_agent_under_test", AGENT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------
# (a) virtio-serial transport


@PYTHONS
def test_virtio_stats_round_trip(virtio_agent, python):
    host, _ = virtio_agent(python=python)
    with host:
        line = ask(host, {"op": "stats", "nonce": "ab12"})
        check_report(parse_reply(line, nonce="ab12"))
        assert json.loads(line)["psi"]["io"]["full_avg10"] == 2.0

        bare = ask(host, b"stats")
        check_report(parse_reply(bare))

        unknown = json.loads(ask(host, {"op": "reboot", "nonce": "x"}))
        assert unknown == {"v": 1, "error": "unknown op", "nonce": "x"}
        with pytest.raises(AgentError, match="unknown op"):
            parse_reply(json.dumps(unknown).encode(), nonce="x")

        assert json.loads(ask(host, b"{not json"))["error"] == "bad request"
        assert json.loads(ask(host, b"[" * 4000))["error"] == "bad request"  # deep nesting
        assert json.loads(ask(host, b"x" * 5000))["error"] == "request too long"
        # the agent is still fine after the junk
        check_report(parse_reply(ask(host, {"op": "stats", "nonce": "cd"}), nonce="cd"))


def test_virtio_on_a_device_path(spawn, proc_root):
    """``--port PATH`` opens a character device read/write (a pty stands in for /dev/vport0p1)."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        spawn("--port", os.ttyname(slave), "--proc-root", proc_root)
        os.write(master, b'{"op": "stats", "nonce": "pty1"}\n')
        buf = b""
        deadline = time.monotonic() + 5
        while b"\n" not in buf and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                buf += os.read(master, 65536)
        check_report(parse_reply(buf.split(b"\n")[0], nonce="pty1"))
    finally:
        os.close(master)
        os.close(slave)


def test_virtio_host_gone_does_not_spin_or_exit(virtio_agent):
    host, p = virtio_agent()
    check_report(parse_reply(ask(host, b"stats")))
    host.close()  # reads now return EOF forever, as on a port with no host connected
    time.sleep(0.3)
    before = cpu_seconds(p.pid)
    time.sleep(1.0)
    assert p.poll() is None, "agent exited when the host side went away"
    assert cpu_seconds(p.pid) - before < 0.25, "agent spins on EOF"


def test_find_port_by_name(tmp_path):
    mod = load_agent_module()
    sysfs = tmp_path / "sys" / "class" / "virtio-ports"
    for dev, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p1", "org.rescoin.agent.0")):
        (sysfs / dev).mkdir(parents=True)
        (sysfs / dev / "name").write_text(name + "\n")
    assert mod.find_port(str(tmp_path / "sys"), "/dev") == "/dev/vport1p1"
    assert mod.find_port(str(tmp_path / "none"), "/dev") == "/dev/virtio-ports/org.rescoin.agent.0"


def test_missing_files_and_fields_are_omitted(spawn, tmp_path):
    root = tmp_path / "proc"
    root.mkdir()
    (root / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 400 kB\nbogus line\n")
    (root / "stat").write_text("cpu  1 2 3 4\n")  # an ancient kernel: no steal column
    out = subprocess.run([sys.executable, str(AGENT), "--once", "--proc-root", str(root)],
                         capture_output=True, timeout=10, check=True).stdout
    reply = json.loads(out)
    assert reply["mem"] == {"total_kib": 1000, "free_kib": 400}
    assert reply["cpu"] == {"total_ticks": 10}
    assert "psi" not in reply and "vmstat" not in reply
    r = parse_reply(out)
    assert math.isnan(r.mem_available_mib) and math.isnan(r.psi_memory_some) and math.isnan(r.cpu_steal_ticks)
    assert r.mem_total_mib == pytest.approx(1000 / 1024)


@PYTHONS
def test_help_and_once(proc_root, python):
    help_text = subprocess.run([python, str(AGENT), "--help"], capture_output=True, text=True,
                               timeout=10, check=True).stdout
    for word in ("--transport", "--listen", "--key-file", "--proc-root", "--once", "--test-hooks"):
        assert word in help_text
    out = subprocess.run([python, str(AGENT), "--once", "--proc-root", str(proc_root)],
                         capture_output=True, timeout=10, check=True).stdout
    check_report(parse_reply(out))


class ChannelRelay:
    """Stands in for QEMU's ``<channel type='unix'>`` socket: one host client at a
    time, bytes shuttled to and from the guest's port. Bytes the guest writes while
    no client is connected wait for the next client, as they do with QEMU."""

    def __init__(self, path: Path, port_end: socket.socket):
        self.port_end = port_end
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.stop = threading.Event()
        self.pending = b""  # guest output written while no client was connected
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            if not select.select([self.listener], [], [], 0.05)[0]:
                continue
            conn, _ = self.listener.accept()
            with conn:
                pending, self.pending = self.pending, b""
                conn.sendall(pending)
                while not self.stop.is_set():
                    ready = select.select([conn, self.port_end], [], [], 0.05)[0]
                    try:
                        if conn in ready:
                            data = conn.recv(65536)
                            if not data:
                                break
                            self.port_end.sendall(data)
                        if self.port_end in ready:
                            conn.sendall(self.port_end.recv(65536))
                    except OSError:
                        break

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


def test_client_through_a_channel_socket_skips_stale_replies(spawn, proc_root, short_dir):
    host, guest = socket.socketpair()
    spawn("--port-fd", guest.fileno(), "--proc-root", proc_root, pass_fds=(guest.fileno(),))
    guest.close()
    relay = ChannelRelay(short_dir / "ch.sock", host)
    try:
        endpoint = {"vm-1": f"unix:{short_dir / 'ch.sock'}"}
        client = AgentClient(timeout=2.0)
        check_report(client.query(endpoint)["vm-1"])
        # a late reply to an earlier, timed-out query is waiting in the channel
        stale = json.dumps({"v": 1, "ts": time.time(), "nonce": "old", "mem": {"total_kib": 1}})
        relay.pending = stale.encode() + b"\n"
        report = client.query(endpoint)["vm-1"]
        check_report(report)
        assert client.last_errors == {}
    finally:
        relay.close()
        host.close()


def test_key_signs_tcp_agents_only_virtio_ones_answer_unsigned(spawn, proc_root, short_dir, tmp_path):
    # [agent] key_file set: a virtio-serial agent (host-only channel, unsigned) keeps working
    host, guest = socket.socketpair()
    spawn("--port-fd", guest.fileno(), "--proc-root", proc_root, pass_fds=(guest.fileno(),))
    guest.close()
    relay = ChannelRelay(short_dir / "ch.sock", host)
    _, tcp = start_tcp_agent(spawn, proc_root, write_key(tmp_path / "key"))
    try:
        client = AgentClient(timeout=2.0, key=KEY)
        result = client.query({"virtio": f"unix:{short_dir / 'ch.sock'}", "tcp": tcp})
        check_report(result["virtio"])
        check_report(result["tcp"])
        assert client.last_errors == {}
        # a TCP agent must still sign: an unsigned reply over TCP is refused
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            port = listener.getsockname()[1]
            served = threading.Thread(target=lambda: _unsigned_once(listener), daemon=True)
            served.start()
            assert client.query({"tcp": f"tcp:127.0.0.1:{port}"})["tcp"] is None
            served.join(5)
        assert "unsigned" in client.last_errors["tcp"]
    finally:
        relay.close()
        host.close()


def _unsigned_once(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        nonce = json.loads(conn.makefile().readline())["nonce"]
        conn.sendall(good_reply(nonce))


# ---------------------------------------------------------------------------
# (b) TCP transport with HMAC


@PYTHONS
def test_tcp_signed_reply(spawn, proc_root, tmp_path, python):
    key_file = write_key(tmp_path / "key")
    p, endpoint = start_tcp_agent(spawn, proc_root, key_file, python=python)
    client = AgentClient(timeout=2.0, key=load_key(key_file))
    reports = client.query({"vm": endpoint})
    assert client.last_errors == {}
    check_report(reports["vm"])

    wrong = AgentClient(timeout=2.0, key=b"another key, 16+ bytes long")
    assert wrong.query({"vm": endpoint}) == {"vm": None}
    assert "hmac" in wrong.last_errors["vm"]

    unsigned = AgentClient(timeout=2.0)  # no key: a signed reply cannot be trusted
    assert unsigned.query({"vm": endpoint}) == {"vm": None}
    assert "no key" in unsigned.last_errors["vm"]


def test_tcp_replay_is_rejected(spawn, proc_root, tmp_path):
    key_file = write_key(tmp_path / "key")
    _, endpoint = start_tcp_agent(spawn, proc_root, key_file)
    port = int(endpoint.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        line = ask(s, {"op": "stats", "nonce": "n1"})
    envelope = json.loads(line)
    assert set(envelope) == {"payload", "hmac"}
    ts = json.loads(envelope["payload"])["ts"]

    check_report(parse_reply(line, key=KEY, nonce="n1"))
    with pytest.raises(StaleReply):
        parse_reply(line, key=KEY, nonce="n2")  # replayed as the answer to another request
    with pytest.raises(AgentError, match="stale"):
        parse_reply(line, key=KEY, nonce="n1", now=ts + 31)  # replayed later
    with pytest.raises(AgentError, match="stale"):
        parse_reply(line, key=KEY, nonce="n1", now=ts - 31)  # from the future
    with pytest.raises(AgentError, match="unsigned"):
        parse_reply(envelope["payload"].encode(), key=KEY, nonce="n1")  # payload without envelope
    tampered = envelope["payload"].replace('"total_kib":2048000', '"total_kib":4096000')
    assert tampered != envelope["payload"]
    with pytest.raises(AgentError, match="hmac"):
        parse_reply(json.dumps({"payload": tampered, "hmac": envelope["hmac"]}).encode(), key=KEY)


@PYTHONS
def test_tcp_refuses_to_start_without_a_private_key(spawn, proc_root, tmp_path, python):
    p = spawn("--transport", "tcp", "--proc-root", proc_root, python=python)
    assert p.wait(timeout=10) == 2
    assert b"--key-file" in p.stderr.read()

    open_key = write_key(tmp_path / "key", mode=0o644)
    p = spawn("--transport", "tcp", "--key-file", open_key, "--proc-root", proc_root, python=python)
    assert p.wait(timeout=10) == 2
    assert b"group/other" in p.stderr.read()
    with pytest.raises(AgentError, match="group/other"):
        load_key(open_key)

    p = spawn("--transport", "tcp", "--key-file", tmp_path / "missing", "--proc-root", proc_root)
    assert p.wait(timeout=10) == 2


def test_tcp_listens_on_loopback_by_default(spawn, proc_root, tmp_path):
    key_file = write_key(tmp_path / "key")
    p = spawn("--transport", "tcp", "--listen", "0", "--key-file", key_file, "--proc-root", proc_root,
              "--print-listen", stdout=subprocess.PIPE)
    assert select.select([p.stdout], [], [], 10)[0]
    assert p.stdout.readline().split()[1] == b"127.0.0.1"
    mod = load_agent_module()
    assert mod.build_parser().parse_args(["--transport", "tcp"]).listen.startswith("127.0.0.1:")
    assert mod.parse_listen("[::1]:7000") == ("::1", 7000)
    assert mod.parse_listen("0.0.0.0:7000") == ("0.0.0.0", 7000)


# ---------------------------------------------------------------------------
# (c) AgentClient against misbehaving agents


def good_reply(nonce: str, **extra) -> bytes:
    reply = {"v": 1, "ts": time.time(), "nonce": nonce, "mem": {"total_kib": 4096, "available_kib": 1024}}
    reply.update(extra)
    return json.dumps(reply).encode() + b"\n"


class FakeAgent:
    """A UNIX-socket server that behaves in one (mis)way for every connection."""

    def __init__(self, path: Path, behaviour: str, delay: float = 0.0):
        self.path, self.behaviour, self.delay = str(path), behaviour, delay
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    @property
    def endpoint(self) -> str:
        return f"unix:{self.path}"

    def _accept(self):
        while not self.stop.is_set():
            if not select.select([self.listener], [], [], 0.05)[0]:
                continue
            conn, _ = self.listener.accept()
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn):
        with conn:
            try:
                if self.behaviour == "close":
                    return
                conn.settimeout(5)
                request = b""
                while b"\n" not in request:
                    data = conn.recv(4096)
                    if not data:
                        return
                    request += data
                nonce = json.loads(request)["nonce"]
                if self.behaviour == "good":
                    conn.sendall(good_reply(nonce))
                elif self.behaviour == "stale-then-good":
                    conn.sendall(good_reply("0" * 32) + b"\n" + good_reply(nonce))
                elif self.behaviour == "garbage":
                    conn.sendall(b"\xff\xfe\x00 not json at all\n")
                elif self.behaviour == "wrong-version":
                    conn.sendall(good_reply(nonce, v=2))
                elif self.behaviour == "huge":
                    conn.sendall(b"[" + b"1," * (1 << 19) + b"1]\n")  # 1 MiB line
                elif self.behaviour == "slow":
                    self.stop.wait(self.delay)
                    conn.sendall(good_reply(nonce))
                if self.behaviour in ("hang", "slow"):
                    while not self.stop.is_set() and conn.recv(4096):  # until the client hangs up
                        pass
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.acceptor.join(5)
        for t in self.threads:
            t.join(5)
        self.listener.close()


@pytest.fixture
def fakes(short_dir):
    made = []

    def make(behaviour, delay=0.0):
        fake = FakeAgent(short_dir / f"{behaviour}{len(made)}.sock", behaviour, delay)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


def test_client_each_misbehaviour_gives_none_with_a_reason(fakes, short_dir):
    timeout = 0.5
    servers = {name: fakes(name, delay=timeout + 1.0) for name in
               ("good", "stale-then-good", "garbage", "wrong-version", "huge", "hang", "close", "slow")}
    endpoints = {name: f.endpoint for name, f in servers.items()}
    endpoints["missing"] = f"unix:{short_dir / 'nobody.sock'}"
    endpoints["bad-endpoint"] = "carrier-pigeon:42"
    endpoints["refused"] = "tcp:127.0.0.1:1"
    client = AgentClient(timeout=timeout)

    start = time.monotonic()
    result = client.query(endpoints)
    elapsed = time.monotonic() - start

    assert elapsed < timeout + 0.5
    assert set(result) == set(endpoints)
    for name in ("good", "stale-then-good"):
        assert result[name].mem_total_mib == 4.0 and result[name].used_mib == 3.0
    reasons = {
        "garbage": "UTF-8",
        "wrong-version": "version",
        "huge": "longer than 65536",
        "hang": "timeout",
        "slow": "timeout",
        "close": "closed",
        "missing": "cannot connect",
        "bad-endpoint": "bad endpoint",
        "refused": "cannot connect",
    }
    for name, reason in reasons.items():
        assert result[name] is None, name
        assert reason in client.last_errors[name], (name, client.last_errors[name])
    assert set(client.last_errors) == set(reasons)


def test_client_odd_endpoints(short_dir):
    client = AgentClient(timeout=0.2)
    odd = {"nul": "unix:/tmp/a\0b", "digits": "tcp:127.0.0.1:\u00b2", "no-port": "tcp:127.0.0.1",
           "no-host": "tcp::80", "not-str": 42, "empty": "", "long-label": "tcp:" + "a" * 300 + ".x:80",
           "long-path": "unix:" + "/x" * 200}
    result = client.query(odd)
    assert result == dict.fromkeys(odd)
    assert set(client.last_errors) == set(odd)
    assert AgentClient().query({}) == {}


def test_client_many_slow_agents_share_one_deadline(fakes):
    hang = fakes("hang")
    good = fakes("good")
    endpoints = {f"hang-{i}": hang.endpoint for i in range(30)}
    endpoints.update({f"good-{i}": good.endpoint for i in range(30)})
    client = AgentClient(timeout=0.3)
    start = time.monotonic()
    result = client.query(endpoints)
    assert time.monotonic() - start < 0.3 + 0.4  # not 30 x 0.3 s
    assert all(result[f"good-{i}"] is not None for i in range(30))
    assert all(result[f"hang-{i}"] is None for i in range(30))


def test_client_reply_cap_is_configurable(fakes):
    good = fakes("good")
    assert AgentClient(timeout=1, max_reply=64).query({"a": good.endpoint})["a"] is None
    assert AgentClient(timeout=1, max_reply=4096).query({"a": good.endpoint})["a"] is not None


def test_client_does_not_leak_fds(fakes, short_dir):
    endpoints = {
        "good": fakes("good").endpoint,
        "garbage": fakes("garbage").endpoint,
        "close": fakes("close").endpoint,
        "huge": fakes("huge").endpoint,
        "missing": f"unix:{short_dir / 'nobody.sock'}",
    }
    hang = fakes("hang").endpoint
    client = AgentClient(timeout=1.0)

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    client.query(endpoints)
    before = open_fds()
    for _i in range(200):
        result = client.query(endpoints)
        assert result["good"] is not None
    for _i in range(10):
        assert AgentClient(timeout=0.01).query({"hang": hang})["hang"] is None
    deadline = time.monotonic() + 2  # server threads close their ends a moment later
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert open_fds() <= before


# ---------------------------------------------------------------------------
# (d) test hooks


@PYTHONS
def test_chaos_garbage_hang_normal(virtio_agent, python):
    host, _ = virtio_agent("--test-hooks", python=python)
    with host:
        assert json.loads(ask(host, {"op": "chaos", "mode": "garbage"}))["chaos"] == "garbage"
        with pytest.raises(AgentError):
            parse_reply(ask(host, {"op": "stats", "nonce": "1"}), nonce="1")

        assert json.loads(ask(host, {"op": "chaos", "mode": "hang"}))["chaos"] == "hang"
        assert ask(host, {"op": "stats", "nonce": "2"}, timeout=0.5) is None  # read, not answered

        assert json.loads(ask(host, {"op": "chaos", "mode": "normal"}))["chaos"] == "normal"
        check_report(parse_reply(ask(host, {"op": "stats", "nonce": "3"}), nonce="3"))


@PYTHONS
def test_chaos_exit(virtio_agent, python):
    host, p = virtio_agent("--test-hooks", python=python)
    with host:
        host.sendall(b'{"op": "chaos", "mode": "exit"}\n')
        assert p.wait(timeout=5) == 3


def test_chaos_lie_claims_starvation_huge_claims_2_64(virtio_agent):
    host, _ = virtio_agent("--test-hooks")
    with host:
        ask(host, {"op": "chaos", "mode": "lie"})
        first = parse_reply(ask(host, {"op": "stats", "nonce": "1"}), nonce="1")
        time.sleep(0.2)
        then = parse_reply(ask(host, {"op": "stats", "nonce": "2"}), nonce="2")
        assert then.mem_available_mib <= 0.011 * then.mem_total_mib and then.psi_memory_some >= 50
        assert then.major_faults > first.major_faults and then.swap_in > first.swap_in
        ask(host, {"op": "chaos", "mode": "huge"})
        huge = parse_reply(ask(host, {"op": "stats", "nonce": "3"}), nonce="3")  # parses: each value < 2^64 ...
        assert huge.mem_total_mib == pytest.approx(1e18 / 1024)
        with pytest.raises(AgentError, match="beyond the VM's 2048 MiB"):
            check_size(huge, 2048.0)  # ... but no 2 GiB guest has that much memory
        check_size(then, 2048.0)  # a MemTotal within the VM's size is fine


def test_chaos_is_off_by_default(virtio_agent):
    host, p = virtio_agent()
    with host:
        reply = json.loads(ask(host, {"op": "chaos", "mode": "exit"}))
        assert reply["error"] == "unknown op"
        assert p.poll() is None


def test_chaos_over_tcp(spawn, proc_root, tmp_path):
    key_file = write_key(tmp_path / "key")
    _, endpoint = start_tcp_agent(spawn, proc_root, key_file, "--test-hooks")
    port = int(endpoint.rsplit(":", 1)[1])
    client = AgentClient(timeout=0.5, key=KEY)
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        ask(s, {"op": "chaos", "mode": "garbage"})
    assert client.query({"vm": endpoint})["vm"] is None
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        ask(s, {"op": "chaos", "mode": "normal"})
    assert client.query({"vm": endpoint})["vm"] is not None


# ---------------------------------------------------------------------------
# (e) the agent stays runnable on old guests


def test_agent_source_is_python36_stdlib_only():
    src = AGENT.read_text()
    tree = ast.parse(src, feature_version=(3, 6))
    compile(src, str(AGENT), "exec")
    py36_stdlib = {"argparse", "errno", "fcntl", "hashlib", "hmac", "json", "os", "random", "select",
                   "socket", "stat", "sys", "threading", "time", "struct", "signal", "collections",
                   "functools", "io", "re", "string", "binascii", "base64", "traceback", "logging"}
    for node in ast.walk(tree):
        assert not isinstance(node, ast.NamedExpr), "walrus is 3.8+"
        assert not isinstance(node, ast.JoinedStr), "keep f-strings out (f'{x=}' is 3.8+)"
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.module != "__future__", "no __future__ imports"
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        for name in names:
            assert name in py36_stdlib, f"{name} is not in the Python 3.6 standard library set"
        assert "dataclasses" not in names
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert not node.args.posonlyargs, "positional-only parameters are 3.8+"


def test_unit_and_init_files():
    unit = (AGENT.parent / "rescoin-agent.service").read_text()
    assert "Restart=always" in unit
    assert "EnvironmentFile=-/etc/default/rescoin-agent" in unit
    assert "/usr/local/sbin/rescoin_agent.py --transport virtio $RESCOIN_AGENT_ARGS" in unit
    init = AGENT.parent / "rescoin-agent.init"
    text = init.read_text()
    assert text.startswith("#!/bin/sh")
    for word in ("start)", "stop)", "status)", "restart|", "PIDFILE"):
        assert word in text
    sh = shutil.which("sh")
    subprocess.run([sh, "-n", str(init)], check=True)


def test_init_script_start_status_stop(tmp_path, proc_root):
    """The init script runs the agent in the background with a pid file and stops it."""
    init = AGENT.parent / "rescoin-agent.init"
    env = dict(os.environ, RESCOIN_AGENT=str(AGENT), PYTHON=sys.executable,
               PIDFILE=str(tmp_path / "agent.pid"), LOGFILE=str(tmp_path / "agent.log"),
               DEFAULTS=str(tmp_path / "defaults"))
    (tmp_path / "defaults").write_text(
        f'RESCOIN_AGENT_ARGS="--port {tmp_path / "no-such-port"} --proc-root {proc_root}"\n')

    def run(cmd):
        return subprocess.run(["sh", str(init), cmd], env=env, capture_output=True, text=True, timeout=20)

    try:
        assert run("start").returncode == 0
        pid = int((tmp_path / "agent.pid").read_text())
        assert run("status").returncode == 0
        assert run("start").returncode == 0  # already running: fine
        assert int((tmp_path / "agent.pid").read_text()) == pid
        assert run("restart").returncode == 0
        pid2 = int((tmp_path / "agent.pid").read_text())
        assert pid2 != pid
        assert run("stop").returncode == 0
        assert run("status").returncode == 3
        assert not (tmp_path / "agent.pid").exists()
    finally:
        for name in ("agent.pid",):
            path = tmp_path / name
            if path.exists():
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(path.read_text()), 9)


def test_init_script_reports_a_slow_start_that_fails_as_failed(tmp_path):
    """An agent that dies after a second (a slow guest) is a failed start, not "started"; a start that says
    it serves is "started" at once, without waiting out the whole wait."""
    init = AGENT.parent / "rescoin-agent.init"
    slow = tmp_path / "rescoin_slow.py"  # the name must hold "rescoin": the script checks the pid's cmdline
    slow.write_text("import sys, time\ntime.sleep(1.0)\nsys.stderr.write('rescoin-agent: cannot open x\\n')\n"
                    "sys.exit(1)\n")
    log = tmp_path / "agent.log"
    log.write_text("rescoin-agent: serving on /dev/old-run\n")  # an earlier run's line does not count
    env = dict(os.environ, RESCOIN_AGENT=str(slow), PYTHON=sys.executable, PIDFILE=str(tmp_path / "agent.pid"),
               LOGFILE=str(log), DEFAULTS=str(tmp_path / "none"))
    r = subprocess.run(["sh", str(init), "start"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "failed to start" in r.stderr, (r.stdout, r.stderr)
    assert not (tmp_path / "agent.pid").exists()

    fast = tmp_path / "rescoin_fast.py"
    fast.write_text("import sys, time\nsys.stderr.write('rescoin-agent: serving on /dev/x\\n')\n"
                    "sys.stderr.flush()\ntime.sleep(60)\n")
    env.update(RESCOIN_AGENT=str(fast), RESCOIN_AGENT_START_WAIT="20")
    t0 = time.monotonic()
    r = subprocess.run(["sh", str(init), "start"], env=env, capture_output=True, text=True, timeout=30)
    try:
        assert r.returncode == 0 and "started (pid" in r.stdout and "has not said" not in r.stdout, r.stdout
        assert time.monotonic() - t0 < 10
    finally:
        os.kill(int((tmp_path / "agent.pid").read_text()), 9)


# ---------------------------------------------------------------------------
# parse_reply and signals_from in detail


def sign(payload: str, key: bytes = KEY) -> bytes:
    mac = hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()
    return json.dumps({"payload": payload, "hmac": mac}).encode()


def base_reply(**changes) -> dict:
    reply = {"v": 1, "ts": 1000.0, "nonce": "n",
             "mem": {"total_kib": 2048, "available_kib": 1024, "free_kib": 512,
                     "swap_total_kib": 0, "swap_free_kib": 0},
             "vmstat": {"pgmajfault": 1, "pswpin": 0},
             "cpu": {"total_ticks": 100, "steal_ticks": 5},
             "psi": {"memory": {"some_avg10": 1.0, "full_avg10": 0.5}}}
    reply.update(changes)
    return reply


@pytest.mark.parametrize("changes, reason", [
    ({"v": 2}, "version"),
    ({"v": True}, "version"),
    ({"ts": -1}, "ts"),
    ({"ts": "now"}, "ts"),
    ({"mem": {"total_kib": 10, "available_kib": 20}}, "exceeds"),
    ({"mem": {"swap_total_kib": 10, "swap_free_kib": 20}}, "exceeds"),
    ({"mem": {"total_kib": True}}, "number"),
    ({"mem": {"total_kib": -5}}, "range"),
    ({"mem": {"total_kib": 10 ** 30}}, "range"),
    ({"mem": [1, 2]}, "object"),
    ({"cpu": {"total_ticks": 5, "steal_ticks": 6}}, "exceeds"),
    ({"psi": {"memory": {"some_avg10": 100.5}}}, "range"),
    ({"psi": {"io": "high"}}, "object"),
    ({"error": "boom"}, "agent error"),
])
def test_parse_reply_rejects(changes, reason):
    with pytest.raises(AgentError, match=reason):
        parse_reply(json.dumps(base_reply(**changes)).encode(), nonce="n")


def test_parse_reply_rejects_odd_json():
    for line in (b"NaN", b'{"v": 1, "ts": NaN}', b'{"v": 1, "ts": Infinity}', b'{"v": 1, "v": 1, "ts": 1}',
                 b"[1]", b"", b"\xff", b"[" * 100000, b'{"v": 1, "ts": 1' + b"0" * 5000 + b"}"):
        with pytest.raises(AgentError):
            parse_reply(line)
    with pytest.raises(AgentError, match="nonce"):
        parse_reply(json.dumps(base_reply(nonce=None)).encode(), nonce="n")
    with pytest.raises(AgentError, match="no key"):
        parse_reply(sign(json.dumps(base_reply())))
    with pytest.raises(AgentError, match="hex"):
        parse_reply(json.dumps({"payload": "{}", "hmac": "zz" * 32}).encode(), key=KEY)
    with pytest.raises(AgentError, match="hex"):
        parse_reply(json.dumps({"payload": "{}", "hmac": "\u00e9" * 64}).encode(), key=KEY)


def test_parse_reply_accepts_signed_and_str():
    payload = json.dumps(base_reply())
    r = parse_reply(sign(payload), key=KEY, nonce="n", now=1010.0)
    assert r.mem_total_mib == 2.0 and r.used_mib == 1.0 and r.cpu_steal_ticks == 5
    assert math.isnan(r.psi_io_some) and math.isnan(r.psi_cpu_some)
    assert parse_reply(payload, nonce="n") == r  # str works too, unknown keys ignored
    assert parse_reply(json.dumps(base_reply(extra={"x": [1, {"y": None}]}))).ts == 1000.0


def report(**kw) -> AgentReport:
    nan = float("nan")
    base = dict.fromkeys((f.name for f in fields(AgentReport)), nan)
    base.update(kw)
    return AgentReport(**base)


def test_signals_from():
    prev = report(ts=100.0, cpu_total_ticks=1000, cpu_steal_ticks=100, swap_in=0, major_faults=0)
    now = replace(prev, ts=110.0, cpu_total_ticks=2000, cpu_steal_ticks=350, psi_memory_some=20.0,
                  psi_io_some=7.0)
    s = signals_from(now, prev)
    assert s[Resource.CPU] == pytest.approx(0.25)
    assert s[Resource.MEMORY] == pytest.approx(0.2)
    assert s[Resource.DISK] == pytest.approx(0.07)

    # no PSI: swap-in and major-fault rates stand in for memory pressure
    no_psi = replace(now, psi_memory_some=float("nan"), swap_in=2560, major_faults=100)
    assert signals_from(no_psi, prev)[Resource.MEMORY] == pytest.approx(0.5)  # 256 pages/s
    quiet = replace(no_psi, swap_in=0, major_faults=0)
    assert signals_from(quiet, prev)[Resource.MEMORY] == 0.0

    # first report: no deltas yet
    first = signals_from(no_psi)
    assert math.isnan(first[Resource.CPU]) and math.isnan(first[Resource.MEMORY])
    # guest rebooted: counters went backwards
    rebooted = replace(no_psi, cpu_total_ticks=10, cpu_steal_ticks=1, swap_in=0, major_faults=0)
    reset = signals_from(rebooted, replace(prev, swap_in=500, major_faults=500))
    assert math.isnan(reset[Resource.CPU]) and math.isnan(reset[Resource.MEMORY])
    for value in s.values():
        assert 0.0 <= value <= 1.0
