"""One control step, and the daemon loop around it.

observe -> history -> predict -> policy (+ placement) -> guard -> apply.
The same code runs ``rescoin run`` on a real host and every simulation.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from rescoin.core.guard import Guard
from rescoin.core.history import History
from rescoin.core.model import Allocation, Forecast, Observation, Plan
from rescoin.core.policies import PolicyInput, entitlement
from rescoin.core.registry import Components
from rescoin.hosts.base import ApplyResult, Host, HostUnavailableError

log = logging.getLogger("rescoin.core.loop")

__all__ = ["ControlLoop", "HostUnavailableError", "Step", "Steppable", "run_daemon"]


@dataclass
class Step:
    """Everything one control step saw and did."""

    obs: Observation
    forecast: Forecast | None
    entitlement: np.ndarray
    allocation: Allocation
    plan: Plan
    result: ApplyResult
    seconds: float  # wall time the step took (observe to apply)


class ControlLoop:
    def __init__(
        self,
        host: Host,
        parts: Components,
        guard: Guard | None = None,
        history: History | None = None,
        period: float = 300.0,
    ) -> None:
        self.host = host
        self.policy = parts.policy
        self.predictor = parts.predictor
        self.placement = parts.placement
        self.guard = guard or Guard()
        self.history = history or History()
        self.period = period

    def step(self) -> Step | None:
        """Run one period; None when the host has nothing more to observe."""
        t0 = time.perf_counter()
        obs = self.host.observe()
        if obs is None:
            return None
        h = self.history
        for uuid, ledger in obs.carried.items():
            h.carry(uuid, ledger)
        h.push(obs)
        capacity = obs.host.capacity
        ent = entitlement(obs.vms.sizes, obs.vms.weight, capacity)
        forecast = self.predictor.predict(h) if self.predictor is not None else None
        # only a policy that declares it (the oracle) sees the true demand a simulator knows
        seen = obs if self.policy.needs_truth else replace(obs, truth=None, truth_next=None)
        inp = PolicyInput(obs=seen, forecast=forecast, history=h, capacity=capacity, entitlement=ent,
                          period=self.period)
        alloc = self.policy.allocate(inp).with_all_diagnostics(obs.n)
        if self.placement is not None:
            pins, width = self.placement.place(inp, self.placement.load(inp))
            alloc = alloc.with_pins(pins, width)
        plan = self.guard.plan(alloc, obs, capacity, ent)
        result = self.host.apply(plan)
        h.decide(
            forecast=forecast.value if forecast is not None else np.full_like(ent, np.nan),
            allocation=alloc.amount,
            entitlement=ent,
        )
        h.note(credit=alloc.diagnostics["credit"], ledger=alloc.diagnostics["ledger"])
        for w in self.guard.warnings:
            log.warning(w)
        self.guard.warnings.clear()
        return Step(obs, forecast, ent, alloc, plan, result, time.perf_counter() - t0)

    def steps(self, limit: int | None = None) -> Iterator[Step]:
        """Steps back to back, as fast as the host allows (simulation)."""
        done = 0
        while limit is None or done < limit:
            s = self.step()
            if s is None:
                return
            done += 1
            yield s


def run_daemon(
    loop: ControlLoop | Steppable,
    period: float | Callable[[], float],
    stop: threading.Event,
    on_step: Callable[[Step], None] | None = None,
    speed: float = 1.0,
    max_steps: int | None = None,
) -> int:
    """Step every ``period / speed`` seconds until ``stop`` is set or the host runs out.

    ``loop`` is anything with ``step()``; ``period`` may be a callable, read
    each period (a reload can change it). A failing step is logged and the
    next one goes on: one bad period never ends the daemon. Returns the
    number of steps taken.
    """
    taken = 0
    next_at = time.monotonic()
    while not stop.is_set() and (max_steps is None or taken < max_steps):
        try:
            step = loop.step()
        except HostUnavailableError as e:  # libvirtd restarting: say so, retry next period
            log.warning("%s", e)
        except Exception:  # noqa: BLE001 - the daemon must outlive a bad period
            log.exception("control step failed; continuing with the next period")
        else:
            if step is None:
                break
            taken += 1
            if on_step is not None:
                on_step(step)
        p = period() if callable(period) else period
        wait = p / speed if speed > 0 else 0.0
        next_at = max(next_at + wait, time.monotonic() - wait)  # after a long stall, do not rush to catch up
        stop.wait(max(0.0, next_at - time.monotonic()))
    return taken


class Steppable(Protocol):
    def step(self) -> Step | None: ...
