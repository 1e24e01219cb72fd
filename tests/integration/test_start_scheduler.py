"""scripts/start-scheduler: nohup, pid file, log file, no second start, stop/status/reload."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test`")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "start-scheduler"


def run(env, *args, check=False):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=90,
                          check=check)


def test_start_status_second_start_reload_stop(tmp_path):
    env = dict(os.environ, RESCOIN_PIDFILE=str(tmp_path / "run" / "rescoin.pid"),
               RESCOIN_LOG=str(tmp_path / "log" / "rescoin.log"),
               RESCOIN_BIN=str(Path(sys.executable).parent / "rescoin"))
    (tmp_path / "c.toml").write_text("")
    opts = ["--", "--uri", "test:///default", "--period", "0.5", "--config", str(tmp_path / "c.toml"),
            "--state", str(tmp_path / "state.npz"), "--status-socket", str(tmp_path / "s.sock"),
            "--history", str(tmp_path / "h")]
    try:
        r = run(env, "start", *opts)
        assert r.returncode == 0, r.stderr
        pid = int((tmp_path / "run" / "rescoin.pid").read_text())
        assert run(env, "status").returncode == 0
        again = run(env, "start", *opts)
        assert again.returncode == 1 and "already running" in again.stderr
        assert run(env, "reload").returncode == 0
        log = tmp_path / "log" / "rescoin.log"
        deadline = time.monotonic() + 20
        while "configuration reloaded" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        assert run(env, "stop").returncode == 0
        assert not (tmp_path / "run" / "rescoin.pid").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert run(env, "status").returncode == 3
        assert "stopped after" in log.read_text()
    finally:
        run(env, "stop")


def test_start_that_fails_at_once_says_why(tmp_path):
    env = dict(os.environ, RESCOIN_PIDFILE=str(tmp_path / "rescoin.pid"), RESCOIN_LOG=str(tmp_path / "rescoin.log"),
               RESCOIN_BIN=str(Path(sys.executable).parent / "rescoin"))
    r = run(env, "start", "--", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 1
    assert "no such configuration file" in r.stderr
    assert not (tmp_path / "rescoin.pid").exists()


def test_a_slow_start_that_fails_is_not_reported_as_started(tmp_path):
    """A loaded host can take over a second to import rescoin: the failure must still be seen."""
    slow = tmp_path / "slow-rescoin"
    slow.write_text(f"#!/bin/sh\nsleep 2\nexec {Path(sys.executable).parent / 'rescoin'} \"$@\"\n")
    slow.chmod(0o755)
    (tmp_path / "rescoin.log").write_text("an older run: rescoin 0.0: policy x on y, period 5 s\n")
    env = dict(os.environ, RESCOIN_PIDFILE=str(tmp_path / "rescoin.pid"), RESCOIN_LOG=str(tmp_path / "rescoin.log"),
               RESCOIN_BIN=str(slow))
    r = run(env, "start", "--", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 1, r.stdout
    assert "no such configuration file" in r.stderr
    assert "an older run" not in r.stderr
    assert not (tmp_path / "rescoin.pid").exists()


def test_a_wait_that_is_not_a_number_is_one_line(tmp_path):
    env = dict(os.environ, RESCOIN_PIDFILE=str(tmp_path / "rescoin.pid"), RESCOIN_LOG=str(tmp_path / "rescoin.log"),
               RESCOIN_BIN=str(Path(sys.executable).parent / "rescoin"), RESCOIN_START_WAIT="2.5")
    r = run(env, "start")
    assert r.returncode == 2
    assert r.stderr.strip() == "RESCOIN_START_WAIT=2.5 is not a whole number of seconds"
    assert not (tmp_path / "rescoin.pid").exists()
