"""The daemon's metrics endpoint and start-time checks, from outside a real `rescoin run` process.

Loopback only; connections are bounded in number and closed at the end.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test`")

from rescoin.ops.metrics import MAX_CONNECTIONS  # noqa: E402

RUN = [sys.executable, "-m", "rescoin.cli", "run", "--uri", "test:///default", "--state", "", "--history", "",
       "--status-socket", ""]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run_fails(tmp: Path, *args: str, config: str = "") -> str:
    """``rescoin run`` that must stop at start: exit 2 and one error line, no traceback."""
    cfg = tmp / "rescoin.toml"
    cfg.write_text(config)
    p = subprocess.run([*RUN, "--config", str(cfg), "--max-periods", "1", *args], capture_output=True, text=True,
                       timeout=60)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert lines[0].startswith("rescoin: error: ")
    return lines[0]


def test_run_metrics_on_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = run_fails(tmp_path, "--metrics", f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in line and "Address already in use" in line


@pytest.mark.parametrize("address, words", [("127.0.0.1:99999", "1 .. 65535"), ("127.0.0.1:0", "1 .. 65535"),
                                            ("localhost", "HOST:PORT"), ("999.1.1.1:9848", "cannot resolve")])
def test_run_metrics_with_a_bad_address_is_one_line(tmp_path, address, words):
    assert words in run_fails(tmp_path, "--metrics", address)


def test_run_refuses_a_reserve_above_the_host_and_an_unusable_key_file(tmp_path):
    line = run_fails(tmp_path, config="[host]\nreserve_mib = 60000\n")  # the test driver's host is smaller
    assert "host.reserve_mib = 60000 leaves no memory for the guests" in line
    line = run_fails(tmp_path, config="[host]\nreserve_cores = 4096\n")
    assert "host.reserve_cores = 4096 leaves no CPU for the guests" in line
    line = run_fails(tmp_path, config=f'[agent]\nkey_file = "{tmp_path / "missing.key"}"\n')
    assert "agent.key_file" in line and "No such file" in line


def test_idle_connections_neither_exhaust_the_daemons_descriptors_nor_stall_it(tmp_path):
    port = free_port()
    log = tmp_path / "daemon.log"
    cfg = tmp_path / "rescoin.toml"
    cfg.write_text("")
    with open(log, "w") as fh:
        p = subprocess.Popen([*RUN, "--config", str(cfg), "--period", "0.3", "--metrics", f"127.0.0.1:{port}"],
                             stdout=fh, stderr=subprocess.STDOUT)
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while log.read_text().count(" VMs, ") < 2:
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        before = fds(p.pid)
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "rescoin_loop_seconds_count" in body  # a normal scrape still answers
        periods = log.read_text().count(" VMs, ")
        deadline = time.monotonic() + 10
        while log.read_text().count(" VMs, ") < periods + 3:  # and the loop goes on
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        assert fds(p.pid) <= before + MAX_CONNECTIONS + 8, (before, fds(p.pid))
        assert "control step failed" not in log.read_text()
    finally:
        for s in idle:
            s.close()
        p.terminate()
        assert p.wait(20) == 0
