"""Lab VM definitions, checked without a daemon: the XML itself, the libvirt
test driver (``test:///default``) accepting it, and the ``rescoin lab`` CLI's
error paths. The real VMs are exercised by the e2e tests."""
from __future__ import annotations

import argparse
import importlib.util
import io
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from rescoin import lab
from rescoin.cli.lab import add_lab_parser
from rescoin.lab import AGENT_CHANNEL, LAB_PREFIX, SCENARIOS, domain_xml, lifecycle

REPO = Path(__file__).resolve().parents[2]


def _xml(**kw) -> ElementTree.Element:
    args = dict(name=f"{LAB_PREFIX}0", kernel="/img/vmlinuz", initrd="/img/initrd.gz",
                disk="/var/lib/rescoin/lab/disks/rescoin-lab-0.img",
                agent_socket="/run/rescoin/lab/rescoin-lab-0.agent")
    args.update(kw)
    return ElementTree.fromstring(domain_xml(**args))


def _loadgen():
    spec = importlib.util.spec_from_file_location("loadgen", REPO / "guest_agent" / "loadgen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _libvirt():
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


# -- the XML ---------------------------------------------------------------------------
def test_software_emulated_direct_kernel_boot():
    root = _xml(load="cpu:0.9")
    assert root.tag == "domain" and root.get("type") == "qemu"
    assert root.findtext("name") == "rescoin-lab-0"
    assert root.findtext("os/kernel") == "/img/vmlinuz"
    assert root.findtext("os/initrd") == "/img/initrd.gz"
    assert root.findtext("on_crash") == "destroy"
    assert root.find("devices/interface") is None


def test_memory_and_vcpus():
    root = _xml(memory_mib=200, max_memory_mib=512, vcpus=2)
    assert (root.find("memory").get("unit"), root.findtext("memory")) == ("MiB", "512")
    assert (root.find("currentMemory").get("unit"), root.findtext("currentMemory")) == ("MiB", "200")
    assert root.findtext("vcpu") == "2"


def test_balloon_reports_stats_every_two_seconds():
    balloon = _xml().find("devices/memballoon")
    assert balloon.get("model") == "virtio"
    assert balloon.find("stats").get("period") == "2"


def test_agent_channel_is_a_bound_unix_socket():
    channel = _xml().find("devices/channel")
    assert channel.get("type") == "unix"
    assert channel.find("source").get("mode") == "bind"
    assert channel.find("source").get("path") == "/run/rescoin/lab/rescoin-lab-0.agent"
    assert channel.find("target").get("type") == "virtio"
    assert channel.find("target").get("name") == AGENT_CHANNEL == "org.rescoin.agent.0"


def test_virtio_disk_and_serial_console_log():
    root = _xml(console_log="/tmp/c.log", disk_cache="writeback")
    disk = root.find("devices/disk")
    assert disk.find("target").get("bus") == "virtio" and disk.find("target").get("dev") == "vda"
    assert disk.find("source").get("file").endswith("rescoin-lab-0.img")
    assert disk.find("driver").get("type") == "raw" and disk.find("driver").get("cache") == "writeback"
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/serial/source").get("path") == "/tmp/c.log"


@pytest.mark.parametrize("spec", sorted({s for specs in SCENARIOS.values() for s in specs}))
def test_kernel_cmdline_carries_the_load(spec):
    words = _xml(load=spec).findtext("os/cmdline").split()
    assert "console=ttyS0" in words and "quiet" in words
    assert f"rescoin.load={spec}" in words
    assert "rescoin.name=rescoin-lab-0" in words


def test_extra_cmdline_overrides_defaults():
    words = _xml(cmdline="console=hvc0 rescoin.load=idle loglevel=7").findtext("os/cmdline").split()
    assert "console=ttyS0" not in words
    assert words.count("rescoin.load=idle") == 1
    assert "loglevel=7" in words


def test_values_are_escaped():
    root = _xml(disk="/tmp/a'b&c.img", name="rescoin-lab-<x>")
    assert root.find("devices/disk/source").get("file") == "/tmp/a'b&c.img"
    assert root.findtext("name") == "rescoin-lab-<x>"


def test_uuid_is_kept():
    assert _xml(uuid="0b1f7c9e-5d51-4c7f-8f0a-3e0e1b2c3d4e").findtext("uuid") == "0b1f7c9e-5d51-4c7f-8f0a-3e0e1b2c3d4e"


@pytest.mark.parametrize("kw", [dict(memory_mib=512, max_memory_mib=256), dict(vcpus=0), dict(load="cpu:0.5 x")])
def test_bad_arguments_raise(kw):
    with pytest.raises(ValueError):
        _xml(**kw)


def test_every_scenario_spec_parses_in_the_load_generator():
    loadgen = _loadgen()
    for name, specs in SCENARIOS.items():
        assert specs, name
        for spec in specs:
            loadgen.parse(spec)
    for bad in ("cpu:2", "mem:foo", "disk:write:kibs=5,zz=1", "gpu:1"):
        with pytest.raises(loadgen.SpecError):
            loadgen.parse(bad)


# -- the libvirt test driver validates it ------------------------------------------------
def test_test_driver_accepts_the_domain():
    libvirt = _libvirt()
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(domain_xml(f"{LAB_PREFIX}xml", "/k", "/i", "/d.img", "/run/x.agent",
                                        memory_mib=256, max_memory_mib=384, load="mem:hold:64"))
        try:
            back = ElementTree.fromstring(dom.XMLDesc(0))
            assert back.get("type") == "qemu"
            assert back.find("devices/memballoon/stats").get("period") == "2"
            assert back.find("devices/channel/target").get("name") == AGENT_CHANNEL
            assert "rescoin.load=mem:hold:64" in back.findtext("os/cmdline")
            assert dom.maxMemory() == 384 * 1024
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_status_lists_lab_domains_of_the_test_driver():
    libvirt = _libvirt()
    conn = libvirt.open("test:///default")      # keeps the shared test state alive
    try:
        dom = conn.defineXML(domain_xml(f"{LAB_PREFIX}7", "/k", "/i", "/d.img", "/nonexistent/x.agent",
                                        load="cpu:0.9"))
        dom.create()
        try:
            rows = lab.lab_status("test:///default", agent_timeout=0.1)
            (row,) = [r for r in rows if r["name"] == f"{LAB_PREFIX}7"]
            assert row["state"] == "running"
            assert row["load"] == "cpu:0.9"
            assert row["agent"] is False
            assert row["max_memory_mib"] == 384
            assert all(r["name"].startswith(LAB_PREFIX) for r in rows)
        finally:
            dom.destroy()
            dom.undefine()
    finally:
        conn.close()


# -- the CLI ----------------------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser(prog="rescoin")
    add_lab_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_parser_defaults():
    args = _parse(["lab", "up"])
    assert (args.vms, args.scenario, args.uri, args.memory, args.max_memory) == (3, "mixed", "qemu:///system",
                                                                                 256, 384)
    args = _parse(["lab", "up", "--vms", "2", "--scenario", "memory", "--memory", "200", "--max-memory", "300"])
    assert (args.vms, args.scenario, args.memory, args.max_memory) == (2, "memory", 200, 300)
    for action in ("up", "down", "status", "image"):
        assert callable(_parse(["lab", action]).func)


@pytest.mark.parametrize("action", ["up", "down", "status"])
def test_every_action_has_help(action, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["lab", action, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def _one_line_error(args, capsys) -> str:
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_scenario_is_one_line(capsys):
    err = _one_line_error(_parse(["lab", "up", "--scenario", "nope"]), capsys)
    assert "unknown scenario 'nope'" in err and "mixed" in err


def test_not_root_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(lifecycle.os, "geteuid", lambda: 1000)
    assert "needs root" in _one_line_error(_parse(["lab", "up"]), capsys)
    assert "needs root" in _one_line_error(_parse(["lab", "down"]), capsys)


def test_no_libvirt_python_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libvirt", None)       # import libvirt -> ImportError
    assert "libvirt-python is not installed" in _one_line_error(_parse(["lab", "status"]), capsys)


def test_unreachable_daemon_is_one_line(capsys):
    _libvirt()
    err = _one_line_error(_parse(["lab", "status", "--uri", "test:///nonexistent/file.xml"]), capsys)
    assert "cannot connect to test:///nonexistent/file.xml" in err


def test_status_without_lab_vms(capsys):
    _libvirt()
    args = _parse(["lab", "status", "--uri", "test:///default"])
    assert args.func(args) == 0
    assert "no lab VMs" in capsys.readouterr().out


# -- the initramfs writer -----------------------------------------------------------------
@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio to read the archive back")
def test_cpio_archive_reads_back(tmp_path):
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f.txt").write_text("hello")
    (tmp_path / "tree" / "link").symlink_to("sub/f.txt")
    buf = io.BytesIO()
    cpio = lab.Cpio(buf)
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    cpio.symlink("bin/sh", "/bin/busybox")
    cpio.tree(tmp_path / "tree", "usr/lib/x")
    cpio.close()
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=buf.getvalue(), capture_output=True, check=True)
    names = set(listing.stdout.decode().split())
    assert {"init", "bin", "bin/sh", "usr/lib/x/sub/f.txt", "usr/lib/x/link"} <= names
