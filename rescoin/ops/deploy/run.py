"""Deploy to many guests in parallel, and the result table."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

from rescoin.ops.deploy.guest import HostResult, _Guest
from rescoin.ops.deploy.targets import (
    DEFAULT_PARALLEL,
    REMOTE_AGENT,
    HostFailure,
    RemoteFile,
    Settings,
    Target,
    bundle,
    log,
)


def deploy_host(target: Target, settings: Settings, files: list[RemoteFile]) -> HostResult:
    """Deploy to one guest. Never raises: a failure is a FAILED result with the reason."""
    import paramiko

    res = HostResult(target)
    t0 = time.monotonic()
    guest = _Guest(target, settings)
    systemd = False
    try:
        guest.connect()
        guest.check_privileges()
        guest.check_python()
        state = guest.remote_state(files)
        changed = [f for f in files if state[settings.remote(f.path)] != (f.sha256, f.mode)]
        res.changed = [f.label for f in changed]
        fresh = state[settings.remote(REMOTE_AGENT)] is None
        if changed:
            guest.upload(changed)
        systemd = guest.uses_systemd()
        guest.start(restart=bool(changed), systemd=systemd)
        try:
            report = guest.ask_tcp() if settings.transport == "tcp" else guest.ask_once()
        except HostFailure as e:
            raise HostFailure(f"{e}; agent log: {guest.why_not_running(systemd)}") from None
        res.answered = True
        res.result = "installed" if fresh else "updated" if changed else "unchanged"
        what = ("changed: " + ", ".join(res.changed) + "; agent " + ("started" if fresh else "restarted")
                if changed else "agent running")
        if report.mem_total_mib == report.mem_total_mib:  # not NaN
            what += f"; MemTotal {report.mem_total_mib:.0f} MiB"
        guest.notes.append(what)
        res.detail = "; ".join(guest.notes)
    except HostFailure as e:
        res.result, res.detail = "FAILED", "; ".join([*guest.notes, str(e)])
    except (OSError, EOFError, paramiko.SSHException) as e:  # the connection broke mid-way
        res.result, res.detail = "FAILED", "; ".join([*guest.notes, f"SSH connection lost: {e or type(e).__name__}"])
    except Exception as e:  # noqa: BLE001 - one odd guest must not stop the others
        log.debug("deploy to %s failed", target, exc_info=True)
        res.result, res.detail = "FAILED", f"unexpected error: {type(e).__name__}: {e}"
    finally:
        guest.close()
        res.seconds = time.monotonic() - t0
    return res


def deploy(targets: list[Target], settings: Settings, parallel: int = DEFAULT_PARALLEL,
           on_done: Callable[[HostResult], None] | None = None) -> list[HostResult]:
    """Deploy to every target, ``parallel`` at a time; results in the order of ``targets``."""
    files = bundle(settings)
    results: list[HostResult | None] = [None] * len(targets)
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets))),
                            thread_name_prefix="deploy") as pool:
        futures = {pool.submit(deploy_host, t, settings, files): i for i, t in enumerate(targets)}
        for fut in as_completed(futures):
            res = fut.result()
            results[futures[fut]] = res
            if on_done is not None:
                on_done(res)
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# Command line


def result_table(results: list[HostResult]):
    from rich.table import Table

    style = {"installed": "green", "updated": "green", "unchanged": "dim", "FAILED": "bold red"}
    table = Table(title="rescoin agent deploy", title_justify="left", header_style="bold")
    table.add_column("host", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("files\nchanged", justify="right")
    table.add_column("agent\nanswered")
    table.add_column("detail", overflow="fold", ratio=1)
    for r in results:
        table.add_row(str(r.target), f"[{style[r.result]}]{r.result}[/]", str(len(r.changed)),
                      "yes" if r.answered else "[red]no[/]", r.detail)
    return table
