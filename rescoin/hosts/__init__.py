"""Hosts the control loop runs against: a simulated one here, real ones in later modules."""
from rescoin.hosts.base import ApplyResult, Host

__all__ = ["ApplyResult", "Host"]
