"""Hosts the control loop runs against: the protocol (``base``), a simulated one, libvirt, and the dry-run wrapper."""
from rescoin.hosts.base import ApplyResult, Host, HostBase, HostSetup, HostUnavailableError

__all__ = ["ApplyResult", "Host", "HostBase", "HostSetup", "HostUnavailableError"]
