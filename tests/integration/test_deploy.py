"""``rescoin agent deploy`` against a real OpenSSH server started by the test.

The "guest" is this machine: sshd listens on 127.0.0.1 (a free port) and lets
root in with a key made in a temporary directory. Every deploy uses the hidden
``--remote-root`` option so that the files land under a per-test directory
instead of /usr/local/sbin and /etc, and the agent is started through its init
script with those paths (no systemd here); it listens on a free loopback port.
sshd and every agent started are killed in teardown.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from rescoin.cli import main as rescoin_main
from rescoin.hosts.agent import AgentClient, load_key
from rescoin.ops.deploy import (
    REMOTE_AGENT,
    REMOTE_DEFAULTS,
    REMOTE_INIT,
    REMOTE_KEY,
    REMOTE_PIDFILE,
    REMOTE_UNIT,
    DeployError,
    parse_target,
    read_inventory,
)


def main(args: list[str]) -> int:
    """``rescoin agent ARGS``: errors are printed by the CLI's dispatch, as for the real command."""
    return rescoin_main(["agent", *args])


SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "rescoin-test", "-f", str(path)],
                   check=True, capture_output=True)
    return path


def _public(path: Path) -> str:
    """``TYPE BASE64`` of a key pair's public half."""
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


class Sshd:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.host_key = _keygen(root / "ssh_host_ed25519_key")
        self.user_key = _keygen(root / "id_user")
        (root / "authorized_keys").write_text(Path(f"{self.user_key}.pub").read_text())
        self.config = root / "sshd_config"
        self.config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {root / "sshd.pid"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {root / "authorized_keys"}
StrictModes no
UsePAM no
AllowTcpForwarding yes
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
        self.log = root / "sshd.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not answer on port {self.port}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {_public(self.host_key)}\n"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not SSHD.exists():
        pytest.fail(f"{SSHD} is missing: install openssh-server (scripts/setup-host does, run by `make test`)")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


def _kill_agent(pidfile: Path) -> None:
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"rescoin_agent.py" in cmdline:
        os.kill(pid, signal.SIGKILL)


class Guest:
    """One deploy's world: a remote root, a known_hosts file, an operator key file, an agent port."""

    def __init__(self, sshd: Sshd, tmp: Path):
        self.sshd = sshd
        self.root = tmp / "guest"
        self.root.mkdir()
        self.known_hosts = tmp / "known_hosts"
        self.known_hosts.write_text(sshd.known_hosts_line())
        self.agent_key = tmp / "operator" / "agent.key"
        self.agent_port = _free_port()
        self.target = f"root@127.0.0.1:{sshd.port}"

    def args(self, *extra: str, key: Path | None = None, target: str | None = None) -> list[str]:
        return ["deploy", target or self.target, "--key", str(key or self.sshd.user_key),
                "--known-hosts", str(self.known_hosts), "--agent-key-file", str(self.agent_key),
                "--listen", f"127.0.0.1:{self.agent_port}", "--remote-root", str(self.root),
                "--timeout", "5", *extra]

    def path(self, remote: str) -> Path:
        return self.root / remote.lstrip("/")

    def pid(self) -> int:
        return int(self.path(REMOTE_PIDFILE).read_text())


@pytest.fixture
def guest(sshd, tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # only the keys the test gives
    monkeypatch.setenv("COLUMNS", "400")  # a wide result table: no wrapped detail text
    g = Guest(sshd, tmp_path)
    yield g
    _kill_agent(g.path(REMOTE_PIDFILE))


def _deploy(capsys, args: list[str]) -> tuple[int, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out + err


def _row(output: str, target: str) -> str:
    """The result table's row for ``target``, its cells' wrapped lines joined, as one line of words."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("│") and target in line.split("│")[1]]
    assert len(starts) == 1, output
    cells: list[list[str]] = []
    for line in lines[starts[0]:]:
        parts = line.split("│")[1:-1]
        if not line.startswith("│") or (cells and parts[0].strip()):
            break  # the table's bottom border or the next row
        cells = cells or [[] for _ in parts]
        for cell, part in zip(cells, parts, strict=False):
            cell.append(part.strip())
    return " ".join(" ".join(" ".join(cell).split()) for cell in cells)


# -- success, idempotence, update ---------------------------------------------------------
def test_install_then_unchanged_then_update(guest, capsys):
    rc, out = _deploy(capsys, guest.args())
    assert rc == 0, out
    assert "deploying" not in out  # no progress bar when stderr is not a terminal (a log file)
    row = _row(out, guest.target)
    assert " installed 5 yes " in f" {row} ", row
    assert f"made a new agent key in {guest.agent_key}" in out

    modes = {REMOTE_AGENT: 0o755, REMOTE_UNIT: 0o644, REMOTE_INIT: 0o755, REMOTE_DEFAULTS: 0o644, REMOTE_KEY: 0o600}
    for remote, mode in modes.items():
        assert stat.S_IMODE(guest.path(remote).stat().st_mode) == mode, remote
    assert guest.path(REMOTE_AGENT).read_bytes() == (REPO / "guest_agent" / "rescoin_agent.py").read_bytes()
    # the operator key was made once (0600) and the guest has the same bytes
    assert stat.S_IMODE(guest.agent_key.stat().st_mode) == 0o600
    key = load_key(guest.agent_key)
    assert len(key) == 64 and guest.path(REMOTE_KEY).read_bytes().strip() == key
    defaults = guest.path(REMOTE_DEFAULTS).read_text()
    assert (f'RESCOIN_AGENT_ARGS="--transport tcp --listen 127.0.0.1:{guest.agent_port} '
            f'--key-file {guest.path(REMOTE_KEY)}"') in defaults

    # the agent really runs and signs with the operator's key
    client = AgentClient(timeout=2.0, key=key)
    report = client.query({"g": f"tcp:127.0.0.1:{guest.agent_port}"})["g"]
    assert report is not None, client.last_errors
    assert report.mem_total_mib > 0
    pid = guest.pid()

    # second run: nothing to do, agent not restarted
    rc, out = _deploy(capsys, guest.args())
    assert rc == 0, out
    assert " unchanged 0 yes " in f" {_row(out, guest.target)} "
    assert guest.pid() == pid
    assert load_key(guest.agent_key) == key  # the key is reused

    # a file changed in the guest: only that one is put back, and the agent restarts
    with open(guest.path(REMOTE_AGENT), "a") as f:
        f.write("# local edit\n")
    rc, out = _deploy(capsys, guest.args())
    assert rc == 0, out
    row = _row(out, guest.target)
    assert " updated 1 yes " in f" {row} " and "changed: agent" in row, row
    assert guest.path(REMOTE_AGENT).read_bytes() == (REPO / "guest_agent" / "rescoin_agent.py").read_bytes()
    assert guest.pid() != pid
    assert AgentClient(timeout=2.0, key=key).query({"g": f"tcp:127.0.0.1:{guest.agent_port}"})["g"] is not None

    # a wrong mode is a difference too (the agent would refuse a group-readable key)
    guest.path(REMOTE_KEY).chmod(0o644)
    rc, out = _deploy(capsys, guest.args())
    assert rc == 0 and " updated 1 yes " in f" {_row(out, guest.target)} ", out
    assert stat.S_IMODE(guest.path(REMOTE_KEY).stat().st_mode) == 0o600


def test_inventory_and_virtio_transport(guest, tmp_path, capsys):
    inventory = tmp_path / "guests.txt"
    inventory.write_text(f"# lab guests\n\n  {guest.target}   # this machine\n")
    args = guest.args("--transport", "virtio", "--inventory", str(inventory))
    args.remove(guest.target)
    rc, out = _deploy(capsys, args)
    assert rc == 0, out
    assert " installed 4 yes " in f" {_row(out, guest.target)} ", out
    assert 'RESCOIN_AGENT_ARGS="--transport virtio"' in guest.path(REMOTE_DEFAULTS).read_text()
    assert not guest.path(REMOTE_KEY).exists()
    assert not guest.agent_key.exists()  # no key needed, none made


def test_key_from_a_running_ssh_agent(guest, tmp_path, capsys, monkeypatch):
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.05)
        env = dict(os.environ, SSH_AUTH_SOCK=str(sock))
        subprocess.run(["ssh-add", str(guest.sshd.user_key)], env=env, check=True, capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        args = guest.args()
        i = args.index("--key")
        del args[i:i + 2]  # no key file: only the ssh-agent holds the authorized key
        rc, out = _deploy(capsys, args)
        assert rc == 0, out
        assert " installed 5 yes " in f" {_row(out, guest.target)} ", out
        # and with the agent emptied, the same deploy is refused
        subprocess.run(["ssh-add", "-D"], env=env, check=True, capture_output=True)
        rc, out = _deploy(capsys, args)
        row = _row(out, guest.target)
        assert rc == 1 and "authentication failed as root: no key to offer" in row, out
    finally:
        agent.terminate()
        agent.wait(timeout=10)


# -- refusals -------------------------------------------------------------------------------
def test_wrong_user_key_is_refused(guest, tmp_path, capsys):
    stranger = _keygen(tmp_path / "id_stranger")
    rc, out = _deploy(capsys, guest.args(key=stranger))
    assert rc == 1, out
    row = _row(out, guest.target)
    assert " FAILED 0 no " in f" {row} " and "authentication failed as root" in row, row
    assert not guest.path(REMOTE_AGENT).exists()


def test_unknown_host_key_refused_then_accepted_and_recorded(guest, capsys):
    guest.known_hosts.write_text("")
    rc, out = _deploy(capsys, guest.args())
    assert rc == 1, out
    row = _row(out, guest.target)
    assert "FAILED" in row and "unknown host key" in row and "--accept-new-host-keys" in row, row
    assert guest.known_hosts.read_text() == ""
    assert not guest.path(REMOTE_AGENT).exists()

    rc, out = _deploy(capsys, guest.args("--accept-new-host-keys"))
    assert rc == 0, out
    assert "new host key" in _row(out, guest.target)
    recorded = guest.known_hosts.read_text().split()
    assert recorded == guest.sshd.known_hosts_line().split()

    rc, out = _deploy(capsys, guest.args())  # known now: no flag needed
    assert rc == 0 and " unchanged " in f" {_row(out, guest.target)} ", out


def test_changed_host_key_is_always_refused(guest, tmp_path, capsys):
    other = _keygen(tmp_path / "other_host_key")
    guest.known_hosts.write_text(f"[127.0.0.1]:{guest.sshd.port} {_public(other)}\n")
    rc, out = _deploy(capsys, guest.args("--accept-new-host-keys"))
    assert rc == 1, out
    row = _row(out, guest.target)
    assert "FAILED" in row and "CHANGED" in row and "attack" in row, row
    assert guest.known_hosts.read_text().split()[2] == _public(other).split()[1]  # left alone
    assert not guest.path(REMOTE_AGENT).exists()


def test_unreachable_host_fails_quickly(guest, capsys):
    closed = f"root@127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    rc, out = _deploy(capsys, guest.args(target=closed))
    assert rc == 1, out
    assert time.monotonic() - t0 < 5
    row = _row(out, closed)
    assert " FAILED 0 no " in f" {row} " and "connection refused" in row.lower(), row


def test_agent_that_cannot_start_is_reported_with_the_reason(guest, capsys):
    # something else already listens on the agent's address: the agent exits at once
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", guest.agent_port))
        squatter.listen(1)
        rc, out = _deploy(capsys, guest.args())
    assert rc == 1, out
    row = _row(out, guest.target)
    assert "FAILED" in row and "did not start" in row and "Address already in use" in row, row
    assert guest.path(REMOTE_AGENT).exists()  # the files were installed all the same


def test_one_failure_does_not_stop_the_others(guest, capsys):
    closed = f"root@127.0.0.1:{_free_port()}"
    args = guest.args("--parallel", "2")
    args.insert(2, closed)
    rc, out = _deploy(capsys, args)
    assert rc == 1, out
    assert " installed 5 yes " in f" {_row(out, guest.target)} "
    assert "FAILED" in _row(out, closed)


# -- usage errors -------------------------------------------------------------------------------
def test_bad_inventory_line_names_the_line(guest, tmp_path, capsys):
    inventory = tmp_path / "guests.txt"
    inventory.write_text("# guests\nroot@10.0.0.5\n\nnot a target\n")
    with pytest.raises(DeployError, match=r"line 4: 'not a target' is not user@host\[:port\]"):
        read_inventory(inventory)
    rc, out = _deploy(capsys, ["deploy", "--inventory", str(inventory), "--key", str(guest.sshd.user_key)])
    assert rc == 2 and "line 4" in out, out


@pytest.mark.parametrize("text", ["10.0.0.5", "root@", "root@host:0", "root@host:99999", "ro ot@host",
                                  "root@-oProxyCommand=x", "root@[zz::1]:22"])
def test_bad_targets(text):
    with pytest.raises(DeployError):
        parse_target(text)


def test_targets():
    assert str(parse_target("root@10.0.0.5")) == "root@10.0.0.5"
    t = parse_target("admin@[fd00::5]:2222")
    assert (t.user, t.host, t.port) == ("admin", "fd00::5", 2222) and str(t) == "admin@[fd00::5]:2222"


def test_usage_errors_exit_2(guest, capsys):
    rc, out = _deploy(capsys, ["deploy", "--key", str(guest.sshd.user_key)])
    assert rc == 2 and "no guests" in out
    rc, out = _deploy(capsys, guest.args("--listen", "nowhere"))
    assert rc == 2 and "--listen" in out
    rc, out = _deploy(capsys, guest.args(key=guest.root / "missing-key"))
    assert rc == 2 and "no such file" in out
    assert not guest.agent_key.exists()  # usage errors make no key
    guest.agent_key.parent.mkdir()
    guest.agent_key.write_text("0123456789abcdef0123456789abcdef\n")
    guest.agent_key.chmod(0o644)
    rc, out = _deploy(capsys, guest.args())
    assert rc == 2 and "chmod 600" in out
    with pytest.raises(SystemExit) as e:
        main(["deploy", "--help"])
    assert e.value.code == 0
    assert "--accept-new-host-keys" in capsys.readouterr().out
