"""Data safety of the daemon's own files (issue 8, items 1-8): real files, real sockets, no mocks.

The state file is refused unless it is rescoin's own, kept under a new name
when damaged or inconsistent, locked against a second daemon; stale temp
files are removed; history files lose a torn last row on open; the status
socket never changes an existing directory's mode and never unlinks what is
not its own socket.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rescoin.core.history import History
from rescoin.offline.historycsv import HEADER, HistoryWriter, read_history
from rescoin.offline.simulate import SimSettings, build_loop
from rescoin.ops.paths import PathError, PathLock
from rescoin.ops.state import FORMAT, StateFile, check_originals, is_rescoin_state, load_state, save_state
from rescoin.ops.status import StatusServer, query

MIDNIGHT = 1375315200.0  # 2013-08-01 00:00:00 UTC
ORIGINAL = {"shares": 1024, "quota": -1, "balloon": 2048.0, "blkio": 500, "pins": [[True, True]]}


def busy_history(kit, window: int = 60, periods: int = 5) -> History:
    h = History(window)
    vms = kit.vms(2, uuids=["a", "b"])
    for t in range(periods):
        h.push(kit.obs(vms, np.full((2, 4), t + 1.0), [8.0, 8192.0, 1000.0, 1000.0], ts=300.0 * t))
        h.decide(forecast=np.ones((2, 4)), allocation=np.ones((2, 4)), entitlement=np.ones((2, 4)))
        h.state("x.level")[:] = t
    return h


def kept_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".broken-*"))


# -- 1. a path rescoin did not create ----------------------------------------------------------------
def test_state_path_that_is_a_directory_is_refused_and_untouched(tmp_path):
    d = tmp_path / "shared"
    d.mkdir(mode=0o1777)
    os.chmod(d, 0o1777)
    (d / "someone.txt").write_text("theirs")
    with pytest.raises(PathError, match="is a directory"):
        StateFile(d).open()
    assert d.is_dir() and stat.S_IMODE(d.stat().st_mode) == 0o1777
    assert (d / "someone.txt").read_text() == "theirs"
    assert list(tmp_path.iterdir()) == [d]  # nothing renamed, nothing created next to it


def test_state_path_that_is_not_a_rescoin_file_is_refused_and_untouched(tmp_path):
    cfg = tmp_path / "rescoin.toml"
    cfg.write_text('[daemon]\npolicy = "static"\n')
    with pytest.raises(PathError, match="not a rescoin state file"):
        StateFile(cfg).open()
    assert cfg.read_text() == '[daemon]\npolicy = "static"\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rescoin.toml"]
    other = tmp_path / "other.npz"
    np.savez(other, meta_data=np.arange(3))  # an npz, but someone else's
    with pytest.raises(PathError, match="not a rescoin state file"):
        StateFile(other).open()


def test_saved_state_starts_with_the_format_marker(kit, tmp_path):
    path = tmp_path / "state.npz"
    save_state(path, busy_history(kit), {"u1": ORIGINAL}, set())
    assert is_rescoin_state(path)
    with np.load(path) as data:
        assert data.files[0] == "format" and tuple(data["format"]) == FORMAT
    saved = load_state(path, 60)
    assert saved.history.t == 5 and saved.originals == {"u1": ORIGINAL}


def test_damaged_state_is_kept_under_a_new_name_each_time(kit, tmp_path, caplog):
    path = tmp_path / "state.npz"
    for attempt in range(2):
        save_state(path, busy_history(kit), {}, set())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # rescoin's own file, cut in half
        assert is_rescoin_state(path)
        state = StateFile(path).open()
        with caplog.at_level(logging.WARNING, logger="rescoin.ops.state"):
            saved = state.load(60)
        state.close()
        assert saved.history.t == 0 and not path.exists()
        assert len(kept_files(path)) == attempt + 1  # the older copy is never replaced
        assert "starting fresh" in caplog.text
    a, b = kept_files(path)
    assert a.read_bytes() != b"" and b.read_bytes() != b""


# -- 2. a state that loads but does not fit --------------------------------------------------------
def test_state_with_short_rings_starts_fresh_and_is_kept(kit, tmp_path, caplog):
    path = tmp_path / "state.npz"
    save_state(path, busy_history(kit, window=30), {}, set())  # a window the daemon does not keep
    with caplog.at_level(logging.WARNING, logger="rescoin.ops.state"):
        saved = load_state(path, 60)
    assert saved.history.t == 0 and saved.history.window == 60
    assert "window 30" in caplog.text and len(kept_files(path)) == 1


@pytest.mark.parametrize("edit", [
    lambda a: a.__setitem__("ring.usage", a["ring.usage"][:10]),  # ring shorter than the window
    lambda a: a.__setitem__("age", a["age"][:1]),  # one VM short
    lambda a: a.__setitem__("state.x.level", a["state.x.level"][:1]),
    lambda a: a.pop("fill.x.level"),
    lambda a: a.__setitem__("pending.forecast", np.ones((2, 2))),
    lambda a: a.__setitem__("ts", np.array(["x"] * 60)),
    lambda a: a.pop("ring.signal"),
    lambda a: a.__setitem__("originals", np.array(json.dumps({"u": dict(ORIGINAL, shares="lots")}))),
    lambda a: a.__setitem__("originals", np.array(json.dumps({"u": dict(ORIGINAL, pins=7)}))),
    lambda a: a.__setitem__("originals", np.array(json.dumps({"u": {"balloon": 1.0}}))),
    lambda a: a.__setitem__("originals", np.array(json.dumps([1, 2]))),
    lambda a: a.__setitem__("unrestored", np.array(json.dumps({"a": 1}))),
    lambda a: a.__setitem__("format", np.array(["rescoin-state", "99"])),
])
def test_inconsistent_state_starts_fresh(kit, tmp_path, edit):
    path = tmp_path / "state.npz"
    save_state(path, busy_history(kit), {"u": ORIGINAL}, set())
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    edit(arrays)
    np.savez(path, **arrays)
    saved = load_state(path, 60)
    assert saved.history.t == 0 and saved.originals == {} and len(kept_files(path)) == 1


def test_check_originals_accepts_what_libvirt_host_saves():
    full = dict(ORIGINAL, soft_limit_kib=9007199254740991, netcaps={"vnet0": {"inbound.average": 0}},
                diskcaps={"vda": {"total_bytes_sec": 0, "total_bytes_sec_max": 0}})
    assert check_originals({"u": full, "v": dict(ORIGINAL, shares=None, quota=None, blkio=None)})
    with pytest.raises(ValueError, match="netcaps"):
        check_originals({"u": dict(full, netcaps={"vnet0": {"inbound.average": "x"}})})


# -- 5. a second daemon on the same state --------------------------------------------------------------
def test_second_open_of_the_same_state_is_refused_naming_the_pid(tmp_path):
    first = StateFile(tmp_path / "state.npz").open()
    try:
        with pytest.raises(PathError, match=f"in use by another rescoin daemon \\(pid {os.getpid()}\\)"):
            StateFile(tmp_path / "state.npz").open()
    finally:
        first.close()
    assert not (tmp_path / "state.npz.lock").exists()  # released and removed
    StateFile(tmp_path / "state.npz").open().close()  # free again


def test_stale_lock_of_a_dead_daemon_does_not_block(tmp_path):
    (tmp_path / "state.npz.lock").write_text("rescoin pid 999999\n")  # its holder died: no flock on it
    lock = StateFile(tmp_path / "state.npz").open()
    assert (tmp_path / "state.npz.lock").read_text() == f"rescoin pid {os.getpid()}\n"
    lock.close()


def test_lock_file_that_is_not_rescoins_is_not_overwritten(tmp_path):
    theirs = tmp_path / "x.lock"
    theirs.write_text("precious\n")
    with pytest.raises(PathError, match="not a rescoin lock file"):
        PathLock(theirs, tmp_path / "x").acquire()
    assert theirs.read_text() == "precious\n"


# -- 8. temp files of a save cut short -------------------------------------------------------------
def test_stale_temp_files_are_removed_on_open_and_nothing_else(tmp_path):
    stale = [tmp_path / "state.npz.k2j_9x0a.tmp", tmp_path / "state.npz.zzzzzzzz.tmp"]
    others = [tmp_path / "state.npz.notes.tmp", tmp_path / "other.npz.abcdefgh.tmp", tmp_path / "state.npz.keep"]
    for p in stale + others:
        p.write_bytes(b"PK\x03\x04partial")
    StateFile(tmp_path / "state.npz").open().close()
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)


# -- 4. a torn last history row ---------------------------------------------------------------------
def _steps(kit, periods: int = 3):
    trace = kit.trace(np.full((periods, 2, 4), 1.0), np.tile([2.0, 2048.0, np.nan, np.nan], (2, 1)),
                      start=MIDNIGHT + 3600)
    loop = build_loop(trace, "static", SimSettings())
    return loop, list(loop.steps())


@pytest.mark.parametrize("cut", [15, len(HEADER) - 3])  # a torn data row; a torn header
def test_torn_last_row_is_removed_on_open(kit, tmp_path, cut):
    loop, steps = _steps(kit)
    with HistoryWriter(tmp_path, "h") as w:
        w.write(steps[0], loop.history)
        path = w.path_for(steps[0].obs.ts)
    text = path.read_text()
    torn = text + text.splitlines()[1][:15] if cut == 15 else HEADER[:cut]
    path.write_text(torn)  # what a crash mid-write leaves
    with HistoryWriter(tmp_path, "h") as w:
        w.write(steps[1], loop.history)
    df = pd.read_csv(path)  # no options
    assert list(df.columns) == HEADER.strip().split(",")
    assert len(df) == (2 if cut == 15 else 1) * 2 * 4
    assert len(read_history([tmp_path])) == len(df)


# -- 3. history write errors -------------------------------------------------------------------------
def test_history_write_error_is_said_once_and_writing_resumes(kit, tmp_path, caplog):
    loop, steps = _steps(kit, periods=4)
    w = HistoryWriter(tmp_path, "h")
    path = w.path_for(steps[0].obs.ts)
    assert w.try_write(steps[0], loop.history)
    w._fh.close()
    path.unlink()
    path.mkdir()  # the day's file cannot be opened any more: IsADirectoryError, an OSError
    w._fh = None
    with caplog.at_level(logging.WARNING, logger="rescoin.core.history"):
        assert not w.try_write(steps[1], loop.history)
        assert not w.try_write(steps[2], loop.history)
        assert caplog.text.count("history is not being written") == 1
        path.rmdir()
        assert w.try_write(steps[3], loop.history)
        assert caplog.text.count("history writing resumed") == 1
    w.close()
    w.close()  # twice, and after errors: never raises
    assert len(pd.read_csv(path)) == 2 * 4


# -- 6. the status socket ----------------------------------------------------------------------------
def test_status_socket_in_a_shared_directory_keeps_its_mode(tmp_path):
    shared = tmp_path / "run"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: sticky, world-writable
    server = StatusServer(shared / "status.sock")
    server.start()
    try:
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        assert stat.S_IMODE(os.stat(shared / "status.sock").st_mode) == 0o600
        assert query(shared / "status.sock")["starting"]
    finally:
        server.close()
    assert not (shared / "status.sock").exists()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_status_socket_directory_of_its_own_is_private(tmp_path):
    server = StatusServer(tmp_path / "new" / "status.sock")
    old = os.umask(0)
    try:
        server.start()
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    finally:
        server.close()


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_text("data"), "not a socket"),
    (lambda p: p.mkdir(), "a directory"),
])
def test_status_socket_path_holding_something_else_is_refused(tmp_path, make, match):
    path = tmp_path / "status.sock"
    make(path)
    with pytest.raises(PathError, match=match):
        StatusServer(path).start()
    assert path.exists()  # never unlinked


def test_status_socket_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(PathError, match="longer than"):
        StatusServer(tmp_path / ("x" * 120) / "s.sock").start()
    (tmp_path / "file").write_text("")
    with pytest.raises(PathError, match="not a directory"):
        StatusServer(tmp_path / "file" / "s.sock").start()
    with pytest.raises(PathError, match="cannot create"):
        StatusServer(Path("/proc/rescoin-no/s.sock")).start()


def test_status_socket_stale_is_replaced_live_is_refused(tmp_path):
    path = tmp_path / "status.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(PathError, match="in use"):
            StatusServer(path).start()
    finally:
        live.close()  # the socket file stays: a daemon killed with -9
    server = StatusServer(path)
    server.start()
    server.close()
    assert not path.exists()


def test_status_close_removes_only_its_own_socket(tmp_path):
    path = tmp_path / "status.sock"
    server = StatusServer(path)
    server.start()
    path.unlink()
    path.write_text("someone else's file now")
    server.close()
    assert path.read_text() == "someone else's file now"
