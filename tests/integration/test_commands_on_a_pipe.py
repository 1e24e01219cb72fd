"""The commands as real processes: output on a pipe fits 80 columns with a legend and no progress bar,
and the bar goes to stderr only when stderr is a terminal (a real pseudo-terminal here).

Processes, not functions: what a pipe gets depends on how rich sees the real
file descriptors, which an in-process capture would hide.
"""
from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
PLANETLAB = DATA / "planetlab"
ROOT = Path(__file__).resolve().parents[2]
BAR_MARKS = ("0:00:", "━")  # the elapsed-time column and the bar itself


def assert_fits(text: str, width: int = 80) -> None:
    for line in text.splitlines():
        assert len(line) <= width, f"{len(line)} columns: {line!r}"
    assert "…" not in text, text


# -- the commands, as processes, on a pipe -------------------------------------------------------------------
def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["TERM"] = "xterm"
    return env


def rescoin(*args: str) -> list[str]:
    return [sys.executable, "-m", "rescoin.cli", *args]


def test_simulate_on_a_pipe_fits_80_columns_with_a_legend_and_no_bar():
    p = subprocess.run(rescoin("simulate", "--trace", str(PLANETLAB), "--days", "0.5",
                               "--policies", "rescoin,rescoin-paper,kvmscheduling"),
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert_fits(p.stdout)
    for mark in BAR_MARKS:
        assert mark not in p.stdout and mark not in p.stderr
    assert "demand-weighted" in p.stdout and "act/VMh" in p.stdout
    assert "memory (MiB)" not in p.stdout and "disk (" not in p.stdout and "net (" not in p.stdout


def test_progress_bar_is_drawn_on_a_terminal_stderr_only():
    master, slave = pty.openpty()
    got = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed its end
                return
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.run(rescoin("simulate", "--trace", str(PLANETLAB), "--days", "0.5", "--policies", "static"),
                           stdout=subprocess.PIPE, stderr=slave, text=True, env=_env(), cwd=ROOT, timeout=120)
    finally:
        os.close(slave)
    reader.join(10)
    os.close(master)
    assert p.returncode == 0
    err = got.decode(errors="replace")
    assert "static" in err and any(mark in err for mark in BAR_MARKS), err[-500:]
    for mark in BAR_MARKS:
        assert mark not in p.stdout
    assert_fits(p.stdout)


def test_demo_on_a_pipe_fits_80_columns_with_a_legend_and_no_bar(tmp_path):
    p = subprocess.run(rescoin("demo", "--seconds", "0.5", "--days", "0.2", "--vms", "8",
                               "--history", str(tmp_path / "hist")),
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert_fits(p.stdout)
    assert "0:00:" not in p.stdout and "0:00:" not in p.stderr
    assert "demand-weighted" in p.stdout and "satisf" in p.stdout
    assert "MiB" in p.stdout and "cores" in p.stdout  # the live view's headers carry units
    lines = p.stdout.splitlines()
    assert any(line.startswith("history: ") for line in lines)  # not glued to the live view's last line


def test_analyze_on_a_pipe_fits_80_columns_and_drops_resources_without_data(tmp_path):
    hist = tmp_path / "hist"
    run = subprocess.run(rescoin("run", "--uri", f"sim:{PLANETLAB}", "--speed", "0", "--max-periods", "30",
                                 "--history", str(hist)), capture_output=True, text=True, env=_env(),
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    p = subprocess.run(rescoin("analyze", str(hist)), capture_output=True, text=True, env=_env(), cwd=tmp_path,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert_fits(p.stdout)
    assert "vm_periods" in p.stdout and "credit" in p.stdout
    assert "memory" not in p.stdout.split("top ")[0]  # a CPU-only history: no empty memory column
    for name in ("planetlab1_cs_purdue_edu_purdue_2", "pl2_csl_utoronto_ca_root"):
        assert name in p.stdout  # VM names whole


def test_status_prints_actions_as_a_table_with_units(tmp_path):
    sock = tmp_path / "run" / "status.sock"
    daemon = subprocess.Popen(rescoin("run", "--uri", "sim:", "--speed", "1000", "--status-socket", str(sock)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            p = subprocess.run(rescoin("status", "--socket", str(sock)), capture_output=True, text=True,
                               env=_env(), cwd=tmp_path, timeout=60)
            if p.returncode == 0 and "starting" not in p.stdout:
                break
            assert daemon.poll() is None and time.monotonic() < deadline, (p.stdout, p.stderr)
            time.sleep(0.3)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    out = p.stdout
    assert_fits(out)
    assert "{'" not in out and "{}" not in out  # no Python dict
    header_lines = [line for line in out.splitlines() if "MiB" in line or "cores" in line]
    assert any("MiB" in line for line in header_lines) and any("cores" in line for line in header_lines)
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "action" in line and "applied" in line and "failed" in line)
    kinds = [line.strip("│ ").split()[0] for line in lines[at + 2:] if line.strip("│ ") and line[0] in "│ "]
    assert "shares" in kinds and "balloon" in kinds
    for name in (f"vm-{i}" for i in range(1, 25)):
        assert name in out  # every VM, each in full


# -- a reader that goes away: `rescoin status --json | head` ------------------------------------------


@pytest.fixture
def status_socket(tmp_path):
    """A UNIX socket answering every connection with a daemon-sized status snapshot (a stand-in daemon)."""
    path = tmp_path / "status.sock"
    snap = {"version": 1, "vms": [{"name": f"vm{i}", "uuid": f"uuid-{i}", "usage": {"cpu": 0.5}}
                                  for i in range(2000)]}
    data = (json.dumps(snap) + "\n").encode()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join(2)
    srv.close()


def closed_pipe_run(argv: list[str]) -> tuple[int, str]:
    """Run ``rescoin ARGV`` with stdout a pipe whose reader has gone (as after ``| head``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "rescoin.cli", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # before the child writes anything: every write meets a closed pipe
    _, err = p.communicate(timeout=60)
    return p.returncode, err.decode()


@pytest.mark.parametrize("argv", [["status", "--json", "--socket", "{sock}"], ["config", "default"],
                                  ["simulate", "--trace", str(PLANETLAB), "--policies", "static", "--format", "json"]])
def test_closed_stdout_pipe_exits_quietly(argv, status_socket):
    code, err = closed_pipe_run([a.format(sock=status_socket) for a in argv])
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert code == 1, err
