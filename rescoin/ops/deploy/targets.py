"""Targets, inventory, settings and the file bundle of ``rescoin agent deploy``."""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rescoin.errors import RescoinError
from rescoin.hosts.agent import AgentError, load_key
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

_USER_RE = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_NAME_RE = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_TARGET_RE = re.compile(rf"(?P<user>{_USER_RE})@(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>{_NAME_RE}))(?::(?P<port>\d+))?")
_LISTEN_RE = re.compile(rf"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>{_NAME_RE})):(?P<port>\d+)")

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
    pkey: Any = None                     # paramiko.PKey from --key, or None
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
