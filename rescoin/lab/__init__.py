"""``rescoin lab``: tiny real QEMU guests under libvirt, the guest agent inside.

The lab is for trying rescoin on real VMs on a machine without hardware
virtualisation: software-emulated QEMU guests
(``<domain type='qemu'>``) that boot a Debian cloud kernel straight into a
busybox + Python initramfs. The initramfs starts the guest agent on the
virtio-serial port ``org.rescoin.agent.0`` and a load generator whose load
comes from the kernel command line (``rescoin.load=...``).

Modules, one job each:

* :mod:`.image` (:func:`build_image`) builds and caches the guest kernel and
  initramfs under ``/var/lib/rescoin/lab/image/<key>/``; the key hashes every
  input, so a change to the agent, the load generator or the builder rebuilds.
  :mod:`.cpio` writes the initramfs archive.
* :mod:`.domain` (:func:`domain_xml`) is the libvirt domain of one lab VM (pure; no I/O).
* :mod:`.lifecycle` (:func:`lab_up`, :func:`lab_down`, :func:`lab_status`)
  manages the VMs named ``rescoin-lab-N``; it asks their agents through
  :mod:`rescoin.hosts.agent`, the one validating agent client.
* :mod:`.base`: paths, constants, :class:`LabError`.

The ``rescoin lab`` argparse lives in :mod:`rescoin.cli.lab`.
libvirt-python is imported lazily, so importing this package never needs it.
"""

from __future__ import annotations

from rescoin.lab.base import (
    AGENT_CHANNEL,
    AGENT_TIMEOUT,
    DEFAULT_URI,
    DISK_DIR,
    DISK_MIB,
    IMAGE_DIR,
    LAB_PREFIX,
    LAB_ROOT,
    LOG_DIR,
    SCENARIOS,
    SOCKET_DIR,
    LabError,
)
from rescoin.lab.cpio import Cpio
from rescoin.lab.domain import domain_xml, kernel_cmdline
from rescoin.lab.image import GuestImage, build_image
from rescoin.lab.lifecycle import agent_stats, lab_down, lab_status, lab_up

__all__ = [
    "AGENT_CHANNEL", "AGENT_TIMEOUT", "DEFAULT_URI", "DISK_DIR", "DISK_MIB", "IMAGE_DIR", "LAB_PREFIX", "LAB_ROOT",
    "LOG_DIR", "SCENARIOS", "SOCKET_DIR", "GuestImage", "LabError", "Cpio", "agent_stats", "build_image",
    "domain_xml", "kernel_cmdline", "lab_down", "lab_status", "lab_up",
]
