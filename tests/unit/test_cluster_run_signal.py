"""``rescoin balance run`` under a supervisor: SIGTERM ends it cleanly (libvirt's test driver, no daemon)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("libvirt")


def test_sigterm_stops_balance_run_with_exit_0_and_no_traceback():
    p = subprocess.Popen([sys.executable, "-m", "rescoin", "balance", "run", "--hosts", "test:///default",
                          "--interval", "0.5", "--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)
        assert p.poll() is None, f"balance run ended by itself: {p.communicate()}"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "Traceback" not in out
