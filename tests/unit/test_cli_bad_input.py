"""Issue 8 item 17: a bad model file, overcommit, non-UTF-8 config or a closed stdout pipe gives one line, no traceback.

Every case runs the real command line: ``main()`` with captured output, or the ``rescoin`` program in a
subprocess where a real closed pipe is needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rescoin.cli import main

DATA = Path(__file__).resolve().parents[1] / "data"
PLANETLAB = DATA / "planetlab"
REPO = Path(__file__).resolve().parents[2]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``rescoin ARGV`` (argparse errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single error line of ``err`` (argparse may print its usage above it); no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# -- simulate --model ---------------------------------------------------------------------------


MODELS = {
    "missing": None,
    "not-toml": b"[cpu\nalpha_up = 0.5\n",
    "not-utf8": b"# mod\xe8le\n[cpu]\nalpha_up = 0.5\n",
    "out-of-range": b"[cpu]\nalpha_up = 7\n",
    "huge-integer": b"[memory]\nseason = 100000000000000000000000000000\n",
    "boolean": b"[cpu]\nalpha_up = true\n",
    "not-a-table": b"cpu = 3\n",
    "directory": "dir",
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_simulate_bad_model_is_one_line_before_the_replay(kind, tmp_path, capsys):
    path = tmp_path / f"{kind}.toml"
    content = MODELS[kind]
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    code, out, err = run_cli(["simulate", "--trace", str(PLANETLAB), "--policies", "rescoin", "--format", "json",
                              "--model", str(path)], capsys)
    assert code == 2
    assert out == ""  # said before the replay, nothing printed
    line = one_error_line(err)
    assert len([x for x in err.splitlines() if x.strip()]) == 1, err
    assert line.startswith("rescoin: error: ") and str(path) in line


def test_a_good_model_still_loads(tmp_path, capsys):
    path = tmp_path / "ok.toml"
    path.write_text("[cpu]\nalpha_up = 0.5\n")
    code, out, err = run_cli(["simulate", "--trace", str(PLANETLAB), "--policies", "rescoin", "--format", "json",
                              "--model", str(path)], capsys)
    assert code == 0, err
    assert set(json.loads(out)["policies"]) == {"rescoin"}


# -- --overcommit ---------------------------------------------------------------------------------


COMMANDS = {
    "simulate": ["simulate", "--trace", str(PLANETLAB), "--policies", "static"],
    "run": ["run", "--uri", f"sim:{PLANETLAB}", "--speed", "0", "--max-periods", "1"],
    "demo": ["demo", "--trace", str(PLANETLAB), "--seconds", "0.1"],
}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "0"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_overcommit_must_be_a_finite_positive_number(command, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # demo writes its history in the working directory
    code, out, err = run_cli(COMMANDS[command] + [f"--overcommit={value}"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "--overcommit" in line and value in line
    assert not (tmp_path / "rescoin-history").exists()


# -- configuration files that are not UTF-8 ----------------------------------------------------------


@pytest.fixture
def latin1_config(tmp_path) -> Path:
    path = tmp_path / "rescoin.toml"
    path.write_bytes("[daemon]\nperiod = 30\n# réglé à la main\n".encode("latin-1"))
    return path


def test_config_check_not_utf8(latin1_config, capsys):
    code, out, err = run_cli(["config", "check", str(latin1_config)], capsys)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith(f"rescoin: error: {latin1_config}:3: ") and "UTF-8" in line


def test_run_config_not_utf8(latin1_config, capsys):
    code, out, err = run_cli(["run", "--config", str(latin1_config), "--uri", f"sim:{PLANETLAB}", "--speed", "0",
                              "--max-periods", "1"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"rescoin: error: {latin1_config}:3: ") and "UTF-8" in line


# -- a reader that goes away: `rescoin status --json | head` ------------------------------------------


def test_only_a_closed_stdout_pipe_counts_as_the_reader_gone():
    """Another broken pipe (a socket, a child's stdin) stays an error: only stdout's reader leaving is quiet."""
    from rescoin.cli import stdout_reader_gone

    r, w = os.pipe()
    try:
        assert not stdout_reader_gone(w)  # a reader is still there
        os.close(r)
        r = -1
        assert stdout_reader_gone(w)
    finally:
        os.close(w)
        if r >= 0:
            os.close(r)
