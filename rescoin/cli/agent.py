"""``rescoin agent ...``: the argparse side of :mod:`rescoin.ops.deploy`.

Usage errors are raised as :class:`~rescoin.ops.deploy.DeployError`; ``rescoin.cli.dispatch``
prints them (``rescoin: error: ...``) and exits 2, as for every other command.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from rescoin.ops.deploy import (
    DEFAULT_AGENT_KEY,
    DEFAULT_LISTEN,
    DEFAULT_PARALLEL,
    DEFAULT_TIMEOUT,
    GLOBAL_KNOWN_HOSTS,
    REMOTE_AGENT,
    REMOTE_DEFAULTS,
    REMOTE_INIT,
    REMOTE_KEY,
    REMOTE_UNIT,
    DeployError,
    HostResult,
    Settings,
    bundle,
    deploy,
    ensure_agent_key,
    load_private_key,
    parse_listen,
    parse_target,
    read_inventory,
    result_table,
)

_SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9._/-]*")


def _settings_from(args: argparse.Namespace) -> Settings:
    if args.parallel < 1:
        raise DeployError("--parallel must be at least 1")
    if not args.timeout > 0:
        raise DeployError("--timeout must be positive")
    remote_root = ""
    if args.remote_root:
        remote_root = args.remote_root.rstrip("/")
        if not _SAFE_PATH_RE.fullmatch(args.remote_root) or not remote_root:
            raise DeployError("--remote-root must be an absolute path of letters, digits and ._/-")
    settings = Settings(transport=args.transport, timeout=args.timeout, remote_root=remote_root,
                        accept_new_host_keys=args.accept_new_host_keys)
    if args.known_hosts:
        settings.known_hosts = Path(args.known_hosts).expanduser()
    else:
        settings.system_known_hosts = GLOBAL_KNOWN_HOSTS
    if args.transport == "tcp":
        settings.listen = parse_listen(args.listen)
    if args.key:
        settings.pkey = load_private_key(Path(args.key).expanduser())
    elif not os.environ.get("SSH_AUTH_SOCK") and not any(
            Path(f"~/.ssh/id_{kind}").expanduser().is_file() for kind in ("rsa", "ecdsa", "ed25519")):
        raise DeployError("no SSH key: give --key PATH, or start an ssh-agent with your key (ssh-add)")
    if args.transport == "tcp":  # last: a usage error above leaves no new key file behind
        key_file = Path(args.agent_key_file).expanduser()
        existed = key_file.exists()
        settings.agent_key = ensure_agent_key(key_file)
        if not existed:
            print(f"rescoin: made a new agent key in {key_file} (mode 0600); the host scheduler "
                  f"needs the same file to check the agents' replies", file=sys.stderr)
    return settings


def _cmd_deploy(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rescoin.view import progress

    targets = [parse_target(t) for t in args.targets]
    if args.inventory:
        targets += [t for t in read_inventory(args.inventory) if t not in targets]
    if not targets:
        raise DeployError("no guests: give user@host[:port] arguments or --inventory FILE")
    if len(set(targets)) != len(targets):
        raise DeployError("a guest is listed twice")
    settings = _settings_from(args)
    bundle(settings)  # fail early if the agent files are missing
    paramiko_log = logging.getLogger("paramiko")
    saved_level = paramiko_log.level
    if not getattr(args, "verbose", False):
        paramiko_log.setLevel(logging.CRITICAL)  # its failures go into the result table instead
    try:
        with progress() as bar:  # stderr, and only on a terminal
            task = bar.add_task("deploying", total=len(targets))

            def done(r: HostResult) -> None:
                bar.update(task, advance=1, description=f"deploying ({r.target}: {r.result})")

            results = deploy(targets, settings, parallel=args.parallel, on_done=done)
    finally:
        paramiko_log.setLevel(saved_level)
    out = Console()
    out.print(result_table(results))
    failed = sum(not r.ok for r in results)
    out.print(f"{len(results)} guest(s): {len(results) - failed} ok, {failed} FAILED" if failed
              else f"{len(results)} guest(s): all ok")
    return 1 if failed else 0


def add_agent_parser(subparsers) -> None:
    """Add ``agent deploy`` to an argparse sub-parser set (``func``: args -> exit code)."""
    agent = subparsers.add_parser(
        "agent", help="manage the rescoin guest agent inside guests",
        description="Manage the rescoin guest agent (guest_agent/rescoin_agent.py) inside guests.")
    actions = agent.add_subparsers(dest="agent_action", metavar="ACTION")
    agent.set_defaults(func=lambda _args: (agent.print_help(sys.stderr), 2)[1])

    d = actions.add_parser(
        "deploy", help="install or update the agent in guests over SSH (paramiko), then check it answers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Install or update the rescoin guest agent in guests over SSH and SFTP, start it\n"
                    "(systemd, else the init script) and check that it answers.\n\n"
                    "Host keys are checked against known_hosts: an unknown host is refused unless\n"
                    "--accept-new-host-keys; a changed host key is always refused. Only files whose\n"
                    "SHA-256 or mode differ are uploaded, and the agent is restarted only then.\n"
                    "Needs root on the guest (log in as root, or a user with NOPASSWD sudo) and\n"
                    "python3 >= 3.6.",
        epilog=f"files installed in each guest:\n"
               f"  {REMOTE_AGENT} (0755), {REMOTE_UNIT},\n"
               f"  {REMOTE_INIT} (0755), {REMOTE_DEFAULTS},\n"
               f"  {REMOTE_KEY} (0600, tcp only)\n\n"
               f"exit status: 0 if every guest succeeded, 1 if any failed, 2 on usage errors")
    d.add_argument("targets", nargs="*", metavar="user@guest[:port]", help="guests to deploy to")
    d.add_argument("--inventory", metavar="FILE",
                   help="file with one user@host[:port] per line (# comments and blank lines allowed)")
    d.add_argument("--transport", choices=("tcp", "virtio"), default="tcp",
                   help="how the host will talk to the agent: tcp (signed replies, key installed) or "
                        "virtio (virtio-serial, no key) (default tcp)")
    d.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, metavar="N",
                   help=f"guests at once (default {DEFAULT_PARALLEL})")
    d.add_argument("--key", metavar="PATH",
                   help="SSH private key (an encrypted key's passphrase is asked on the terminal); "
                        "the ssh-agent is used too. Default: the ssh-agent and ~/.ssh/id_*")
    d.add_argument("--accept-new-host-keys", action="store_true",
                   help="accept and record the host key of guests not in known_hosts yet "
                        "(a changed key is still refused)")
    d.add_argument("--known-hosts", metavar="PATH",
                   help="known_hosts file (default ~/.ssh/known_hosts, plus /etc/ssh/ssh_known_hosts)")
    d.add_argument("--agent-key-file", metavar="PATH", default=str(DEFAULT_AGENT_KEY),
                   help=f"shared HMAC key for the tcp transport on this host; made once (mode 0600) if "
                        f"missing (default {DEFAULT_AGENT_KEY})")
    d.add_argument("--listen", metavar="ADDR:PORT", default=DEFAULT_LISTEN,
                   help=f"where the agent listens in the guest with the tcp transport (default {DEFAULT_LISTEN})")
    d.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds for connecting, for each remote step and for the agent to answer "
                        f"(default {DEFAULT_TIMEOUT:g})")
    d.add_argument("--remote-root", metavar="DIR", help=argparse.SUPPRESS)  # tests only
    d.set_defaults(func=_cmd_deploy)
