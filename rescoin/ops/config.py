"""The configuration file: one TOML file, validated into dataclasses.

Every option has a default, a unit and a one-line description, kept next to
the field so that ``rescoin config default`` prints a complete, commented
file and a bad value gets one message naming the key, the value and what
is allowed. Nothing here is global: the daemon holds one ``Config`` and
replaces it whole on SIGHUP.
"""
from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from rescoin.core.guard import GuardConfig
from rescoin.core.options import opt
from rescoin.errors import RescoinError
from rescoin.hosts.config import MAX_MIB, HostConfig
from rescoin.ops.balance_config import BalanceConfig, BalanceConfigError, default_lines, parse_balance

DEFAULT_PATH = Path("/etc/rescoin/rescoin.toml")


class ConfigError(RescoinError, ValueError):
    """A configuration problem, said in one line that names the key."""


@dataclass(frozen=True)
class DaemonConfig:
    uri: str = opt("qemu:///system", "hypervisor URI (sim:TRACE_DIR for a simulated host)")
    period: float = opt(300.0, "seconds between control steps", "s", low=1.0, high=86400.0)
    policy: str = opt("rescoin", "allocation policy",
                      choices=("rescoin", "rescoin-paper", "static", "drf", "mom", "vm-balancer", "kvmscheduling"))
    model: str = opt("", "predictor model file; empty = models/default.toml")
    history_dir: str = opt("/var/lib/rescoin/history", "where history CSV files go; empty = none")
    state_file: str = opt("/var/lib/rescoin/state.npz", "saved every period so a restart resumes; empty = none")
    status_socket: str = opt("/run/rescoin/status.sock", "UNIX socket `rescoin status` reads (root only)")
    restore_on_exit: bool = opt(False, "on stop, put back every VM's original settings")
    dry_run: bool = opt(False, "plan and log actions, apply nothing")
    vm_filter: str = opt("*", "manage only VMs whose name matches this glob")


@dataclass(frozen=True)
class AgentConfig:
    timeout: float = opt(1.0, "seconds to wait for all guest agents together", "s", low=0.05, high=30.0)
    key_file: str = opt("", "HMAC key of TCP agents (installed by `rescoin agent deploy`); empty = virtio only")
    tcp: dict = opt({}, "VM name -> \"host:port\" of its TCP agent (others use the virtio channel)")

    def check(self) -> None:
        for name, address in self.tcp.items():
            parse_address(f"agent.tcp.{name}", address)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = opt(False, "serve Prometheus metrics")
    listen: str = opt("127.0.0.1:9848", "address:port of the metrics endpoint (loopback by default)")

    def check(self) -> None:
        parse_address("metrics.listen", self.listen)


@dataclass(frozen=True)
class VMConfig:
    weight: float = opt(1.0, "share weight relative to other VMs", low=0.0, high=1000.0)
    min_memory_mib: float = opt(0.0, "never reclaim below this", "MiB", low=0.0, high=MAX_MIB)
    max_memory_mib: float = opt(0.0, "never give more than this; 0 = the VM's maximum", "MiB", low=0.0, high=MAX_MIB)
    exclude: bool = opt(False, "leave this VM alone entirely")

    def check(self) -> None:
        if self.max_memory_mib > 0 and self.min_memory_mib > self.max_memory_mib:
            raise ValueError(f"min_memory_mib = {self.min_memory_mib:g} is above max_memory_mib = "
                             f"{self.max_memory_mib:g}")


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = DaemonConfig()
    host: HostConfig = HostConfig()
    guard: GuardConfig = GuardConfig()
    agent: AgentConfig = AgentConfig()
    metrics: MetricsConfig = MetricsConfig()
    vm: dict = field(default_factory=dict)  # name or UUID -> VMConfig
    balance: BalanceConfig = BalanceConfig()

    def for_vm(self, uuid: str, name: str) -> VMConfig:
        return self.vm.get(uuid) or self.vm.get(name) or VMConfig()


# What a reload cannot change: the hypervisor, and the paths that make a running daemon what it is
# (the state file it holds locked with this run's credits and originals, the directory its history rows
# go to, the socket `rescoin status` and the systemd unit know). Moving them live would split one run in
# two; a reload keeps their running values and names them in its log line. Everything else applies live.
RESTART_NEEDED = ("daemon.uri", "daemon.state_file", "daemon.history_dir", "daemon.status_socket")

SECTIONS = {"daemon": DaemonConfig, "host": HostConfig, "guard": GuardConfig, "agent": AgentConfig,
            "metrics": MetricsConfig}

def parse_address(where: str, text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); a bad one is a ConfigError naming ``where``."""
    bracketed = text.startswith("[")
    host, sep, port = text[1:].partition("]:") if bracketed else text.rpartition(":")
    if not sep or not host or (":" in host and not bracketed) or any(c.isspace() for c in host):
        raise ConfigError(f"{where} = {text!r}: expected HOST:PORT or [V6]:PORT, e.g. 127.0.0.1:9848")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"{where} = {text!r}: the port must be a number in 1 .. 65535")
    return host, int(port)


def agent_key(cfg: Config) -> bytes | None:
    """The TCP agents' HMAC key named by ``agent.key_file`` (None when unset), checked as ``run`` needs it."""
    if not cfg.agent.key_file:
        return None
    from rescoin.hosts.agent import AgentError, load_key

    try:
        return load_key(cfg.agent.key_file)
    except AgentError as e:
        raise ConfigError(f"agent.key_file = {cfg.agent.key_file!r}: {e}") from None


def check_files(cfg: Config, source: str = "<config>") -> None:
    """What ``run`` would fail on beyond the file itself: the agent key file and the model file."""
    try:
        agent_key(cfg)
        if cfg.daemon.model:
            from rescoin.core.predict import load_model

            try:
                load_model(cfg.daemon.model)
            except (OSError, ValueError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                reason = reason.removeprefix(f"{cfg.daemon.model}: ")
                raise ConfigError(f"daemon.model = {cfg.daemon.model!r}: {reason}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def unmatched_vm_entries(cfg: Config, vms: Iterable[tuple[str, str]]) -> list[str]:
    """The ``[vm."KEY"]`` entries that name none of ``vms`` ((uuid, name) pairs): likely typos."""
    known = {key for pair in vms for key in pair}
    return sorted(key for key in cfg.vm if key not in known)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The options that differ between two configurations, as ``section.key`` or ``vm."KEY"``."""
    out = [f"{name}.{f.name}" for name in SECTIONS for f in fields(SECTIONS[name])
           if getattr(getattr(old, name), f.name) != getattr(getattr(new, name), f.name)]
    return out + [f'vm."{k}"' for k in sorted(set(old.vm) | set(new.vm)) if old.vm.get(k) != new.vm.get(k)]


def _doc(cls, f) -> tuple[str, str]:
    return f.metadata.get("doc", ""), f.metadata.get("unit", "")


def _coerce(where: str, f, value: Any) -> Any:
    default = f.default if f.default is not MISSING else f.default_factory()
    meta = f.metadata or {}
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: must be true or false")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: must be a number")
        if not math.isfinite(value):  # NaN passes every comparison below, and inf is never meant
            raise ConfigError(f"{where} = {value!r}: must be a finite number")
        value = type(default)(value) if isinstance(default, float) or float(value).is_integer() else value
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"{where} = {value!r}: must be a whole number")
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"{low if low is not None else '-inf'} .. {high if high is not None else 'inf'}"
            raise ConfigError(f"{where} = {value!r}: must be in {span}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: must be a string")
    elif isinstance(default, dict) and (not isinstance(value, dict)
                                        or not all(isinstance(v, str) for v in value.values())):
        raise ConfigError(f"{where} must be a table of strings")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where} = {value!r}: must be one of {', '.join(choices)}")
    return value


def _section(name: str, cls, table: Any):
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"[{name}] unknown key {unknown[0]!r}; allowed: {', '.join(known)}")
    values = {k: _coerce(f"{name}.{k}", known[k], v) for k, v in table.items()}
    try:
        obj = cls(**values)
        if hasattr(obj, "check"):
            obj.check()
    except ConfigError:
        raise  # names its key already
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{name}] {e}") from None
    return obj


def parse(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    parts: dict[str, Any] = {}
    try:
        for key, table in data.items():
            if key in SECTIONS:
                parts[key] = _section(key, SECTIONS[key], table)
            elif key == "balance":
                try:
                    parts["balance"] = parse_balance(table)
                except BalanceConfigError as e:
                    raise ConfigError(str(e)) from None
            elif key == "vm":
                if not isinstance(table, dict):
                    raise ConfigError("[vm] must hold tables like [vm.\"NAME-or-UUID\"]")
                parts["vm"] = {str(k): _section(f"vm.{k}", VMConfig, v) for k, v in table.items()}
            else:
                raise ConfigError(f"unknown section [{key}]; allowed: {', '.join(list(SECTIONS) + ['vm', 'balance'])}")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return Config(**parts)


def load(path: str | Path | None) -> Config:
    """The file's configuration; a missing default file means all defaults, a missing named one is an error."""
    p = Path(path) if path else DEFAULT_PATH
    if not p.exists():
        if path:
            raise ConfigError(f"{p}: no such configuration file (write one with `rescoin config default > {p}`)")
        return Config()
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # TOML is UTF-8; say where the first bad byte is
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    return parse(text, str(p))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{}" if not value else "{ " + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + " }"
    return repr(value)


def default_text() -> str:
    """A complete configuration file with every option at its default, documented."""
    out = ["# rescoin configuration (/etc/rescoin/rescoin.toml by default; `rescoin run --config PATH`).",
           "# Every option is shown with its default. Reload with SIGHUP (systemctl reload rescoin).", ""]
    for name, cls in SECTIONS.items():
        out.append(f"[{name}]")
        for f in fields(cls):
            doc, unit = _doc(cls, f)
            factory = f.default_factory
            default = f.default if f.default is not MISSING else factory() if factory is not MISSING else None
            choices = f.metadata.get("choices")
            extra = f" ({unit})" if unit else ""
            extra += f"; one of: {', '.join(choices)}" if choices else ""
            if f"{name}.{f.name}" in RESTART_NEEDED:
                extra += "; takes effect on restart, not on reload"
            out.append(f"# {doc}{extra}")
            out.append(f"{f.name} = {_toml(default)}")
        out.append("")
    out.append("# Per-VM settings, by name or UUID:")
    out.append('# [vm."web-1"]')
    for f in fields(VMConfig):
        doc, unit = _doc(VMConfig, f)
        out.append(f"# {f.name} = {_toml(f.default)}    # {doc}{f' ({unit})' if unit else ''}")
    out += [""] + default_lines()
    return "\n".join(out) + "\n"
