"""Replay a trace through the production control loop, once per policy."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from rescoin.core.guard import Guard, GuardConfig
from rescoin.core.history import History
from rescoin.core.loop import ControlLoop, Step
from rescoin.core.predict import load_model
from rescoin.core.registry import POLICIES, build, recipe
from rescoin.hosts.sim import SimHost
from rescoin.hosts.simmemory import MemoryModel
from rescoin.offline.evaluate import Metrics

DEFAULT_POLICIES = tuple(POLICIES)


@dataclass(frozen=True)
class SimSettings:
    overcommit: float | Mapping[str, float] = 1.5  # one factor for all resources, or per resource
    window: int = 60
    guard: GuardConfig = GuardConfig()
    model: str | None = None  # predictor model file for the policies that use the default one
    memory: MemoryModel = field(default_factory=MemoryModel)  # the simulator's memory rules, alike for all
    weights: tuple[float, ...] | None = None  # per-VM weights, repeated over the VMs in trace order


def parse_policies(text: str | Iterable[str] | None) -> list[str]:
    """``"rescoin,static"`` -> ["rescoin", "static"], each checked (``"mom+guard"`` too)."""
    if text is None:
        return list(DEFAULT_POLICIES)
    names = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not names:
        raise ValueError("no policies given; choose from " + ", ".join(POLICIES))
    for name in names:
        recipe(name)  # raises with the list of known names
    return names


def build_loop(trace, policy_name: str, settings: SimSettings, presence=None) -> ControlLoop:
    parts = build(policy_name)
    # only the oracle is exempt from reclaim latency (it is the upper bound, bound by physics alone)
    host = SimHost(trace, overcommit=settings.overcommit, presence=presence, memory=settings.memory,
                   weights=settings.weights,
                   exempt=parts.policy.needs_truth)
    if settings.model and recipe(policy_name).default_model:
        parts = parts.with_predictor(load_model(settings.model))
    # peers run with the host's physical limits only, rescoin (and "<peer>+guard") with rescoin's guard
    return ControlLoop(host, parts, guard=Guard(settings.guard, profile=parts.guard),
                       history=History(settings.window), period=float(trace.period))


def run_policy(
    trace,
    policy_name: str,
    settings: SimSettings = SimSettings(),
    on_step: Callable[[Step], None] | None = None,
    presence=None,
) -> dict:
    """One policy over the whole trace; returns its metrics."""
    loop = build_loop(trace, policy_name, settings, presence)
    metrics = Metrics()
    for step in loop.steps():
        metrics.update(step, loop.history)
        if on_step is not None:
            on_step(step)
    return metrics.result()


def simulate(
    trace,
    policies: Iterable[str] = DEFAULT_POLICIES,
    settings: SimSettings = SimSettings(),
    on_step: Callable[[str, Step], None] | None = None,
) -> dict:
    """Every policy over the same trace, in the ``rescoin simulate --format json`` shape."""
    results: dict[str, dict] = {}
    out = {"policies": results, "trace": getattr(trace, "name", "trace"),
           "vms": int(trace.demand.shape[1]), "periods": int(trace.demand.shape[0]),
           "overcommit": settings.overcommit}
    for name in policies:
        cb = (lambda s, _n=name: on_step(_n, s)) if on_step is not None else None
        results[name] = run_policy(trace, name, settings, cb)
    return out
