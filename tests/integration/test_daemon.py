"""The daemon as an operator runs it: a real process on libvirt's test driver.

kill -9 and restart (state resumes), SIGHUP reload, SIGTERM, the status
socket and the Prometheus endpoint, each checked from outside the process.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test`")

from rescoin.ops.status import query, render  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, tmp: Path, *extra: str, config: Path | None = None) -> None:
        self.tmp = tmp
        self.log = tmp / f"daemon-{time.monotonic_ns()}.log"
        self.sock = tmp / "status.sock"
        cmd = [sys.executable, "-m", "rescoin.cli", "run", "--uri", "test:///default", "--period", "0.3",
               "--state", str(tmp / "state.npz"), "--history", str(tmp / "hist"), "--status-socket", str(self.sock),
               "--config", str(config or write_config(tmp, "")), *extra]
        self.fh = open(self.log, "w")  # noqa: SIM115 - held open for the daemon's lifetime, closed in stop()
        self.p = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def periods(self) -> int:
        return self.text().count(" VMs, ")

    def wait_periods(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.periods() < n:
            assert self.p.poll() is None, self.text()
            assert time.monotonic() < deadline, f"fewer than {n} periods: {self.text()[-2000:]}"
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.fh.close()
        return self.p.returncode


def write_config(tmp: Path, text: str) -> Path:
    path = tmp / "rescoin.toml"
    path.write_text(text)
    return path


def state_t(tmp: Path) -> int:
    with np.load(tmp / "state.npz") as data:
        return int(data["meta"][1])


def test_kill_9_then_restart_resumes_history_and_credits(tmp_path):
    first = Proc(tmp_path)
    try:
        first.wait_periods(12)
    finally:
        first.stop(signal.SIGKILL)  # a crash: no chance to flush or save anything
    saved = state_t(tmp_path)
    assert saved >= 11
    hist = pd.concat(pd.read_csv(f) for f in (tmp_path / "hist").glob("history-*.csv"))
    before_rows = len(hist)
    credit_before = hist[hist.resource == "memory"].sort_values("ts").credit.iloc[-1]

    second = Proc(tmp_path)
    try:
        second.wait_periods(3)
        assert "resumed from" in second.text()
        after = pd.concat(pd.read_csv(f) for f in (tmp_path / "hist").glob("history-*.csv"))
        assert len(after) > before_rows  # appended, nothing lost
        assert after.ts.is_monotonic_increasing or after.sort_values("ts").ts.diff().dropna().ge(0).all()
        mem = after[after.resource == "memory"].sort_values("ts")
        # credits continue from the saved window instead of starting from nothing
        first_new = mem.iloc[len(hist[hist.resource == "memory"])]
        assert first_new.credit == pytest.approx(credit_before, rel=0.5, abs=1e-3)
    finally:
        assert second.stop() == 0
    assert state_t(tmp_path) > saved  # the period counter went on


def test_sighup_reloads_config_keeping_history(tmp_path):
    cfg = write_config(tmp_path, '[daemon]\npolicy = "static"\n')
    p = Proc(tmp_path, config=cfg)
    try:
        p.wait_periods(4)
        assert query(p.sock)["policy"] == "static"
        t_before = query(p.sock)["period"]
        cfg.write_text('[daemon]\npolicy = "rescoin"\n[vm.test]\nweight = 2.0\n')
        p.p.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while query(p.sock)["policy"] != "rescoin":
            assert time.monotonic() < deadline, p.text()[-2000:]
            time.sleep(0.2)
        assert query(p.sock)["period"] > t_before  # history went on, not restarted
        assert "configuration reloaded" in p.text()
        # a bad file on reload is refused and the daemon keeps running
        cfg.write_text('[daemon]\nperiod = -5\n')
        p.p.send_signal(signal.SIGHUP)
        n = p.periods()
        p.wait_periods(n + 3)
        assert "reload refused" in p.text() and query(p.sock)["policy"] == "rescoin"
    finally:
        assert p.stop() == 0


def test_status_socket_is_root_only_and_answers(tmp_path, capsys):
    port = free_port()
    p = Proc(tmp_path, "--metrics", f"127.0.0.1:{port}")
    try:
        p.wait_periods(3)
        mode = stat.S_IMODE(os.stat(p.sock).st_mode)
        assert mode == 0o600
        snap = query(p.sock)
        vm = snap["vms"][0]
        assert vm["name"] == "test" and set(vm["usage"]) == {"cpu", "memory", "disk", "net"}
        assert snap["host"]["pcpus"] > 0 and "contention" in snap["host"]
        from rich.console import Console

        Console(width=160).print(render(snap))
        assert "test" in capsys.readouterr().out
        from rescoin.cli import main

        assert main(["status", "--json", "--socket", str(p.sock)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["vms"][0]["uuid"] == vm["uuid"]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for name in ("rescoin_vm_allocation", "rescoin_vm_credit", "rescoin_loop_seconds_count",
                     "rescoin_actions_total"):
            assert name in body, name
        assert 'vm="test"' in body
    finally:
        assert p.stop() == 0
    assert not p.sock.exists()  # removed on a clean stop


def test_status_without_daemon_says_what_to_do(tmp_path, capsys):
    from rescoin.cli import main

    assert main(["status", "--socket", str(tmp_path / "none.sock")]) == 2
    err = capsys.readouterr().err
    assert "is the daemon running" in err and "Traceback" not in err
