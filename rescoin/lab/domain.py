"""The libvirt domain of one lab VM and its kernel command line (pure; no I/O)."""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from rescoin.lab.base import (
    AGENT_CHANNEL,
    LOG_DIR,
    METADATA_NS,
)


def kernel_cmdline(name: str | None = None, load: str | None = None, extra: str = "") -> str:
    """The guest kernel command line: serial console, quiet, PSI on, the VM's
    name and load spec, then ``extra`` (whose keys win over the defaults)."""
    words = ["console=ttyS0", "quiet", "psi=1"]
    if name:
        words.append(f"rescoin.name={name}")
    if load:
        if any(c.isspace() for c in load):
            raise ValueError(f"a load spec cannot contain spaces: {load!r}")
        words.append(f"rescoin.load={load}")
    extra_words = extra.split()
    extra_keys = {w.split("=", 1)[0] for w in extra_words}
    return " ".join([w for w in words if w.split("=", 1)[0] not in extra_keys] + extra_words)


def domain_xml(name: str, kernel: str | Path, initrd: str | Path, disk: str | Path, agent_socket: str | Path,
               memory_mib: int = 256, max_memory_mib: int = 384, vcpus: int = 1, cmdline: str = "",
               uuid: str | None = None, *, load: str | None = None, console_log: str | Path | None = None,
               disk_cache: str = "none") -> str:
    """The libvirt domain of one lab VM.

    Software-emulated (``type='qemu'``; KVM hangs on these machines), direct
    kernel boot, a virtio balloon with a 2 s stats period, a small raw virtio
    disk, the serial console into ``console_log`` (default
    ``/var/lib/rescoin/lab/logs/<name>.console.log``) and the agent's
    virtio-serial channel bound to the host UNIX socket ``agent_socket``.
    ``cmdline`` is added to the default kernel command line
    (``console=ttyS0 quiet psi=1 rescoin.name=<name>``); ``load`` adds
    ``rescoin.load=<load>``. ``disk_cache`` is libvirt's cache mode
    (``none`` = O_DIRECT on the host, so blkio weights see the I/O).
    """
    if memory_mib < 32 or max_memory_mib < memory_mib:
        raise ValueError(f"need 32 <= memory ({memory_mib}) <= max memory ({max_memory_mib}) MiB")
    if vcpus < 1:
        raise ValueError(f"vcpus must be >= 1, got {vcpus}")
    console_log = console_log if console_log is not None else LOG_DIR / f"{name}.console.log"
    a, t = _attr, _text
    uuid_line = f"\n  <uuid>{t(uuid)}</uuid>" if uuid else ""
    load_meta = f"<load>{t(load)}</load>" if load else ""
    return f"""<domain type='qemu'>
  <name>{t(name)}</name>{uuid_line}
  <title>rescoin lab VM</title>
  <metadata>
    <lab:lab xmlns:lab={a(METADATA_NS)}>{load_meta}</lab:lab>
  </metadata>
  <memory unit='MiB'>{int(max_memory_mib)}</memory>
  <currentMemory unit='MiB'>{int(memory_mib)}</currentMemory>
  <vcpu placement='static'>{int(vcpus)}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{t(kernel)}</kernel>
    <initrd>{t(initrd)}</initrd>
    <cmdline>{t(kernel_cmdline(name, load, cmdline))}</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
{_devices_xml(disk, agent_socket, console_log, disk_cache)}</domain>
"""


def _attr(value: object) -> str:
    """An XML attribute value, quoted and escaped."""
    return quoteattr(str(value))


def _text(value: object) -> str:
    """XML text content, escaped."""
    return escape(str(value))


def _devices_xml(disk: str | Path, agent_socket: str | Path, console_log: str | Path, disk_cache: str) -> str:
    """The ``<devices>`` of a lab VM: raw virtio disk, serial console into a file,
    the agent's virtio-serial channel and the balloon."""
    a = _attr
    io_attr = " io='native'" if disk_cache in ("none", "directsync") else ""
    return f"""  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache={a(disk_cache)}{io_attr}/>
      <source file={a(disk)}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path={a(console_log)}/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={a(console_log)}/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path={a(agent_socket)}/>
      <target type='virtio' name={a(AGENT_CHANNEL)}/>
    </channel>
    <memballoon model='virtio'>
      <stats period='2'/>
    </memballoon>
  </devices>
"""
