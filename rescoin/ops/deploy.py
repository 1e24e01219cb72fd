"""``rescoin agent deploy``: put the guest agent into guests over SSH.

For every guest (``user@host[:port]``) this module, using paramiko only:

1. connects and verifies the guest's host key against known_hosts (an unknown
   key is refused unless ``--accept-new-host-keys``, which records it; a
   changed key is always refused), then authenticates with a private key
   and/or the ssh-agent;
2. checks that it may act as root (root login, or ``sudo -n``) and that the
   guest has Python 3.6 or newer;
3. compares the SHA-256 (and mode) of every file it manages with the local
   copy and uploads, over SFTP, only what differs: the agent, its systemd unit,
   its init script, ``/etc/default/rescoin-agent`` and, for the TCP transport,
   the shared HMAC key;
4. (re)starts the agent through systemd when the guest runs it, else through
   the init script; it restarts the agent only if a file changed;
5. checks that the agent answers: over TCP a signed stats request through an
   SSH ``direct-tcpip`` channel to the guest's loopback, verified with
   :func:`rescoin.hosts.agent.parse_reply` and the shared key; over virtio-serial a
   ``rescoin_agent.py --once`` run whose JSON line must parse.

Guests are handled in parallel threads; one failing guest never stops the
others. Every remote command is a ``sh`` command line whose variable parts are
``shlex.quote``-d.
"""
from __future__ import annotations

import getpass
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from rescoin.errors import RescoinError
from rescoin.hosts.agent import AgentError, load_key, parse_reply
from rescoin.shipped import GUEST_AGENT_DIR

REMOTE_AGENT = "/usr/local/sbin/rescoin_agent.py"
REMOTE_UNIT = "/etc/systemd/system/rescoin-agent.service"
REMOTE_INIT = "/etc/init.d/rescoin-agent"
REMOTE_DEFAULTS = "/etc/default/rescoin-agent"
REMOTE_KEY = "/etc/rescoin/agent.key"
REMOTE_PIDFILE = "/var/run/rescoin-agent.pid"
REMOTE_LOG = "/var/log/rescoin-agent.log"
SERVICE = "rescoin-agent"

DEFAULT_AGENT_KEY = Path("/etc/rescoin/agent.key")
DEFAULT_LISTEN = "127.0.0.1:9477"
DEFAULT_PARALLEL = 4
DEFAULT_TIMEOUT = 15.0
GLOBAL_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
MIN_PYTHON = (3, 6)
MAX_OUTPUT = 1 << 20          # bytes kept from one remote command's stdout or stderr
MAX_REPLY = 65536             # bytes accepted from the agent (as rescoin.hosts.agent does)
_CONNECT_FAILED = 2           # SSH_OPEN_CONNECT_FAILED: nothing listens (yet) at the forwarded address

_USER_RE = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_NAME_RE = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_TARGET_RE = re.compile(rf"(?P<user>{_USER_RE})@(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>{_NAME_RE}))(?::(?P<port>\d+))?")
_LISTEN_RE = re.compile(rf"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>{_NAME_RE})):(?P<port>\d+)")
_STAGING_RE = re.compile(r"/tmp/rescoin-deploy\.[A-Za-z0-9]+")

log = logging.getLogger(__name__)


class DeployError(RescoinError):
    """A usage problem (bad target, inventory, key file, option): nothing was deployed, exit 2."""


class HostFailure(Exception):
    """Why one guest failed, in words for the result table."""


# ---------------------------------------------------------------------------
# What the operator asked for


@dataclass(frozen=True)
class Target:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")


def _port(text: str, what: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise DeployError(f"{what}: port {port} is out of range 1-65535")
    return port


def parse_target(text: str) -> Target:
    """``user@host``, ``user@host:port`` or ``user@[v6]:port``."""
    m = _TARGET_RE.fullmatch(text.strip())
    if not m:
        raise DeployError(f"{text!r} is not user@host[:port]")
    host = m["v6"] or m["host"]
    if m["v6"]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DeployError(f"{text!r}: {host!r} is not an IPv6 address") from None
    return Target(m["user"], host, _port(m["port"], repr(text)) if m["port"] else 22)


def read_inventory(path: str | Path) -> list[Target]:
    """Targets from a file: one ``user@host[:port]`` a line; ``#`` comments and blank lines ok."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DeployError(f"cannot read inventory {path}: {getattr(e, 'strerror', None) or e}") from None
    targets: list[Target] = []
    seen: dict[Target, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            target = parse_target(entry)
        except DeployError as e:
            raise DeployError(f"{path}, line {number}: {e}") from None
        if target in seen:
            raise DeployError(f"{path}, line {number}: {target} is already on line {seen[target]}")
        seen[target] = number
        targets.append(target)
    if not targets:
        raise DeployError(f"inventory {path} lists no hosts")
    return targets


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[V6]:PORT``) where the agent listens in the guest."""
    m = _LISTEN_RE.fullmatch(text.strip())
    if not m:
        raise DeployError(f"--listen {text!r} is not ADDR:PORT (e.g. {DEFAULT_LISTEN})")
    return m["v6"] or m["host"], _port(m["port"], f"--listen {text!r}")


def ensure_agent_key(path: str | Path) -> bytes:
    """The shared HMAC key in ``path``; made once (``secrets.token_hex(32)``, mode 0600) if missing."""
    path = Path(path)
    if not path.exists():
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # made meanwhile by another deploy: use it
        except OSError as e:
            raise DeployError(f"cannot create agent key file {path}: {e.strerror}") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
    try:
        return load_key(path)
    except AgentError as e:
        raise DeployError(str(e)) from None


def load_private_key(path: str | Path, ask: Callable[[str], str] | None = None):
    """A paramiko key from ``path``; an encrypted key's passphrase is asked on the terminal."""
    import paramiko

    try:
        return paramiko.PKey.from_path(path)
    except TypeError:  # encrypted, and no passphrase given
        pass
    except FileNotFoundError:
        raise DeployError(f"--key {path}: no such file") from None
    except (OSError, ValueError, paramiko.SSHException) as e:
        raise DeployError(f"--key {path}: not a usable private key ({e})") from None
    if ask is None:
        if not sys.stdin.isatty():
            raise DeployError(f"--key {path} is encrypted and there is no terminal to ask for its "
                              f"passphrase; load it into the ssh-agent instead (ssh-add {path})")
        ask = getpass.getpass
    try:
        return paramiko.PKey.from_path(path, ask(f"passphrase for {path}: ").encode())
    except (OSError, ValueError, TypeError, paramiko.SSHException):
        raise DeployError(f"--key {path}: wrong passphrase or unusable key") from None


@dataclass(frozen=True)
class RemoteFile:
    label: str      # short name for the result table
    path: str       # remote path (before --remote-root)
    content: bytes
    mode: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class Settings:
    transport: str = "tcp"
    listen: tuple[str, int] = ("127.0.0.1", 9477)
    agent_key: bytes | None = None       # the shared HMAC key (tcp)
    pkey: object = None                  # paramiko.PKey from --key, or None
    use_default_keys: bool = True        # also try ~/.ssh/id_* (when no --key)
    known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())
    system_known_hosts: Path | None = None
    accept_new_host_keys: bool = False
    timeout: float = DEFAULT_TIMEOUT
    remote_root: str = ""                # tests: prefix of every remote path; start via the init script
    known_hosts_lock: threading.Lock = field(default_factory=threading.Lock)

    def remote(self, path: str) -> str:
        return self.remote_root + path

    def listen_text(self) -> str:
        host, port = self.listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def agent_args(settings: Settings) -> str:
    """RESCOIN_AGENT_ARGS for the transport (validated text: no quoting needed)."""
    if settings.transport == "virtio":
        return "--transport virtio"
    return f"--transport tcp --listen {settings.listen_text()} --key-file {settings.remote(REMOTE_KEY)}"


def bundle(settings: Settings, source: Path = GUEST_AGENT_DIR) -> list[RemoteFile]:
    """The files a guest gets, with their contents and modes."""
    def read(name: str) -> bytes:
        try:
            return (source / name).read_bytes()
        except OSError as e:
            raise DeployError(f"cannot read {source / name}: {e.strerror} (run from a rescoin checkout)") from None

    defaults = ("# Written by `rescoin agent deploy`; the next deploy overwrites it.\n"
                f'RESCOIN_AGENT_ARGS="{agent_args(settings)}"\n').encode()
    files = [
        RemoteFile("agent", REMOTE_AGENT, read("rescoin_agent.py"), 0o755),
        RemoteFile("unit", REMOTE_UNIT, read("rescoin-agent.service"), 0o644),
        RemoteFile("init", REMOTE_INIT, read("rescoin-agent.init"), 0o755),
        RemoteFile("defaults", REMOTE_DEFAULTS, defaults, 0o644),
    ]
    if settings.transport == "tcp":
        if settings.agent_key is None:
            raise DeployError("the tcp transport needs the shared agent key")
        files.append(RemoteFile("key", REMOTE_KEY, settings.agent_key + b"\n", 0o600))
    return files


# ---------------------------------------------------------------------------
# One guest


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
        self.client = None
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
            try:
                self.run(f"rm -rf {shlex.quote(staging)}", as_root=False, what="removing the staging directory")
            except Exception:  # noqa: BLE001 - best effort; the failure that matters is raised already
                pass

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


def deploy_host(target: Target, settings: Settings, files: list[RemoteFile]) -> HostResult:
    """Deploy to one guest. Never raises: a failure is a FAILED result with the reason."""
    import paramiko

    res = HostResult(target)
    t0 = time.monotonic()
    guest = _Guest(target, settings)
    systemd = False
    try:
        guest.connect()
        guest.check_privileges()
        guest.check_python()
        state = guest.remote_state(files)
        changed = [f for f in files if state[settings.remote(f.path)] != (f.sha256, f.mode)]
        res.changed = [f.label for f in changed]
        fresh = state[settings.remote(REMOTE_AGENT)] is None
        if changed:
            guest.upload(changed)
        systemd = guest.uses_systemd()
        guest.start(restart=bool(changed), systemd=systemd)
        try:
            report = guest.ask_tcp() if settings.transport == "tcp" else guest.ask_once()
        except HostFailure as e:
            raise HostFailure(f"{e}; agent log: {guest.why_not_running(systemd)}") from None
        res.answered = True
        res.result = "installed" if fresh else "updated" if changed else "unchanged"
        what = ("changed: " + ", ".join(res.changed) + "; agent " + ("started" if fresh else "restarted")
                if changed else "agent running")
        if report.mem_total_mib == report.mem_total_mib:  # not NaN
            what += f"; MemTotal {report.mem_total_mib:.0f} MiB"
        guest.notes.append(what)
        res.detail = "; ".join(guest.notes)
    except HostFailure as e:
        res.result, res.detail = "FAILED", "; ".join([*guest.notes, str(e)])
    except (OSError, EOFError, paramiko.SSHException) as e:  # the connection broke mid-way
        res.result, res.detail = "FAILED", "; ".join([*guest.notes, f"SSH connection lost: {e or type(e).__name__}"])
    except Exception as e:  # noqa: BLE001 - one odd guest must not stop the others
        log.debug("deploy to %s failed", target, exc_info=True)
        res.result, res.detail = "FAILED", f"unexpected error: {type(e).__name__}: {e}"
    finally:
        guest.close()
        res.seconds = time.monotonic() - t0
    return res


def deploy(targets: list[Target], settings: Settings, parallel: int = DEFAULT_PARALLEL,
           on_done: Callable[[HostResult], None] | None = None) -> list[HostResult]:
    """Deploy to every target, ``parallel`` at a time; results in the order of ``targets``."""
    files = bundle(settings)
    results: list[HostResult | None] = [None] * len(targets)
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets))),
                            thread_name_prefix="deploy") as pool:
        futures = {pool.submit(deploy_host, t, settings, files): i for i, t in enumerate(targets)}
        for fut in as_completed(futures):
            res = fut.result()
            results[futures[fut]] = res
            if on_done is not None:
                on_done(res)
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# Command line


def result_table(results: list[HostResult]):
    from rich.table import Table

    style = {"installed": "green", "updated": "green", "unchanged": "dim", "FAILED": "bold red"}
    table = Table(title="rescoin agent deploy", title_justify="left", header_style="bold")
    table.add_column("host", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("files\nchanged", justify="right")
    table.add_column("agent\nanswered")
    table.add_column("detail", overflow="fold", ratio=1)
    for r in results:
        table.add_row(str(r.target), f"[{style[r.result]}]{r.result}[/]", str(len(r.changed)),
                      "yes" if r.answered else "[red]no[/]", r.detail)
    return table
