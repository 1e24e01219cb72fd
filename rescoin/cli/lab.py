"""``rescoin lab up|down|status|image``: argparse and output of the lab (rescoin.lab does the work)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from rescoin.errors import RescoinError
from rescoin.lab import (
    AGENT_TIMEOUT,
    DEFAULT_URI,
    IMAGE_DIR,
    LOG_DIR,
    SCENARIOS,
    SOCKET_DIR,
    build_image,
    lab_down,
    lab_status,
    lab_up,
)
from rescoin.lab.lifecycle import check_scenario


def _stderr(msg: str) -> None:
    """Progress lines go to stderr, so stdout stays the result."""
    print(f"rescoin lab: {msg}", file=sys.stderr, flush=True)


def _cli(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a RescoinError as one line and return its exit code (the lab itself only raises)."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except RescoinError as e:
            print(f"rescoin: error: {e}", file=sys.stderr)
            return e.exit_code
    return run


def cmd_up(args: argparse.Namespace) -> int:
    check_scenario(args.scenario)
    t0 = time.monotonic()
    names = lab_up(args.vms, args.scenario, args.uri, args.memory, args.max_memory, args.vcpus,
                   wait_agent=not args.no_wait, progress=_stderr, timeout=args.timeout, agent=args.agent)
    print(f"lab up in {time.monotonic() - t0:.1f} s: {' '.join(names)}")
    print(f"agent sockets: {SOCKET_DIR}/<name>.agent   console logs: {LOG_DIR}/<name>.console.log")
    print("remove with: rescoin lab down")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    n = lab_down(args.uri)
    print(f"removed {n} lab VM(s)" if n else "no lab VMs")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = lab_status(args.uri)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no lab VMs (start them with: rescoin lab up)")
        return 0
    head = f"{'NAME':<16} {'STATE':<10} {'VCPUS':>5} {'MEM MiB':>12} {'GUEST MiB':>9}  {'AGENT':<5}  LOAD"
    print(head)
    for r in rows:
        guest = "-" if r["agent_mem_total_mib"] is None else str(r["agent_mem_total_mib"])
        print(f"{r['name']:<16} {r['state']:<10} {r['vcpus']:>5} {r['memory_mib']:>5}/{r['max_memory_mib']:<6} "
              f"{guest:>9}  {'ok' if r['agent'] else '-':<5}  {r['load']}")
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    image = build_image(agent=args.agent, force=args.force, refresh=args.refresh, progress=_stderr)
    m = image.manifest
    print(f"kernel {image.kernel} ({m['kernel_version']})")
    print(f"initrd {image.initrd} ({m['initrd_bytes'] / 2**20:.1f} MiB)")
    print(f"done in {time.monotonic() - t0:.2f} s")
    return 0


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from rescoin.lab import cluster

    t0 = time.monotonic()
    state = cluster.cluster_up(args.hosts, args.vms, memory_mib=args.memory, max_memory_mib=args.max_memory,
                               loads=args.load or None, progress=_stderr)
    print(f"lab cluster up in {time.monotonic() - t0:.1f} s")
    for h in state["hosts"]:
        print(f"{h['name']:<12} {h['addr']:<10} {h['uri']}")
    print(f"balance with: rescoin balance plan --hosts {','.join(h['uri'] for h in state['hosts'])}")
    print("remove with: rescoin lab cluster down")
    return 0


def cmd_cluster_down(_args: argparse.Namespace) -> int:
    from rescoin.lab import cluster

    t0 = time.monotonic()
    n = cluster.cluster_down()
    print(f"removed {n} lab host(s) in {time.monotonic() - t0:.1f} s" if n else "no lab cluster is up")
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from rescoin.lab import cluster

    rows = cluster.cluster_status()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no lab cluster is up (start it with: rescoin lab cluster up)")
        return 0
    for h in rows:
        print(f"{h['name']} {h['addr']} {'up' if h['up'] else 'DOWN'}  {h['uri']}")
        for v in h["vms"]:
            print(f"  {v['name']:<16} {'running' if v['running'] else 'stopped':<8} {v['memory_mib']:>5} MiB"
                  f"  {'persistent' if v['persistent'] else 'transient'}")
    return 0


def _add_cluster_parser(actions) -> None:
    cl = actions.add_parser("cluster", help="two real libvirt hosts on this machine (namespaces, own daemons)",
                            description="Two libvirt hosts on this one machine, each in network, mount, uts "
                                        "and cgroup namespaces of its own with its own libvirtd and virtlogd "
                                        "(10.77.0.1 and 10.77.0.2), for live migration tests.")
    sub = cl.add_subparsers(dest="cluster_action", metavar="ACTION")
    cl.set_defaults(func=lambda _args: (cl.print_help(sys.stderr), 2)[1])
    up = sub.add_parser("up", help="start the lab hosts and N guests on the first")
    up.add_argument("--hosts", type=int, default=2, help="how many hosts (2)")
    up.add_argument("--vms", type=int, default=0, help="guests to start on the first host (default 0)")
    up.add_argument("--memory", type=int, default=256, metavar="MiB", help="initial balloon size (default 256)")
    up.add_argument("--max-memory", type=int, default=384, metavar="MiB", help="maximum memory (default 384)")
    up.add_argument("--load", action="append", metavar="SPEC", help="load of guest i (repeat; default idle)")
    up.set_defaults(func=_cli(cmd_cluster_up))
    down = sub.add_parser("down", help="remove every namespace, daemon, cgroup and file the lab cluster made")
    down.set_defaults(func=_cli(cmd_cluster_down))
    st = sub.add_parser("status", help="the lab hosts and their VMs")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_cli(cmd_cluster_status))


def add_lab_parser(subparsers) -> None:
    """Add ``lab up|down|status|image`` to an argparse sub-parser set; each
    action sets ``func`` (args -> exit code; errors print one line and give 2)."""
    scenarios = "; ".join(f"{k}: {' / '.join(v)}" for k, v in SCENARIOS.items())
    lab = subparsers.add_parser(
        "lab", help="real tiny QEMU guests under libvirt with the guest agent inside",
        description="Run a few tiny software-emulated QEMU guests under libvirt (qemu:///system), each "
                    "with the rescoin guest agent and a load generator inside. Needs root and a running "
                    "libvirtd: see scripts/setup-host.")
    actions = lab.add_subparsers(dest="lab_action", metavar="ACTION")
    lab.set_defaults(func=lambda _args: (lab.print_help(sys.stderr), 2)[1])

    def uri(p: argparse.ArgumentParser) -> None:
        p.add_argument("--uri", default=DEFAULT_URI, help=f"libvirt connection URI (default {DEFAULT_URI})")

    up = actions.add_parser("up", help="build the guest image if needed, start the lab VMs, wait for their agents",
                            description="Start lab VMs rescoin-lab-0..N-1 (lab VMs left from before are "
                                        "removed first) and wait until every guest agent answers. "
                                        f"Scenarios (load of VM i = entry i mod length): {scenarios}.")
    up.add_argument("--vms", type=int, default=3, help="how many VMs (default 3)")
    up.add_argument("--scenario", default="mixed", metavar="NAME",
                    help=f"load scenario: {', '.join(SCENARIOS)} (default mixed)")
    uri(up)
    up.add_argument("--memory", type=int, default=256, metavar="MiB", help="initial balloon size (default 256)")
    up.add_argument("--max-memory", type=int, default=384, metavar="MiB", help="maximum memory (default 384)")
    up.add_argument("--vcpus", type=int, default=1, help="vCPUs per VM (default 1)")
    up.add_argument("--timeout", type=float, default=AGENT_TIMEOUT,
                    help=f"seconds to wait for the agents (default {AGENT_TIMEOUT:.0f})")
    up.add_argument("--no-wait", action="store_true", help="do not wait for the agents to answer")
    up.add_argument("--agent", metavar="PATH", help=argparse.SUPPRESS)
    up.set_defaults(func=_cli(cmd_up))

    down = actions.add_parser("down", help="destroy and undefine every lab VM, remove disks and sockets",
                              description="Destroy and undefine every rescoin-lab-* domain and remove their "
                                          "disks and agent sockets. Safe to run again.")
    uri(down)
    down.set_defaults(func=_cli(cmd_down))

    status = actions.add_parser("status", help="list the lab VMs, their memory and whether their agents answer",
                                description="One line per lab VM: state, vCPUs, balloon/max memory, the "
                                            "guest's MemTotal as its agent reports it, and its load.")
    uri(status)
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=_cli(cmd_status))

    image = actions.add_parser("image", help="build (or show the cached) guest kernel and initramfs",
                               description=f"Build the guest image into {IMAGE_DIR}/<key>/ from Debian "
                                           "packages (apt-get download); cached by a hash of its inputs.")
    image.add_argument("--force", action="store_true", help="rebuild even if cached")
    image.add_argument("--refresh", action="store_true",
                       help="ask apt again for the newest kernel and Python packages")
    image.add_argument("--agent", metavar="PATH", help="guest agent script to put in the image "
                                                       "(default guest_agent/rescoin_agent.py)")
    image.set_defaults(func=_cli(cmd_image))
    _add_cluster_parser(actions)
