"""scripts/rescoin.service: systemd accepts it, and its commands drive the daemon as systemd would.

This machine has systemd installed but not running as PID 1, so the unit is
checked with ``systemd-analyze verify`` (systemd's own parser) and its
ExecStart / ExecReload / KillSignal are carried out here the way systemd
carries them out.
"""
from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test`")

UNIT = Path(__file__).resolve().parents[2] / "scripts" / "rescoin.service"
RESCOIN = str(Path(sys.executable).parent / "rescoin")


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read(UNIT)
    return cp


def exec_start(config: Path) -> list[str]:
    """The unit's ExecStart with the installed paths swapped for this checkout's."""
    argv = shlex.split(unit()["Service"]["ExecStart"])
    assert argv[0].endswith("/bin/rescoin") and argv[1] == "run"
    return [RESCOIN, *argv[1:-1], str(config)] if argv[-2] == "--config" else [RESCOIN, *argv[1:]]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd is installed by scripts/setup-host"
    copy = tmp_path / "rescoin.service"
    copy.write_text(UNIT.read_text().replace("/opt/rescoin/.venv/bin/rescoin", RESCOIN))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "rescoin.service" not in r.stderr, r.stderr  # no warning about our unit
    # and the check is real: a broken copy is refused
    copy.write_text(copy.read_text().replace("Restart=on-failure", "Restart=sometimes")
                    .replace(RESCOIN, "/nonexistent/rescoin"))
    bad = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "not executable" in bad.stderr


def test_unit_restarts_on_failure_reloads_with_hup_and_stops_with_term():
    s = unit()["Service"]
    assert s["Restart"] == "on-failure"
    assert shlex.split(s["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert s["KillSignal"] == "SIGTERM"
    assert s["RuntimeDirectory"] == "rescoin" and s["RuntimeDirectoryMode"] == "0700"


def test_exec_start_runs_reloads_and_stops_cleanly(tmp_path):
    config = tmp_path / "rescoin.toml"
    config.write_text(
        "[daemon]\n"
        'uri = "test:///default"\nperiod = 1.0\n'
        f'history_dir = "{tmp_path / "history"}"\nstate_file = "{tmp_path / "state.npz"}"\n'
        f'status_socket = "{tmp_path / "status.sock"}"\n'
    )
    log = tmp_path / "journal.log"
    with log.open("w") as out:
        proc = subprocess.Popen(exec_start(config), stdout=out, stderr=subprocess.STDOUT)
    try:
        def wait_for(text: str, seconds: float = 30.0) -> None:
            deadline = time.monotonic() + seconds
            while text not in log.read_text():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()}"
                time.sleep(0.2)

        wait_for("period 2:")
        os.kill(proc.pid, signal.SIGHUP)  # ExecReload
        wait_for("configuration reloaded")
        wait_for("period 4:")
        proc.send_signal(signal.SIGTERM)  # KillSignal
        timeout = float(unit()["Service"]["TimeoutStopSec"])
        assert proc.wait(timeout=timeout) == 0, log.read_text()  # a clean stop: no restart
        assert (tmp_path / "state.npz").is_file() and list((tmp_path / "history").glob("history-*.csv"))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_exec_start_with_a_bad_config_fails_so_systemd_restarts_it(tmp_path):
    config = tmp_path / "rescoin.toml"
    config.write_text("[daemon]\nperiod = -1\n")
    r = subprocess.run(exec_start(config), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0  # Restart=on-failure applies
    assert "daemon.period" in r.stderr and "must be in" in r.stderr
