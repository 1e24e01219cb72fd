"""A real hypervisor through libvirt, in four parts.

- ``connection``: open, re-open with backoff, and ``Libvirt.call``, the one libvirt error helper;
- ``discovery``: the VMs, what is read at first sight, the originals to restore;
- ``rates``: one bulk-stats record per VM -> usage and signal rates, and the Controls;
- ``host``: ``LibvirtHost`` (observe, apply, restore), merging guest agents' claims;
  ``actions`` and ``restore`` build and replay the calls that change a VM.
"""
from rescoin.hosts.libvirt.connection import HostUnavailable, Libvirt
from rescoin.hosts.libvirt.discovery import VMState, _cpumap
from rescoin.hosts.libvirt.host import LibvirtHost, make_actuator

__all__ = ["HostUnavailable", "Libvirt", "LibvirtHost", "VMState", "_cpumap", "make_actuator"]
