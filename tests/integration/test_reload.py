"""SIGHUP reload applies every live setting: the Daemon object on libvirt's test driver.

The test driver keeps its state per connection, so libvirt state is read
through the daemon's own connection; the metrics endpoint is a real socket.
"""
from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test`")

from rescoin.core.resources import MEMORY  # noqa: E402
from rescoin.ops.config import load  # noqa: E402
from rescoin.ops.daemon import Daemon  # noqa: E402

BASE = '[daemon]\nuri = "test:///default"\nstate_file = ""\nhistory_dir = ""\nstatus_socket = ""\nperiod = 1\n'
VM = """<domain type='test'><name>{name}</name><memory unit='MiB'>2048</memory>
<currentMemory unit='MiB'>2048</currentMemory><vcpu>1</vcpu><os><type>hvm</type></os><devices/></domain>"""


def real(d: Daemon):
    """The libvirt host the daemon built (under the dry-run wrapper, if any)."""
    return d.real_host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


class Cfg:
    """The configuration file a test rewrites between reloads."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "rescoin.toml"

    def write(self, text: str = "", base: str = BASE) -> None:
        self.path.write_text(base + text)


@pytest.fixture
def cfg(tmp_path) -> Cfg:
    c = Cfg(tmp_path)
    c.write()
    return c


@pytest.fixture
def daemon(cfg):
    d = Daemon(load(cfg.path), config_path=str(cfg.path))
    yield d
    d.close()
    real(d).close()


def add_vms(d: Daemon, *names: str, start: bool = True) -> None:
    conn = real(d).lv.connect()
    for name in names:
        dom = conn.defineXML(VM.format(name=name))
        if start:
            dom.create()


def settle(d: Daemon, periods: int = 4):
    """Step until the first actions are applied and the plan is quiet."""
    for _ in range(periods):
        step = d.step()
    assert step.plan.empty
    return step


def blkio(d: Daemon) -> dict[str, int]:
    conn = real(d).lv.connect()
    return {dom.name(): dom.blkioParameters()["weight"] for dom in conn.listAllDomains(1)}


def test_reload_to_dry_run_stops_actuation_at_once_and_back(daemon, cfg):
    add_vms(daemon, "a", "b")
    settle(daemon)
    before = blkio(daemon)
    cfg.write('dry_run = true\n[vm.a]\nweight = 10\n')  # a new weight: the plan changes right away
    daemon.reload()
    assert type(daemon.host).__name__ == "DryRunHost" and daemon.loop.host is daemon.host
    step = daemon.step()
    assert not step.plan.empty  # actions were planned ...
    assert step.result.total == 0 and blkio(daemon) == before  # ... and none reached libvirt
    cfg.write('dry_run = false\n[vm.a]\nweight = 10\n')
    daemon.reload()
    assert daemon.host is real(daemon)
    step = daemon.step()
    assert step.result.total > 0 and blkio(daemon) != before


def test_dry_run_in_the_file_at_start_applies_nothing(cfg):
    cfg.write("dry_run = true\n")
    d = Daemon(load(cfg.path), config_path=str(cfg.path))
    try:
        step = d.step()
        assert not step.plan.empty and step.result.total == 0
        assert set(blkio(d).values()) == {0}  # the test driver's default, untouched
    finally:
        d.close()
        real(d).close()


def test_reload_applies_host_settings_and_refuses_a_reserve_above_the_host(daemon, cfg, caplog):
    cap0 = daemon.step().obs.host.capacity
    cfg.write('[host]\nreserve_mib = 512\nnet_kibs = 5000\nmemtune_soft_limit = true\nstats_period = 7\n')
    with caplog.at_level(logging.INFO):
        daemon.reload()
        cap1 = daemon.step().obs.host.capacity
    assert cap1[MEMORY] == cap0[MEMORY] + 1024 - 512 and cap1[3] == 5000
    inner = real(daemon)
    assert inner.config.memtune_soft_limit and inner.config.stats_period == 7
    xml = inner.lv.connect().lookupByName("test").XMLDesc(0)
    assert "<stats period='7'/>" in xml  # the new period reached the running VM, not only new ones
    caplog.clear()
    cfg.write('[host]\nreserve_mib = 60000\n')  # more than the test driver's host has
    with caplog.at_level(logging.INFO):
        daemon.reload()
    assert "reload refused" in caplog.text and "host.reserve_mib = 60000 leaves no memory" in caplog.text
    assert daemon.cfg.host.reserve_mib == 512 and daemon.step().obs.host.capacity[MEMORY] == cap1[MEMORY]


def test_reload_applies_agent_guard_policy_period_filter_and_actuator(daemon, cfg, tmp_path):
    daemon.step()
    key = tmp_path / "agent.key"
    key.write_text("k" * 32)
    key.chmod(0o600)
    cfg.write(f'policy = "static"\nvm_filter = "web-*"\n'
              f'[agent]\ntimeout = 0.3\nkey_file = "{key}"\n[agent.tcp]\nweb = "127.0.0.1:7000"\n'
              '[guard]\nmem_floor_mib = 300\n[host]\nactuator = "cgroup"\n',
              base=BASE.replace("period = 1", "period = 7"))
    daemon.reload()
    inner = real(daemon)
    assert inner.agents.timeout == 0.3 and inner.agents.key == b"k" * 32
    assert inner.tcp_agents == {"web": "127.0.0.1:7000"}
    assert daemon.loop.guard.config.mem_floor_mib == 300 and daemon.loop.policy.name == "static"
    assert daemon.period == 7 and type(inner.actuator).__name__ == "CgroupActuator"
    assert daemon.step().obs.n == 0  # "test" does not match web-*
    key.unlink()
    cfg.write(f'[agent]\nkey_file = "{key}"\n')
    daemon.reload()  # refused: run could not use this key either
    assert daemon.cfg.agent.timeout == 0.3 and inner.agents.key == b"k" * 32


def test_reload_starts_moves_and_stops_the_metrics_endpoint(daemon, cfg, caplog):
    daemon.step()
    port, port2 = free_port(), free_port()
    cfg.write(f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
    daemon.reload()
    daemon._after_step(daemon.step())  # what the daemon's loop does after each step: metrics updated
    assert 'rescoin_vm_credit{vm="test"}' in scrape(port)
    cfg.write(f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{port2}"\n')
    daemon.reload()
    assert "rescoin_vms" in scrape(port2)
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    with socket.socket() as busy:  # a port in use: logged, the endpoint stays where it was
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg.write(f'policy = "static"\n[metrics]\nenabled = true\nlisten = "127.0.0.1:{busy.getsockname()[1]}"\n')
        with caplog.at_level(logging.INFO):
            daemon.reload()
    assert "Address already in use" in caplog.text and daemon.loop.policy.name == "static"
    assert "rescoin_vms" in scrape(port2) and daemon.cfg.metrics.listen == f"127.0.0.1:{port2}"
    cfg.write("[metrics]\nenabled = false\n")
    daemon.reload()
    assert daemon.metrics is None
    with pytest.raises(urllib.error.URLError):
        scrape(port2)


def test_reload_names_the_settings_that_need_a_restart_only_when_they_changed(daemon, cfg, tmp_path, caplog):
    daemon.step()
    cfg.write("restore_on_exit = true\n")
    with caplog.at_level(logging.INFO, logger="rescoin.ops.daemon"):
        daemon.reload()
    line = caplog.records[-1].message
    assert "configuration reloaded" in line and "changed: daemon.restore_on_exit" in line
    assert "restart needed" not in line and daemon.cfg.daemon.restore_on_exit
    moved = (f'[daemon]\nuri = "test:///other"\nstate_file = "{tmp_path / "s.npz"}"\nhistory_dir = "{tmp_path}"\n'
             'status_socket = ""\nperiod = 1\n')
    cfg.write(base=moved)
    with caplog.at_level(logging.INFO, logger="rescoin.ops.daemon"):
        daemon.reload()
    line = caplog.records[-1].message
    assert line.endswith("restart needed for: daemon.uri, daemon.history_dir, daemon.state_file"), line
    assert daemon.cfg.daemon.uri == "test:///default" and daemon.cfg.daemon.state_file == ""
    assert not (tmp_path / "s.npz").exists()


def test_vm_entries_that_match_no_vm_are_named_at_first_sight_and_after_a_reload(daemon, cfg, caplog):
    add_vms(daemon, "stopped", start=False)  # defined, not running: its entry is no typo
    cfg.write('[vm.test]\nweight = 2\n[vm.stopped]\nweight = 2\n[vm."tset"]\nweight = 2\n')
    daemon.reload()
    with caplog.at_level(logging.WARNING, logger="rescoin.ops.daemon"):
        daemon.step()
        daemon.step()
    warned = [r.message for r in caplog.records if "matches no VM" in r.message]
    assert len(warned) == 1 and '[vm."tset"]' in warned[0]
    caplog.clear()
    cfg.write('[vm.test]\nweight = 2\n[vm."6695eb01-f6a4-8304-79aa-97f2502e193f"]\nexclude = false\n[vm.gone]\n')
    daemon.reload()
    with caplog.at_level(logging.WARNING, logger="rescoin.ops.daemon"):
        daemon.step()
    warned = [r.message for r in caplog.records if "matches no VM" in r.message]
    assert len(warned) == 1 and '[vm."gone"]' in warned[0]


def test_restore_on_exit_after_a_reload_to_dry_run_puts_back_what_was_applied(cfg):
    cfg.write('restore_on_exit = true\nvm_filter = "rx-*"\n[vm.rx-a]\nweight = 10\n')
    d = Daemon(load(cfg.path), config_path=str(cfg.path))
    try:
        add_vms(d, "rx-a", "rx-b")
        conn = real(d).lv.connect()
        for name in ("rx-a", "rx-b"):
            conn.lookupByName(name).setBlkioParameters({"weight": 300})  # the test driver's 0 is no weight
        original = blkio(d)
        settle(d)
        assert blkio(d) != original  # the live run changed the VMs
        cfg.write('restore_on_exit = true\ndry_run = true\nvm_filter = "rx-*"\n[vm.rx-a]\nweight = 10\n')
        d.reload()
        d.step()
        d.close()  # still restores: the dry run came after real changes
        assert blkio(d) == original
    finally:
        real(d).close()


def test_a_daemon_that_was_always_dry_changes_nothing_on_exit(cfg):
    cfg.write('restore_on_exit = true\ndry_run = true\nvm_filter = "dry-*"\n')
    d = Daemon(load(cfg.path), config_path=str(cfg.path))
    try:
        add_vms(d, "dry-a")
        d.step()
        real(d).lv.connect().lookupByName("dry-a").setBlkioParameters({"weight": 321})  # by someone else
        d.step()
        d.close()
        assert blkio(d)["dry-a"] == 321
    finally:
        real(d).close()
