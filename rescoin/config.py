"""The configuration file: one TOML file, validated into dataclasses.

Every option has a default, a unit and a one-line description, kept next to
the field so that ``rescoin config default`` prints a complete, commented
file and a bad value gets one message naming the key, the value and what
is allowed. Nothing here is global: the daemon holds one ``Config`` and
replaces it whole on SIGHUP.
"""
from __future__ import annotations

import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .guard import GuardConfig

DEFAULT_PATH = Path("/etc/rescoin/rescoin.toml")


class ConfigError(ValueError):
    """A configuration problem, said in one line that names the key."""


def opt(default: Any, doc: str, unit: str = "", choices: tuple | None = None, low: float | None = None,
        high: float | None = None):
    meta = {"doc": doc, "unit": unit, "choices": choices, "low": low, "high": high}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


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
class HostConfig:
    reserve_mib: float = opt(1024.0, "host memory kept back from the guests", "MiB", low=0.0)
    reserve_cores: float = opt(0.0, "host CPU kept back from the guests", "cores", low=0.0)
    memory_mib: float = opt(0.0, "memory the guests may share; 0 = host memory minus the reserve", "MiB", low=0.0)
    disk_kibs: float = opt(204800.0, "disk bandwidth shared by blkio weights", "KiB/s", low=1.0)
    net_kibs: float = opt(125000.0, "link bandwidth shared by interface caps", "KiB/s", low=1.0)
    actuator: str = opt("libvirt", "how CPU, blkio and pins are applied", choices=("libvirt", "cgroup"))
    memtune_soft_limit: bool = opt(False, "also set each VM's memtune soft limit to its balloon target")
    stats_period: int = opt(2, "balloon statistics period set on each VM", "s", low=0, high=3600)


@dataclass(frozen=True)
class AgentConfig:
    timeout: float = opt(1.0, "seconds to wait for all guest agents together", "s", low=0.05, high=30.0)
    key_file: str = opt("", "HMAC key of TCP agents (installed by `rescoin agent deploy`); empty = virtio only")
    tcp: dict = opt({}, "VM name -> \"host:port\" of its TCP agent (others use the virtio channel)")


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = opt(False, "serve Prometheus metrics")
    listen: str = opt("127.0.0.1:9848", "address:port of the metrics endpoint (loopback by default)")


@dataclass(frozen=True)
class VMConfig:
    weight: float = opt(1.0, "share weight relative to other VMs", low=0.0, high=1000.0)
    min_memory_mib: float = opt(0.0, "never reclaim below this", "MiB", low=0.0)
    max_memory_mib: float = opt(0.0, "never give more than this; 0 = the VM's maximum", "MiB", low=0.0)
    exclude: bool = opt(False, "leave this VM alone entirely")


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = DaemonConfig()
    host: HostConfig = HostConfig()
    guard: GuardConfig = GuardConfig()
    agent: AgentConfig = AgentConfig()
    metrics: MetricsConfig = MetricsConfig()
    vm: dict = field(default_factory=dict)  # name or UUID -> VMConfig

    def for_vm(self, uuid: str, name: str) -> VMConfig:
        return self.vm.get(uuid) or self.vm.get(name) or VMConfig()


SECTIONS = {"daemon": DaemonConfig, "host": HostConfig, "guard": GuardConfig, "agent": AgentConfig,
            "metrics": MetricsConfig}

GUARD_DOCS = {
    "mem_floor_mib": ("absolute floor of any balloon target", "MiB"),
    "mem_reserve_mib": ("headroom kept above a guest's used memory, at least", "MiB"),
    "mem_reserve_frac": ("... or this share of its used memory", ""),
    "mem_step_frac": ("largest shrink per period, share of max memory", ""),
    "mem_grow_step_frac": ("largest growth above the entitlement per period (starving guests exempt)", ""),
    "mem_deadband_frac": ("skip shrinks smaller than this share of max memory", ""),
    "mem_grow_deadband_frac": ("skip growth smaller than this share of max memory", ""),
    "mem_deadband_mib": ("... or this many MiB", "MiB"),
    "starving_signal": ("memory pressure above this means a guest is starving", ""),
    "starving_used": ("or used memory at this share of its balloon target", ""),
    "weight_deadband": ("relative change below which shares, blkio weights and caps stay", ""),
    "net_min_kibs": ("a net cap never goes below this", "KiB/s"),
}


def _doc(cls, f) -> tuple[str, str]:
    if cls is GuardConfig:
        return GUARD_DOCS.get(f.name, ("", ""))
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
    elif isinstance(default, dict):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
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
            elif key == "vm":
                if not isinstance(table, dict):
                    raise ConfigError("[vm] must hold tables like [vm.\"NAME-or-UUID\"]")
                parts["vm"] = {str(k): _section(f"vm.{k}", VMConfig, v) for k, v in table.items()}
            else:
                raise ConfigError(f"unknown section [{key}]; allowed: {', '.join(list(SECTIONS) + ['vm'])}")
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
            default = f.default if f.default is not MISSING else f.default_factory()
            choices = (f.metadata or {}).get("choices")
            extra = f" ({unit})" if unit else ""
            extra += f"; one of: {', '.join(choices)}" if choices else ""
            out.append(f"# {doc}{extra}")
            out.append(f"{f.name} = {_toml(default)}")
        out.append("")
    out.append("# Per-VM settings, by name or UUID:")
    out.append('# [vm."web-1"]')
    for f in fields(VMConfig):
        doc, unit = _doc(VMConfig, f)
        out.append(f"# {f.name} = {_toml(f.default)}    # {doc}{f' ({unit})' if unit else ''}")
    return "\n".join(out) + "\n"
