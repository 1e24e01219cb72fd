"""The lab's agent query goes through the one validating client (rescoin.hosts.agent)."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from rescoin.lab import lifecycle
from rescoin.lab.lifecycle import agent_stats


def _serve_once(path: Path, answer) -> threading.Thread:
    """A one-connection UNIX-socket agent: reads the request line, writes ``answer(request)``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                request = json.loads(conn.makefile("rb").readline())
                conn.sendall(answer(request))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _reply(request: dict, **mem) -> bytes:
    reply = {"v": 1, "ts": time.time(), "nonce": request["nonce"],
             "mem": {"total_kib": 4096, "available_kib": 1024, **mem}}
    return json.dumps(reply).encode() + b"\n"


def test_agent_stats_returns_a_validated_report(tmp_path):
    sock = tmp_path / "vm.agent"
    thread = _serve_once(sock, _reply)
    report = agent_stats(sock, timeout=2.0)
    thread.join(2.0)
    assert report is not None and report.mem_total_mib == pytest.approx(4.0)
    assert lifecycle._round_mib(report) == 4


@pytest.mark.parametrize("answer", [
    lambda req: b"not json\n",
    lambda req: json.dumps({"nonce": req["nonce"], "mem": {"total_kib": 4096}}).encode() + b"\n",  # no "v"
    lambda req: _reply(req, available_kib=8192),                      # available > total: a lie
    lambda req: json.dumps([1, 2]).encode() + b"\n",
])
def test_agent_stats_rejects_a_malformed_reply(tmp_path, answer):
    """The old lab client took any JSON object; a reply the daemon would reject now counts as no answer."""
    sock = tmp_path / "vm.agent"
    thread = _serve_once(sock, answer)
    assert agent_stats(sock, timeout=1.0) is None
    thread.join(2.0)


def test_agent_stats_without_a_socket_is_none_at_once(tmp_path):
    t0 = time.monotonic()
    assert agent_stats(tmp_path / "missing.agent", timeout=5.0) is None
    assert time.monotonic() - t0 < 1.0
    assert lifecycle._round_mib(None) is None
