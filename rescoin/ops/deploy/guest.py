"""One guest over SSH (paramiko): connect, check, upload, start, ask the agent."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shlex
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rescoin.hosts.agent import AgentError, parse_reply
from rescoin.ops.deploy.targets import (
    MAX_OUTPUT,
    MAX_REPLY,
    MIN_PYTHON,
    REMOTE_AGENT,
    REMOTE_DEFAULTS,
    REMOTE_INIT,
    REMOTE_KEY,
    REMOTE_LOG,
    REMOTE_PIDFILE,
    SERVICE,
    HostFailure,
    RemoteFile,
    Settings,
    Target,
)

_CONNECT_FAILED = 2           # SSH_OPEN_CONNECT_FAILED: nothing listens (yet) at the forwarded address
_STAGING_RE = re.compile(r"/tmp/rescoin-deploy\.[A-Za-z0-9]+")


@dataclass
class HostResult:
    target: Target
    result: str = "FAILED"               # installed / updated / unchanged / FAILED
    changed: list[str] = field(default_factory=list)
    answered: bool = False
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result != "FAILED"


@dataclass
class _Run:
    rc: int
    out: str
    err: str

    def tail(self, lines: int = 5, limit: int = 400) -> str:
        text = "\n".join(t for t in (self.out, self.err) if t.strip())
        kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        joined = " | ".join(kept)
        return joined if len(joined) <= limit else "..." + joined[-limit:]


def _host_key_policies():
    import paramiko

    class Refuse(paramiko.MissingHostKeyPolicy):
        def __init__(self, known_hosts: Path):
            self.known_hosts = known_hosts

        def missing_host_key(self, client, hostname, key):
            raise HostFailure(
                f"unknown host key for {hostname} ({key.get_name()} {key.fingerprint}), not in "
                f"{self.known_hosts}: refused. Check the fingerprint on the guest's console "
                f"(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), then record it by running again "
                f"with --accept-new-host-keys")

    class Record(paramiko.MissingHostKeyPolicy):
        """Accept a host we have never seen and append its key to known_hosts."""

        def __init__(self, known_hosts: Path, lock: threading.Lock):
            self.known_hosts = known_hosts
            self.lock = lock
            self.recorded = ""

        def missing_host_key(self, client, hostname, key):
            line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
            with self.lock:  # threads append to the same file
                try:
                    self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    with os.fdopen(fd, "a") as f:
                        f.write(line)
                except OSError as e:
                    raise HostFailure(f"cannot record the host key in {self.known_hosts}: {e.strerror}") from None
            client.get_host_keys().add(hostname, key.get_name(), key)
            self.recorded = f"new host key {key.get_name()} {key.fingerprint} recorded"

    return Refuse, Record


class _Guest:
    """One SSH connection to a guest and the steps of deploying to it."""

    def __init__(self, target: Target, settings: Settings):
        self.target = target
        self.s = settings
        self.client: Any = None  # a paramiko.SSHClient once connect() ran (paramiko loads lazily)
        self.is_root = False
        self.notes: list[str] = []

    # -- connection ------------------------------------------------------------
    def connect(self) -> None:
        import paramiko

        s, t = self.s, self.target
        client = self.client = paramiko.SSHClient()
        if s.system_known_hosts is not None and s.system_known_hosts.is_file():
            client.load_system_host_keys(str(s.system_known_hosts))
        if s.known_hosts.is_file():
            try:
                client.get_host_keys().load(str(s.known_hosts))
            except Exception as e:  # noqa: BLE001 - paramiko raises several kinds for bad lines
                raise HostFailure(f"cannot read {s.known_hosts}: {e}") from None
        refuse, record = _host_key_policies()
        policy = record(s.known_hosts, s.known_hosts_lock) if s.accept_new_host_keys else refuse(s.known_hosts)
        client.set_missing_host_key_policy(policy)
        try:
            client.connect(t.host, port=t.port, username=t.user, pkey=s.pkey,
                           allow_agent=True, look_for_keys=s.pkey is None and s.use_default_keys,
                           timeout=s.timeout, banner_timeout=s.timeout, auth_timeout=s.timeout,
                           channel_timeout=s.timeout)
        except paramiko.BadHostKeyException as e:
            name = t.host if t.port == 22 else f"[{t.host}]:{t.port}"
            raise HostFailure(
                f"host key for {name} has CHANGED (known_hosts has {e.expected_key.get_name()} "
                f"{e.expected_key.fingerprint}, the guest offered {e.key.get_name()} {e.key.fingerprint}): "
                f"refused, this could be a man-in-the-middle attack. If the guest was reinstalled, "
                f"verify the new key, then remove the old one: "
                f"ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(str(s.known_hosts))}") from None
        except paramiko.AuthenticationException as e:
            how = "the key " + s.pkey.fingerprint if s.pkey is not None else "the ssh-agent's or ~/.ssh keys"
            raise HostFailure(f"authentication failed as {t.user}: the guest refused {how} ({e}); "
                              f"add the public key to ~{t.user}/.ssh/authorized_keys on the guest") from None
        except TimeoutError:
            raise HostFailure(f"cannot connect to {t.host} port {t.port}: timed out after {s.timeout:g}s") from None
        except paramiko.ssh_exception.NoValidConnectionsError as e:
            reasons = sorted({err.strerror or str(err) for err in e.errors.values()})
            raise HostFailure(f"cannot connect to {t.host} port {t.port}: {'; '.join(reasons)}") from None
        except socket.gaierror as e:
            raise HostFailure(f"cannot resolve {t.host}: {e.strerror}") from None
        except OSError as e:
            raise HostFailure(f"cannot connect to {t.host} port {t.port}: {e.strerror or e}") from None
        except paramiko.SSHException as e:
            if "No authentication methods available" in str(e):
                raise HostFailure(f"authentication failed as {t.user}: no key to offer (no --key, the ssh-agent "
                                  "holds none and no ~/.ssh/id_* key was usable); give --key PATH or ssh-add "
                                  "your key") from None
            raise HostFailure(f"SSH error with {t.host} port {t.port}: {e}") from None
        if getattr(policy, "recorded", ""):
            self.notes.append(policy.recorded)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def run(self, command: str, *, as_root: bool = True, what: str = "", timeout: float | None = None) -> _Run:
        """Run a ``sh`` command line on the guest (as root: through ``sudo -n`` unless logged in as root)."""
        if as_root and not self.is_root:
            command = f"sudo -n sh -c {shlex.quote(command)}"
        timeout = self.s.timeout if timeout is None else timeout
        what = what or command
        chan = self.client.get_transport().open_session(timeout=timeout)
        try:
            chan.exec_command(command)
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                busy = False
                if chan.recv_ready():
                    data = chan.recv(65536)
                    out += data[: max(0, MAX_OUTPUT - len(out))]
                    busy = True
                if chan.recv_stderr_ready():
                    data = chan.recv_stderr(65536)
                    err += data[: max(0, MAX_OUTPUT - len(err))]
                    busy = True
                if busy:
                    continue
                if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    break  # all output is in (it may arrive after the exit status)
                if time.monotonic() > deadline:
                    raise HostFailure(f"{what}: no result after {timeout:g}s")
                time.sleep(0.01)
            return _Run(chan.recv_exit_status(), out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        finally:
            chan.close()

    # -- steps ------------------------------------------------------------------
    def check_privileges(self) -> None:
        r = self.run("id -u", as_root=False, what="id -u")
        if r.rc != 0 or not r.out.strip().isdigit():
            raise HostFailure(f"cannot run commands on the guest (id -u: {r.tail() or f'exit {r.rc}'})")
        self.is_root = int(r.out) == 0
        if self.is_root:
            return
        r = self.run("sudo -n true", as_root=False, what="sudo -n true")
        if r.rc == 127:
            raise HostFailure(f"{self.target.user} is not root and the guest has no sudo; log in as root")
        if r.rc != 0:
            raise HostFailure(f"{self.target.user} is not root and 'sudo -n' does not work "
                              f"(asks for a password or is not allowed: {r.tail(2)}); "
                              f"log in as root or allow NOPASSWD sudo")

    def check_python(self) -> str:
        r = self.run("python3 --version 2>&1", as_root=False, what="python3 --version")
        m = re.search(r"Python (\d+)\.(\d+)(\S*)", r.out)
        if r.rc == 127 or (r.rc != 0 and not m):
            raise HostFailure("python3 is missing on the guest (the agent needs Python 3.6 or newer; "
                              "e.g. apt-get install python3-minimal)")
        if not m:
            raise HostFailure(f"cannot tell the guest's Python version: {r.tail(2)!r}")
        version = (int(m[1]), int(m[2]))
        if version < MIN_PYTHON:
            raise HostFailure(f"the guest's python3 is {m[1]}.{m[2]}; the agent needs 3.6 or newer")
        return f"{m[1]}.{m[2]}{m[3]}"

    _INSPECT = (
        "import hashlib, json, os, stat, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        with open(p, 'rb') as f:\n"
        "            d = hashlib.sha256(f.read()).hexdigest()\n"
        "        out[p] = [d, stat.S_IMODE(os.stat(p).st_mode)]\n"
        "    except (IOError, OSError):\n"
        "        out[p] = None\n"
        "sys.stdout.write(json.dumps(out) + '\\n')\n"
    )

    def remote_state(self, files: list[RemoteFile]) -> dict[str, tuple[str, int] | None]:
        """SHA-256 and mode of each remote file (None if missing), read as root."""
        paths = [self.s.remote(f.path) for f in files]
        r = self.run(" ".join(["python3", "-c", shlex.quote(self._INSPECT), *map(shlex.quote, paths)]),
                     what="reading the installed files")
        try:
            state = json.loads(r.out)
            return {p: (tuple(state[p]) if state[p] else None) for p in paths}
        except (ValueError, KeyError, TypeError):
            raise HostFailure(f"cannot read the installed files' checksums: {r.tail(3) or f'exit {r.rc}'}") from None

    def upload(self, files: list[RemoteFile]) -> None:
        """Stage ``files`` over SFTP in a private temporary directory, then install them as root."""
        r = self.run("mktemp -d /tmp/rescoin-deploy.XXXXXX", as_root=False, what="mktemp")
        staging = r.out.strip()
        if r.rc != 0 or not _STAGING_RE.fullmatch(staging):
            raise HostFailure(f"cannot make a temporary directory on the guest: {r.tail(2) or staging!r}")
        try:
            sftp = self.client.open_sftp()
            try:
                sftp.chmod(staging, 0o700)
                for i, f in enumerate(files):
                    sftp.putfo(io.BytesIO(f.content), f"{staging}/{i}", file_size=len(f.content), confirm=True)
                    sftp.chmod(f"{staging}/{i}", 0o600)
            finally:
                sftp.close()
            key_dir = self.s.remote(os.path.dirname(REMOTE_KEY))
            dirs = sorted({os.path.dirname(self.s.remote(f.path)) for f in files} - {key_dir})
            steps = ["umask 022"] + (["mkdir -p " + " ".join(map(shlex.quote, dirs))] if dirs else [])
            if any(f.path == REMOTE_KEY for f in files):
                steps.append(f"mkdir -p -m 0700 {shlex.quote(key_dir)}")
            for i, f in enumerate(files):
                src, dst = shlex.quote(f"{staging}/{i}"), shlex.quote(self.s.remote(f.path))
                steps.append(f"install -m {f.mode:04o} {src} {dst}")
            r = self.run(" && ".join(steps), what="installing the files")
            if r.rc != 0:
                raise HostFailure(f"installing the files failed: {r.tail(3) or f'exit {r.rc}'}")
        except OSError as e:  # SFTP errors are IOErrors
            raise HostFailure(f"SFTP upload failed: {e.strerror or e}") from None
        finally:
            # best effort; the failure that matters is raised already
            with contextlib.suppress(Exception):
                self.run(f"rm -rf {shlex.quote(staging)}", as_root=False, what="removing the staging directory")

    def _init_command(self, action: str) -> str:
        s = self.s
        if not s.remote_root:
            return f"{shlex.quote(REMOTE_INIT)} {action}"
        env = {"DEFAULTS": s.remote(REMOTE_DEFAULTS), "RESCOIN_AGENT": s.remote(REMOTE_AGENT),
               "PIDFILE": s.remote(REMOTE_PIDFILE), "LOGFILE": s.remote(REMOTE_LOG)}
        dirs = " ".join(shlex.quote(os.path.dirname(p)) for p in (env["PIDFILE"], env["LOGFILE"]))
        assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        return f"mkdir -p {dirs} && {assign} sh {shlex.quote(s.remote(REMOTE_INIT))} {action}"

    def uses_systemd(self) -> bool:
        if self.s.remote_root:
            return False  # tests: no systemd, start through the init script with the paths moved
        return self.run("test -d /run/systemd/system", as_root=False, what="test -d /run/systemd/system").rc == 0

    def why_not_running(self, systemd: bool) -> str:
        """The last lines the agent (or systemd) logged."""
        if systemd:
            r = self.run(f"systemctl status --no-pager --lines=5 {SERVICE} 2>&1; "
                         f"journalctl --no-pager -n 5 -u {SERVICE} 2>&1", what="systemctl status")
        else:
            r = self.run(f"tail -n 5 {shlex.quote(self.s.remote(REMOTE_LOG))} 2>&1", what="reading the agent's log")
        return r.tail(5) or "(nothing logged)"

    def start(self, restart: bool, systemd: bool) -> None:
        """Make sure the agent runs; restart it if its files changed."""
        if systemd:
            if restart:
                cmd = (f"systemctl daemon-reload && systemctl enable --now {SERVICE} && "
                       f"systemctl restart {SERVICE}")
            else:
                cmd = f"systemctl enable --now {SERVICE}"
            r = self.run(cmd, what="systemctl")
            if r.rc == 0:
                # a crashing agent shows as "activating (auto-restart)" a moment later
                r = self.run(f"sleep 1; systemctl is-active {SERVICE}", what="systemctl is-active")
        else:
            r = self.run(self._init_command("restart" if restart else "start"), what="the init script")
            if r.rc == 0 and not self.s.remote_root:
                # start at boot too where the guest has update-rc.d (Debian-like sysvinit)
                self.run(f"command -v update-rc.d >/dev/null 2>&1 && update-rc.d {SERVICE} defaults >/dev/null 2>&1"
                         " || true", what="update-rc.d")
        if r.rc != 0:
            raise HostFailure(f"the agent did not start: {self.why_not_running(systemd)}")

    def ask_tcp(self):
        """A signed stats reply from the agent, through an SSH direct-tcpip channel to its address."""
        import paramiko

        host, port = self.s.listen
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        transport = self.client.get_transport()
        deadline = time.monotonic() + self.s.timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                chan = transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                              timeout=max(0.5, deadline - time.monotonic()))
            except paramiko.ChannelException as e:
                if e.code != _CONNECT_FAILED:
                    raise HostFailure(f"cannot reach the agent through SSH port forwarding ({e.text}; "
                                      "does the guest's sshd allow AllowTcpForwarding?)") from None
                last = f"nothing listens on {self.s.listen_text()} in the guest"
                time.sleep(0.2)  # not listening yet: the agent may be starting
                continue
            except paramiko.SSHException as e:
                raise HostFailure(f"cannot open a forwarding channel: {e}") from None
            try:
                nonce = secrets.token_hex(16)
                chan.settimeout(max(0.5, deadline - time.monotonic()))
                chan.sendall(json.dumps({"op": "stats", "nonce": nonce}).encode() + b"\n")
                buf = b""
                while b"\n" not in buf and len(buf) <= MAX_REPLY:
                    data = chan.recv(65536)
                    if not data:
                        break
                    buf += data
            except TimeoutError:
                raise HostFailure(f"the agent on {self.s.listen_text()} accepted but did not answer "
                                  f"within {self.s.timeout:g}s") from None
            finally:
                chan.close()
            line, sep, _ = buf.partition(b"\n")
            if not sep:
                last = "the agent closed the connection without a reply"
                time.sleep(0.2)
                continue
            try:
                return parse_reply(line, key=self.s.agent_key, nonce=nonce)
            except AgentError as e:
                raise HostFailure(f"the agent answered, but the reply was rejected: {e}") from None
        raise HostFailure(f"{last} (waited {self.s.timeout:g}s)")

    def ask_once(self):
        """Run the installed agent once (virtio transport) and validate its JSON line."""
        r = self.run(f"python3 {shlex.quote(self.s.remote(REMOTE_AGENT))} --once", as_root=False,
                     what="rescoin_agent.py --once")
        if r.rc != 0:
            raise HostFailure(f"rescoin_agent.py --once failed (exit {r.rc}): {r.tail(3)}")
        try:
            return parse_reply(r.out.strip().splitlines()[-1] if r.out.strip() else "")
        except AgentError as e:
            raise HostFailure(f"rescoin_agent.py --once printed a bad reply: {e}") from None
