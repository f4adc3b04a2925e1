"""A real trace slice replayed through the real service over the in-memory bus, in lockstep with a
pure model (decide() acting on a second simulated scheduler and a dict of node powers): at every
tick the service decides exactly what the pure function predicts, so the tables, the views, the
commands under way and the pool's events add nothing to and take nothing from the policy."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from itertools import islice
from pathlib import Path

from autogrow_kit import START, harness, node_ids, simulated

from services.autogrow.billing import BillingRules
from services.autogrow.cluster import NodePower, SimulatedCluster
from services.autogrow.policy import Decision, PolicySettings, PoolNodeView, decide
from services.autogrow.settings import AutogrowSettings
from services.autogrow.simulated import SimulatedScheduler
from services.autogrow.swf import SwfJob, bundled_trace, open_swf
from shared.clock import ManualClock
from shared.events import PowerOff, PowerOn, PowerState

NODES = 12
CORES = 8
BOOT = 60.0
TICK = 30.0


def trace_slice() -> list[SwfJob]:
    """Nine SDSC-SP2 jobs submitted within half an hour (1 to 16 processors, 40 s to 37 min),
    moved to start at second 0."""
    with open_swf(bundled_trace("SDSC-SP2-1998-4.2-cln.first-2000-jobs.swf.gz")) as reader:
        jobs = list(islice(reader, 40))
    first = jobs[0].submit
    picked = [j for j in jobs if 18_600 <= j.submit - first <= 20_400 and j.run_time <= 2_400]
    start = picked[0].submit
    return [j._replace(submit=j.submit - start) for j in picked]


class PureModel:
    """decide() acting directly: the pool answers at once, drains and resumes are immediate."""

    def __init__(self, jobs: list[SwfJob], names: list[str], clock: ManualClock) -> None:
        self.clock = clock
        self.sched = SimulatedScheduler(jobs, clock, nodes=names, cores_per_node=CORES)
        self.cluster = SimulatedCluster(self.sched, None, clock, boot_seconds=BOOT)  # type: ignore[arg-type]
        self.pool = {
            f"n{i:02d}": PoolNodeView(f"n{i:02d}", name, PowerState.STOPPED, START)
            for i, name in enumerate(names, start=1)
        }
        self.on = 0
        self.off = 0

    def step(self, policy: PolicySettings) -> Decision:
        now = self.clock.now()
        power = [NodePower(v.scheduler_name, v.power, v.since) for v in self.pool.values()]
        self.cluster.follow(power, now)
        decision = decide(
            self.sched.take_snapshot(), list(self.pool.values()), BillingRules(), now, policy
        )
        for action in decision.resume:
            self.sched.resume_nodes([action.scheduler_name])
            self._set(action.node_id, drain_requested=False)
        for action in decision.drain:
            self.sched.drain_nodes([action.scheduler_name])
            self._set(action.node_id, drain_requested=True)
        for action in decision.power_on:
            self._set(action.node_id, power=PowerState.RUNNING, since=now)
        for action in decision.power_off:
            self._set(action.node_id, power=PowerState.STOPPED, since=now)
        self.on += len(decision.power_on)
        self.off += len(decision.power_off)
        return decision

    def _set(self, node_id: str, **changes: object) -> None:
        self.pool[node_id] = replace(self.pool[node_id], **changes)  # type: ignore[arg-type]


async def test_the_service_decides_what_the_pure_function_predicts(tmp_path: Path) -> None:
    jobs = trace_slice()
    assert len(jobs) == 9
    names = [f"node{i:03d}" for i in range(1, NODES + 1)]
    policy = PolicySettings(cores_per_node=CORES, idle_seconds=300, boot_timeout_seconds=600)
    settings = AutogrowSettings(scheduler="simulated", poll_interval=TICK, policy=policy)
    clock = ManualClock(START)
    model = PureModel(jobs, names, clock)
    async with harness(
        tmp_path, settings, clock=clock, jobs=jobs, nodes=names, boot_seconds=BOOT
    ) as h:
        for i, name in enumerate(names, start=1):
            await h.pool.provision(f"n{i:02d}", name, at=START)
        await h.settle()
        ticks = 0
        while not (
            simulated(h).done and all(v.power is PowerState.STOPPED for v in model.pool.values())
        ):
            await h.autogrow.watcher.poll()
            decided = await h.autogrow.decider.step()
            predicted = model.step(policy)
            assert decided == predicted, f"at {clock.now() - START}"
            await h.settle()
            clock.advance(TICK)
            ticks += 1
            assert ticks < 1000, "the replay does not end"
        commands = await h.commands()
        service_jobs = simulated(h).jobs

    assert all(job.end is not None and job.interruptions == 0 for job in service_jobs)
    assert [j.start for j in service_jobs] == [j.start for j in model.sched.jobs]
    assert len(node_ids(commands, PowerOn)) == model.on > 0
    assert len(node_ids(commands, PowerOff)) == model.off == model.on
    print(
        f"{len(jobs)} jobs, {ticks} ticks of {TICK:.0f} s ({timedelta(seconds=ticks * TICK)}), "
        f"{model.on} power-ons"
    )
