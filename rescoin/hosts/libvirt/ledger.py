"""A VM's credit ledger in its libvirt domain metadata, so it migrates with the domain.

The host daemon publishes each VM's ledger (mean unused entitlement per period,
per resource, in resource units, so hosts of other sizes read it alike); the
balancer writes it once more, live and persistent, right before a migration;
the target's daemon reads it when it first sees the VM and seeds its credits.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET

from rescoin.hosts.libvirt.connection import Libvirt, libvirt_module

CREDITS_NS = "https://rescoin.invalid/xmlns/credits/1"
CREDITS_KEY = "rescoin"


def credits_xml(credits: tuple[float, ...]) -> str:
    return "<credits>" + "".join(f"<c>{float(c)!r}</c>" for c in credits) + "</credits>"


def parse_credits(text: str | None) -> tuple[float, ...]:
    """The ledger in ``text``; () when absent or damaged (a ledger is a hint, never worth a crash)."""
    if not text:
        return ()
    try:
        return tuple(float(c.text or "nan") for c in ET.fromstring(text).iter("c"))
    except (ET.ParseError, ValueError):
        return ()


def write_credits(lv: Libvirt, dom, credits: tuple[float, ...], persistent: bool = True) -> bool:
    """Store the ledger in the VM's metadata: live, and in its persistent definition unless told not to."""
    m = libvirt_module()
    flags = m.VIR_DOMAIN_AFFECT_LIVE | (m.VIR_DOMAIN_AFFECT_CONFIG if persistent else 0)
    ok, _ = lv.call("setMetadata", dom.name(), dom.setMetadata, m.VIR_DOMAIN_METADATA_ELEMENT,
                    credits_xml(credits), CREDITS_KEY, CREDITS_NS, flags)
    return bool(ok)


def read_credits(lv: Libvirt, dom) -> tuple[float, ...]:
    """The VM's ledger, () if none was ever written."""
    m = libvirt_module()
    ok, xml = lv.call("XMLDesc", dom.name(), dom.XMLDesc, 0, default="")
    if not (ok and CREDITS_NS in xml):  # never written: no ledger yet (not an error)
        return ()
    ok, text = lv.call("metadata", dom.name(), dom.metadata, m.VIR_DOMAIN_METADATA_ELEMENT, CREDITS_NS, 0)
    return parse_credits(text) if ok else ()
