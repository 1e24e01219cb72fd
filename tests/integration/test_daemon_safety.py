"""The daemon's data safety as an operator meets it (issue 8, items 1-8, 16, 17): real processes on
libvirt's test driver, real files, a real tiny tmpfs that fills up or turns read-only, real sockets.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is installed by `make test`")

from test_daemon import Proc  # noqa: E402 - the child-process helper of the daemon tests

from rescoin.hosts.config import HostConfig  # noqa: E402
from rescoin.hosts.libvirt import LibvirtHost  # noqa: E402
from rescoin.ops.config import load  # noqa: E402
from rescoin.ops.daemon import Daemon  # noqa: E402
from rescoin.ops.status import query  # noqa: E402

TEST_VM = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the test driver's "test" domain
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def rescoin(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rescoin.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def run_args(tmp: Path, state=None, history=None, sock=None) -> list[str]:
    cfg = tmp / "rescoin.toml"
    if not cfg.exists():
        cfg.write_text("")
    return ["run", "--uri", "test:///default", "--period", "0.3", "--config", str(cfg),
            "--state", str(state or tmp / "state.npz"), "--history", str(history or tmp / "hist"),
            "--status-socket", str(sock or tmp / "status.sock")]


class RunProc(Proc):
    """``rescoin run`` as a child process (test_daemon's helper), with other paths if given."""

    def __init__(self, tmp: Path, *extra: str, state=None, history=None, sock=None) -> None:
        given = {"--state": state, "--history": history, "--status-socket": sock}
        super().__init__(tmp, *extra, *[x for k, v in given.items() if v is not None for x in (k, str(v))])

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            assert self.p.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, f"no {text!r}: {self.text()[-3000:]}"
            time.sleep(0.1)


def one_line_error(res: subprocess.CompletedProcess, match: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rescoin: error: ") and match in lines[0], res.stderr


def state_t(path: Path) -> int:
    with np.load(path) as data:
        return int(data["meta"][1])


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k", ro: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    """``mount -o remount,MODE``; retried while the daemon happens to hold the file open (EBUSY)."""
    for _ in range(50):
        if subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"cannot remount {path} {mode}")


# -- 1, 2, 8: the state file --------------------------------------------------------------------------
def test_run_refuses_a_state_path_rescoin_did_not_create(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    one_line_error(rescoin(*run_args(tmp_path, state=shared), "--max-periods", "1"), "is a directory")
    assert shared.is_dir() and stat.S_IMODE(shared.stat().st_mode) == 0o1777
    cfg = tmp_path / "rescoin.toml"
    cfg.write_text("# the operator's config\n")
    one_line_error(rescoin(*run_args(tmp_path, state=cfg), "--max-periods", "1"), "not a rescoin state file")
    assert cfg.read_text() == "# the operator's config\n"
    assert not list(tmp_path.glob("*.broken*")) and not list(tmp_path.glob("tmp.*"))


def test_inconsistent_state_starts_fresh_and_restore_on_exit_works(tmp_path):
    first = RunProc(tmp_path)
    try:
        first.wait_periods(3)
    finally:
        assert first.stop() == 0
    path = tmp_path / "state.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["ring.usage"] = arrays["ring.usage"][:5]  # shorter than the window
    originals = json.loads(str(arrays["originals"]))
    originals[TEST_VM]["pins"] = 3  # and an original of the wrong type
    arrays["originals"] = np.array(json.dumps(originals))
    np.savez(path, **arrays)
    second = RunProc(tmp_path, "--restore-on-exit")
    try:
        second.wait_periods(3)
    finally:
        assert second.stop() == 0
    text = second.text()
    assert "does not fit" in text and "starting fresh" in text
    assert "control step failed" not in text and "Traceback" not in text
    assert "restored the original settings of 1 VMs" in text
    assert len(list(tmp_path.glob("state.npz.broken-*"))) == 1
    assert state_t(path) >= 3  # a fresh, valid state replaced it


def test_stale_temp_files_of_an_interrupted_save_are_removed(tmp_path):
    stale = tmp_path / "state.npz.q1w2e3r4.tmp"
    stale.write_bytes(b"PK\x03\x04 a save cut short by kill -9")
    keep = tmp_path / "state.npz.mine.tmp"
    keep.write_text("not rescoin's pattern")
    res = rescoin(*run_args(tmp_path), "--max-periods", "2")
    assert res.returncode == 0, res.stderr
    assert not stale.exists() and keep.exists()
    assert "removed 1 stale temp file" in res.stderr


# -- 3, 4: history on a disk that fills up or turns read-only; a torn row ------------------------------
@needs_root
def test_history_write_errors_do_not_stop_the_daemon(tmp_path):
    with tmpfs(tmp_path / "hist") as hist:
        d = RunProc(tmp_path, "--restore-on-exit", history=hist)
        try:
            d.wait_periods(3)
            fd = os.open(hist / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk
            with contextlib.suppress(OSError):
                while os.write(fd, b"x" * 4096):
                    pass
            os.close(fd)
            d.wait_for("history is not being written")
            n = d.periods()
            d.wait_periods(n + 3)  # the loop goes on
            (hist / "filler").unlink()
            d.wait_for("history writing resumed")
            n = d.periods()
            d.wait_periods(n + 2)
        finally:
            rc = d.stop()
        text = d.text()
        assert rc == 0, text[-3000:]
        assert text.count("history is not being written") == 1  # once, not every period
        assert text.count("history writing resumed") == 1 and "No space left" in text
        assert "Traceback" not in text and "restored the original settings of 1 VMs" in text
        assert state_t(tmp_path / "state.npz") >= d.periods() - 1  # saved to the end
        (csv,) = hist.glob("history-*.csv")
        df = pd.read_csv(csv)  # no torn row left by the full disk
        assert len(df) % 4 == 0 and df.vm_uuid.eq(TEST_VM).all()  # whole periods only
        assert (df.resource.to_numpy().reshape(-1, 4) == ["cpu", "memory", "disk", "net"]).all()


@needs_root
def test_history_on_a_disk_turned_read_only_is_retried(tmp_path, caplog):
    from rescoin.core.loop import ControlLoop
    from rescoin.core.registry import build
    from rescoin.hosts.sim import SimHost
    from rescoin.offline.historycsv import HistoryWriter
    from rescoin.offline.traces import load_trace, sample_trace_path

    loop = ControlLoop(SimHost(load_trace(sample_trace_path(), vms=2, days=0.1)), build("static"))
    steps = list(loop.steps(4))
    with tmpfs(tmp_path / "hist") as hist:
        w = HistoryWriter(hist, "h")
        with caplog.at_level(logging.WARNING, logger="rescoin.core.history"):
            assert w.try_write(steps[0], loop.history)
            w.close()
            remount(hist, "ro")
            assert not w.try_write(steps[1], loop.history) and not w.try_write(steps[2], loop.history)
            remount(hist, "rw")
            assert w.try_write(steps[3], loop.history)
        w.close()
        assert caplog.text.count("history is not being written") == 1 and "Read-only file system" in caplog.text
        assert "history writing resumed" in caplog.text
        assert len(pd.read_csv(w.path_for(steps[3].obs.ts))) == 2 * 2 * 4


def test_torn_last_history_row_is_repaired_on_restart(tmp_path):
    first = RunProc(tmp_path)
    try:
        first.wait_periods(3)
    finally:
        first.stop(signal.SIGKILL)
    (csv,) = (tmp_path / "hist").glob("history-*.csv")
    before = len(pd.read_csv(csv))
    with open(csv, "a") as fh:
        fh.write("1764750000,test:///default,6695eb01")  # a row cut short by the crash
    second = RunProc(tmp_path)
    try:
        second.wait_periods(3)
    finally:
        assert second.stop() == 0
    df = pd.read_csv(csv)  # no options: the torn row is gone
    assert len(df) == before + 4 * second.periods() and df.vm_uuid.eq(TEST_VM).all()
    assert "partial row" in second.text()


# -- 5, 6: a second daemon; the status socket -----------------------------------------------------------
def test_second_daemon_on_the_same_paths_is_refused(tmp_path):
    first = RunProc(tmp_path)
    try:
        first.wait_periods(2)
        for paths in ({}, {"state": tmp_path / "other.npz"},  # same history and socket
                      {"state": tmp_path / "o2.npz", "history": tmp_path / "h2"}):  # same socket only
            res = rescoin(*run_args(tmp_path, **paths), "--max-periods", "1")
            one_line_error(res, f"in use by another rescoin daemon (pid {first.p.pid})")
        assert first.p.poll() is None and query(tmp_path / "status.sock")["period"] >= 2
        first.wait_periods(first.periods() + 2)
    finally:
        assert first.stop() == 0
    (csv,) = (tmp_path / "hist").glob("history-*.csv")
    assert len(pd.read_csv(csv)) == 4 * first.periods()  # only the first daemon wrote: no doubled rows
    assert not (tmp_path / "status.sock").exists() and not list(tmp_path.glob("*.lock"))


def test_status_socket_in_a_shared_directory_and_at_a_taken_path(tmp_path):
    shared = tmp_path / "run"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    d = RunProc(tmp_path, sock=shared / "status.sock")
    try:
        d.wait_periods(2)
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        assert stat.S_IMODE(os.lstat(shared / "status.sock").st_mode) == 0o600
    finally:
        assert d.stop() == 0
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777 and not (shared / "status.sock").exists()
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    one_line_error(rescoin(*run_args(tmp_path, sock=taken), "--max-periods", "1"), "not a socket")
    assert taken.read_text() == "keep me"


# -- 17: paths that cannot be used when a command starts -------------------------------------------------
@needs_root
def test_run_bad_history_and_socket_paths_are_one_line_errors(tmp_path):
    existing = tmp_path / "afile"
    existing.write_text("x")
    one_line_error(rescoin(*run_args(tmp_path, history=existing), "--max-periods", "1"), "not a directory")
    with tmpfs(tmp_path / "ro", ro=True) as ro:
        one_line_error(rescoin(*run_args(tmp_path, history=ro / "hist"), "--max-periods", "1"), "Read-only")
        one_line_error(rescoin(*run_args(tmp_path, history=ro), "--max-periods", "1"), "not writable")
    for sock, match in ((tmp_path, "a directory"), (Path("/proc/rescoin-none/s.sock"), "cannot create"),
                        (tmp_path / ("d" * 110) / "s.sock", "longer than")):
        one_line_error(rescoin(*run_args(tmp_path, sock=sock), "--max-periods", "1"), match)
    assert existing.read_text() == "x" and tmp_path.is_dir()


# -- 7, 17: the demo ----------------------------------------------------------------------------------
DEMO = ("demo", "--vms", "2", "--days", "0.1", "--seconds", "0.2")


def test_demo_never_appends_to_an_earlier_run(tmp_path):
    runs = [rescoin(*DEMO, cwd=tmp_path) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    dirs = sorted(tmp_path.glob("rescoin-history-*"))
    assert len(dirs) == 2
    rows = [sum(len(pd.read_csv(f)) for f in d.glob("history-*.csv")) for d in dirs]
    assert rows[0] == rows[1] > 0  # the second run did not double anything
    assert all(f"writing to {d.name}/" in r.stdout for d, r in zip(dirs, runs, strict=False))
    one_line_error(rescoin(*DEMO, "--history", str(dirs[0]), cwd=tmp_path), "already holds history")
    (tmp_path / "afile").write_text("")
    one_line_error(rescoin(*DEMO, "--history", "afile", cwd=tmp_path), "not a directory")


@needs_root
def test_demo_history_on_a_read_only_disk_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", ro=True) as ro:
        one_line_error(rescoin(*DEMO, "--history", str(ro / "h"), cwd=tmp_path), "Read-only")


# -- 16: restore with libvirtd away, and what restore covers ---------------------------------------------
def _set_caps(dom, blkio: int, net: int, disk: int, soft: int) -> None:
    dom.setBlkioParameters({"weight": blkio}, 0)
    dom.setInterfaceParameters("testnet0", {"inbound.average": net, "outbound.average": net}, 0)
    dom.setBlockIoTune("vda", {"total_bytes_sec": disk, "total_bytes_sec_max": disk}, 0)
    dom.setMemoryParameters({"soft_limit": soft}, 0)


def _caps(dom) -> tuple:
    return (dom.blkioParameters()["weight"], dom.interfaceParameters("testnet0", 0)["inbound.average"],
            dom.interfaceParameters("testnet0", 0)["outbound.average"],
            dom.blockIoTune("vda", 0)["total_bytes_sec"], dom.memoryParameters(0)["soft_limit"], dom.info()[2])


def test_restore_covers_disk_and_net_caps_and_the_memtune_soft_limit():
    host = LibvirtHost("test:///default", config=HostConfig(reserve_mib=0.0))
    dom = host.lv.connect().lookupByName("test")
    _set_caps(dom, blkio=500, net=300, disk=4096, soft=1500000)
    before = _caps(dom)
    host.observe()  # first sight: the originals
    _set_caps(dom, blkio=100, net=7, disk=1024, soft=900000)  # what later periods apply
    dom.setMemoryFlags(before[-1] - 4096, 0)
    assert host.restore() == 1
    assert _caps(dom) == before
    host.close()


def _daemon(tmp: Path, dry_run: bool = False) -> Daemon:
    from rich.console import Console

    from rescoin.hosts.dryrun import DryRunHost

    cfg = load(_config(tmp))
    cfg = replace(cfg, daemon=replace(cfg.daemon, restore_on_exit=True, dry_run=dry_run))
    return Daemon(cfg, dry_run_host=(lambda h: DryRunHost(h, Console(file=io.StringIO()))) if dry_run else None)


def _config(tmp: Path) -> Path:
    path = tmp / "rescoin.toml"
    path.write_text(f'[daemon]\nuri = "test:///default"\nperiod = 1\nstate_file = "{tmp / "state.npz"}"\n'
                    'history_dir = ""\nstatus_socket = ""\n[host]\nreserve_mib = 0\n')
    return path


def test_restore_with_libvirtd_down_keeps_the_vms_for_the_next_start(tmp_path, caplog):
    first = _daemon(tmp_path)
    dom = first.host.lv.connect().lookupByName("test")
    _set_caps(dom, blkio=500, net=300, disk=4096, soft=1500000)
    for _ in range(2):
        first._after_step(first.step())
    first.host.lv.close()  # libvirtd goes away: every reconnect now fails for real
    first.host.lv.uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    first.restore_timeout = 1.5
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        first.close()  # must not raise
    assert time.monotonic() - t0 < 10
    assert "could not restore the original settings of 1 VMs (test)" in caplog.text
    with np.load(tmp_path / "state.npz") as data:
        assert json.loads(str(data["unrestored"])) == [TEST_VM]
        assert json.loads(str(data["originals"]))[TEST_VM]["blkio"] == 500

    dry = _daemon(tmp_path, dry_run=True)  # a dry run applies nothing, not even the pending restores
    dom = dry.real_host.lv.connect().lookupByName("test")
    _set_caps(dom, blkio=100, net=7, disk=1024, soft=900000)
    dry._after_step(dry.step())
    assert _caps(dom)[:5] == (100, 7, 7, 1024, 900000)
    dry.close()
    with np.load(tmp_path / "state.npz") as data:
        assert json.loads(str(data["unrestored"])) == [TEST_VM]

    second = _daemon(tmp_path)  # the next start: libvirtd is back
    dom = second.host.lv.connect().lookupByName("test")
    _set_caps(dom, blkio=100, net=7, disk=1024, soft=900000)  # rescoin's settings, still on the VM
    with caplog.at_level(logging.INFO):
        second.host.observe()  # its first period restores them, before any new decision
    assert "which the last run could not restore" in caplog.text
    assert _caps(dom)[:5] == (500, 300, 300, 4096, 1500000)
    assert second.host.unrestored() == set()
    second._after_step(second.step())
    second.restore_timeout = 5.0
    second.close()
    with np.load(tmp_path / "state.npz") as data:
        assert json.loads(str(data["unrestored"])) == []

