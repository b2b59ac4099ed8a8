"""NodeAgent's own logic on a simulated node with an in-memory API (the real API server is
exercised in test_agent_k8s.py)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading
from datetime import timedelta

# pytest puts this folder on sys.path; mypy, run from the repository root, cannot see it.
import pytest
from agent_helpers import cap_spec, decode_pod, lease, lock_spec, sim_node
from edpilot_agent.main import install_signal_handlers, run
from edpilot_agent.metrics import AgentCollector
from edpilot_agent.sim import SIM_WORKLOAD
from prometheus_client import CollectorRegistry, generate_latest

from edpilot.contract import ANNOTATION_BATCH_SIZE, HOLDERS_UNKNOWN, holders_known
from edpilot.models import DesiredPowerLimit, GPUNodeReportStatus
from edpilot.rollout import flag_value


def condition(status: GPUNodeReportStatus, type_: str) -> tuple[str, str]:
    c = next(c for c in status.conditions if c.type == type_)
    return c.status, c.reason


def test_reports_cumulative_energy_and_work_per_gpu_and_pod() -> None:
    node = sim_node()
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 700)
    node.agent.tick()
    first = node.kube.statuses[-1]
    for _ in range(5):
        node.clock.advance(1)
        node.agent.tick()
    last = node.kube.statuses[-1]
    assert len(node.kube.statuses) == 2  # the first report, then one interval (5 s) later
    gpu0 = last.gpus[0]
    assert gpu0.pods == ["default/llm-0"] and last.gpus[1].pods == []
    assert gpu0.energyJoules - first.gpus[0].energyJoules > 5 * gpu0.powerWatts * 0.5
    assert last.gpus[1].energyJoules > first.gpus[1].energyJoules  # an idle GPU still draws
    [work] = last.workloads
    assert work.gpuUUIDs == [node.uuid(0)] and work.healthy
    assert work.workUnits > first.workloads[0].workUnits
    assert (work.batchSize, work.quantization) == (8, "bf16")
    assert condition(last, "Ready") == ("True", "Measuring")


def test_until_its_pods_are_listed_a_report_says_the_gpus_holders_are_unknown() -> None:
    """A restarted agent ticks before its pod watch has listed anything: a report then saying that
    no pod holds any GPU made the operator drop the node's caps until the next report (found by
    tests/chaos: an operator killed in that gap left the node at its defaults early)."""
    node = sim_node()
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 450)
    listed = node.kube.pod_list
    node.kube.pods = lambda: None  # type: ignore[method-assign]
    node.agent.tick()
    unlisted = node.kube.statuses[-1]
    assert condition(unlisted, "Ready") == ("False", HOLDERS_UNKNOWN)
    assert not holders_known(unlisted.conditions) and node.limit(0) == 700
    node.kube.pods = lambda: list(listed)  # type: ignore[method-assign]
    node.clock.advance(1)
    node.agent.tick()
    listed_status = node.kube.statuses[-1]
    assert holders_known(listed_status.conditions) and listed_status.gpus[0].pods == ["default/llm-0"]
    assert node.limit(0) == 450


def test_a_fast_simulated_node_stamps_wall_clock_time_and_keeps_its_own_clock_apart() -> None:
    # At 20x, the simulated clock runs ahead of the wall clock; an API timestamp from it lies in
    # the future (kubectl shows `<invalid>`). The counters advance on the simulated clock, so
    # windows over them are measured in it: it travels in a field of its own.
    node = sim_node(speed=20.0, default_interval=5.0)
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 700)
    node.agent.tick()
    first = node.kube.statuses[-1]
    for _ in range(5):
        node.clock.advance(1)
        node.agent.tick()
    last = node.kube.statuses[-1]
    assert len(node.kube.statuses) == 2
    assert (first.time, last.time) == (node.clock.wall() - timedelta(seconds=5), node.clock.wall())
    assert first.counterTime is not None and last.counterTime is not None
    assert (last.counterTime - first.counterTime).total_seconds() == pytest.approx(100.0)
    seconds = (last.counterTime - first.counterTime).total_seconds()
    for before, after in zip(first.gpus, last.gpus, strict=True):
        watts = (after.energyJoules - before.energyJoules) / seconds
        assert 0.5 * after.powerWatts < watts < 1.5 * after.powerWatts  # physical on the simulated clock


def test_a_wall_clock_stepped_forward_is_no_window_on_the_counter_clock() -> None:
    # An NTP step moves the wall clock an hour ahead between two reads 5 s apart: `time` shows
    # the step, the counter clock (monotonic) does not, so no one-hour window is measured.
    node = sim_node(default_interval=5.0)
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 700)
    node.agent.tick()
    first = node.kube.statuses[-1]
    assert first.time == node.clock.wall() and first.counterTime == first.time
    node.clock.epoch += timedelta(hours=1)
    node.clock.advance(5)
    node.agent.tick()
    last = node.kube.statuses[-1]
    assert (last.time - first.time).total_seconds() == pytest.approx(3605.0)
    assert first.counterTime is not None and last.counterTime is not None
    assert (last.counterTime - first.counterTime).total_seconds() == pytest.approx(5.0)


def test_applies_a_cap_with_a_fresh_lease_and_reports_it_at_once() -> None:
    node = sim_node()
    node.agent.tick()
    node.clock.advance(1)
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 450)
    node.agent.tick()
    assert node.limit(0) == 450 and node.limit(1) == 700
    status = node.kube.statuses[-1]
    assert len(node.kube.statuses) == 2  # a change is reported before the interval is up
    assert status.gpus[0].enforcedLimitWatts == 450
    assert condition(status, "SpecApplied") == ("True", "Applied")
    assert node.agent.applier.counts[(node.uuid(0), "Spec", "applied")] == 1


def test_lease_expiry_restores_the_default_within_one_tick() -> None:
    node = sim_node()
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 450, lease_seconds=10)
    node.agent.tick()
    assert node.limit(0) == 450
    node.clock.advance(10)
    node.agent.tick()
    assert node.limit(0) == 450
    node.clock.advance(1)
    node.agent.tick()
    assert node.limit(0) == 700
    assert condition(node.kube.statuses[-1], "LeaseValid") == ("False", "LeaseExpired")
    # The operator comes back and renews: the cap returns.
    node.kube.spec = node.kube.spec.model_copy(update={"lease": lease(node.clock, 10)})
    node.clock.advance(1)
    node.agent.tick()
    assert node.limit(0) == 450


def test_pod_removal_restores_the_default_and_refuses_the_stale_entry() -> None:
    node = sim_node()
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 450)
    node.agent.tick()
    assert node.limit(0) == 450
    node.kube.pod_list = []
    node.clock.advance(1)
    node.agent.tick()
    assert node.limit(0) == 700
    assert condition(node.kube.statuses[-1], "SpecApplied") == ("False", "Refused")


def test_a_foreign_gpu_uuid_is_refused_and_reported() -> None:
    node = sim_node()
    spec = cap_spec(node.clock, node.uuid(0), 450)
    spec.powerLimits = [DesiredPowerLimit(gpuUUID="GPU-from-another-node", watts=300, pod="default/llm-0")]
    node.kube.spec = spec
    node.agent.tick()
    assert [node.limit(i) for i in range(2)] == [700, 700]
    status = node.kube.statuses[-1]
    assert condition(status, "SpecApplied") == ("False", "Refused")
    assert "GPU-from-another-node is not on this node" in status.conditions[2].message


def test_a_gpu_left_capped_by_a_previous_run_goes_back_to_default_on_start() -> None:
    node = sim_node()
    node.backend.set_power_limit(node.uuid(1), 300)  # what a crashed agent left behind
    node.agent.tick()  # no spec, no lease
    assert node.limit(1) == 700
    assert node.agent.applier.counts[(node.uuid(1), "NoLease", "applied")] == 1


def test_shutdown_restores_defaults_and_says_so() -> None:
    node = sim_node()
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 450)
    node.agent.tick()
    node.agent.shutdown()
    assert node.limit(0) == 700
    assert condition(node.kube.statuses[-1], "Ready") == ("False", "AgentStopped")
    assert node.kube.statuses[-1].gpus[0].enforcedLimitWatts == 700


def test_sigterm_stops_the_loop_and_restores_defaults() -> None:
    node = sim_node()
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 450, lease_seconds=3600)
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    install_signal_handlers(stop)
    capped = threading.Event()

    def terminate_once_capped() -> None:
        while node.limit(0) != 450 and not stop.is_set():
            stop.wait(0.01)
        capped.set()
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_capped)
    killer.start()
    try:
        assert run(node.agent, stop, tick_seconds=0.05) == 0
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        killer.join()
    assert capped.is_set() and stop.is_set()
    assert node.limit(0) == 700


def test_api_errors_back_off_and_never_crash() -> None:
    node = sim_node()
    node.kube.fail_writes = 4
    attempts_at = []
    for _ in range(200):
        before = node.agent.report_errors
        node.agent.tick()
        if node.agent.report_errors > before:
            attempts_at.append(node.clock.t)
        node.clock.advance(0.1)
    assert node.agent.report_errors == 4
    gaps = [b - a for a, b in itertools.pairwise(attempts_at)]
    # Exponential backoff with ±20% jitter: each gap longer than the last, the third well over
    # twice the first (a constant backoff would keep them equal).
    assert gaps == sorted(gaps) and gaps[-1] >= 2 * gaps[0]
    assert node.kube.statuses  # and it got through once the API server came back


def test_the_spec_interval_is_clamped_to_the_configured_range() -> None:
    node = sim_node(default_interval=20)
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 700, interval=3600)
    for _ in range(61):
        node.agent.tick()
        node.clock.advance(1)
    assert len(node.kube.statuses) == 4  # at 0, 20, 40 and 60 s: never longer than the default


def test_dry_run_sets_nothing_and_says_what_it_would_do() -> None:
    node = sim_node(dry_run=True)
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 450)
    for _ in range(3):
        node.agent.tick()
        node.clock.advance(1)
    assert node.limit(0) == 700
    assert node.agent.applier.counts == {(node.uuid(0), "Spec", "dry_run"): 1}
    assert condition(node.kube.statuses[-1], "SpecApplied") == ("True", "DryRun")


def test_a_simulated_workload_follows_a_hint_after_its_reload_delay() -> None:
    node = sim_node()
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 700, interval=1)
    node.agent.tick()
    node.kube.pod_list = [decode_pod(annotations={ANNOTATION_BATCH_SIZE: "32"})]
    node.clock.advance(1)
    node.agent.tick()
    assert node.agent.snapshot is not None and node.agent.snapshot.workloads[0].batchSize == 8
    node.clock.advance(3)  # longer than the 2 s reload delay
    node.agent.tick()
    node.clock.advance(1)
    node.agent.tick()
    assert node.agent.snapshot.workloads[0].batchSize == 32


def test_a_simulated_engine_runs_its_start_up_arguments_not_its_annotations() -> None:
    """An engine reads --max-num-seqs and --quantization once, at start (delivery Rollout changes
    them in the template); a live hint does not reach it."""
    pod = dataclasses.replace(
        decode_pod(annotations={ANNOTATION_BATCH_SIZE: "16"}),
        argv=("vllm", "serve", "--max-num-seqs", "32", "--quantization=fp8"),
    )
    node = sim_node(pods=[pod])
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 700, interval=1)
    node.agent.tick()
    for _ in range(4):  # longer than the 2 s reload delay
        node.clock.advance(1)
        node.agent.tick()
    assert node.agent.snapshot is not None
    (work,) = node.agent.snapshot.workloads
    assert (work.batchSize, work.quantization) == (32, "fp8")


def test_a_start_up_flag_is_read_in_both_spellings() -> None:
    assert flag_value(["--max-num-seqs=64"], "--max-num-seqs") == "64"
    assert flag_value(["x", "--max-num-seqs", "64"], "--max-num-seqs") == "64"
    assert flag_value(["--max-num-seqs"], "--max-num-seqs") is None
    assert flag_value(["--max-num-seqs-x=3"], "--max-num-seqs") is None


def test_metrics_expose_the_snapshot_with_node_gpu_and_pod_labels() -> None:
    node = sim_node()
    node.kube.spec = cap_spec(node.clock, node.uuid(0), 450)
    node.agent.tick()
    registry = CollectorRegistry()
    registry.register(
        AgentCollector("gpu-node-0", lambda: node.agent.snapshot, lambda: node.agent.applier.counts)
    )
    text = generate_latest(registry).decode()
    uuid = node.uuid(0)
    labels = f'gpu_index="0",gpu_uuid="{uuid}",namespace="default",node="gpu-node-0",pod="llm-0"'
    assert f"edpilot_gpu_power_limit_watts{{{labels}}} 450.0" in text
    for name in (
        "edpilot_gpu_energy_joules_total",
        "edpilot_gpu_power_watts",
        "edpilot_gpu_utilization_ratio",
    ):
        assert f"{name}{{{labels}}}" in text
    assert (
        'edpilot_workload_work_units_total{namespace="default",node="gpu-node-0",pod="llm-0",unit="units"}'
        in text
    )
    assert (
        f'edpilot_agent_actuations_total{{gpu_uuid="{uuid}",node="gpu-node-0",reason="Spec",result="applied"}} 1.0'
        in text
    )


# ---------------------------------------------------------------- locked SM clocks


def test_a_lock_is_applied_with_a_fresh_lease_and_reported() -> None:
    node = sim_node()
    node.agent.tick()
    node.clock.advance(1)
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 1200)
    node.agent.tick()
    assert node.locked(0) == 1200 and node.locked(1) is None
    status = node.kube.statuses[-1]
    assert len(node.kube.statuses) == 2  # a change is reported before the interval is up
    gpu0, gpu1 = status.gpus
    spec = node.backend.devices[0].spec
    assert (gpu0.minSmClockMHz, gpu0.maxSmClockMHz) == (spec.min_sm_clock_mhz, spec.max_sm_clock_mhz)
    assert (gpu0.lockedSmClockMHz, gpu1.lockedSmClockMHz) == (1200, None)
    assert condition(status, "SpecApplied") == ("True", "Applied")
    assert node.agent.applier.clock_counts[(node.uuid(0), "Spec", "applied")] == 1


def test_a_lock_is_clamped_to_the_supported_clocks_and_none_is_made_at_the_top() -> None:
    node = sim_node()
    spec = node.backend.devices[0].spec
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 1.0)
    node.agent.tick()
    assert node.locked(0) == spec.min_sm_clock_mhz
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 9999)
    node.clock.advance(1)
    node.agent.tick()
    assert node.locked(0) is None  # a ceiling above the highest clock is no lock


def test_lease_expiry_resets_the_lock_within_one_tick_and_renewal_brings_it_back() -> None:
    node = sim_node()
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 1200, lease_seconds=10)
    node.agent.tick()
    assert node.locked(0) == 1200
    node.clock.advance(10)
    node.agent.tick()
    assert node.locked(0) == 1200
    node.clock.advance(1)
    node.agent.tick()
    assert node.locked(0) is None
    assert node.kube.statuses[-1].gpus[0].lockedSmClockMHz is None
    assert node.agent.applier.clock_counts[(node.uuid(0), "LeaseExpired", "applied")] == 1
    node.kube.spec = node.kube.spec.model_copy(update={"lease": lease(node.clock, 10)})
    node.clock.advance(1)
    node.agent.tick()
    assert node.locked(0) == 1200


def test_pod_removal_resets_the_lock_and_refuses_the_stale_entry() -> None:
    node = sim_node()
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 1200)
    node.agent.tick()
    assert node.locked(0) == 1200
    node.kube.pod_list = []
    node.clock.advance(1)
    node.agent.tick()
    assert node.locked(0) is None
    assert node.agent.applier.clock_counts[(node.uuid(0), "PodGone", "applied")] == 1
    assert condition(node.kube.statuses[-1], "SpecApplied") == ("False", "Refused")


def test_a_lock_for_a_gpu_the_pod_does_not_hold_is_refused() -> None:
    node = sim_node()
    node.kube.spec = lock_spec(node.clock, node.uuid(1), 1200)  # llm-0 holds GPU 0
    node.agent.tick()
    assert node.locked(1) is None
    assert "does not hold GPU" in node.kube.statuses[-1].conditions[2].message


def test_a_lock_left_by_a_previous_run_is_reset_on_start() -> None:
    node = sim_node()
    node.backend.set_locked_sm_clock(node.uuid(1), 900)  # what a crashed agent left behind
    node.agent.tick()  # no spec, no lease
    assert node.locked(1) is None
    assert node.agent.applier.clock_counts[(node.uuid(1), "NoLease", "applied")] == 1
    node.clock.advance(1)
    node.agent.tick()
    assert sum(node.agent.applier.clock_counts.values()) == 2  # once per GPU, not every tick


def test_shutdown_resets_locks_and_says_so() -> None:
    node = sim_node()
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 1200)
    node.agent.tick()
    node.agent.shutdown()
    assert node.locked(0) is None
    assert condition(node.kube.statuses[-1], "Ready") == ("False", "AgentStopped")
    assert node.kube.statuses[-1].gpus[0].lockedSmClockMHz is None


def test_sigterm_stops_the_loop_and_resets_locks() -> None:
    node = sim_node()
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 1200, lease_seconds=3600)
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    install_signal_handlers(stop)
    locked = threading.Event()

    def terminate_once_locked() -> None:
        while node.locked(0) != 1200 and not stop.is_set():
            stop.wait(0.01)
        locked.set()
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_locked)
    killer.start()
    try:
        assert run(node.agent, stop, tick_seconds=0.05) == 0
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        killer.join()
    assert locked.is_set() and stop.is_set()
    assert node.locked(0) is None


def test_dry_run_locks_nothing_and_says_what_it_would_do() -> None:
    node = sim_node(dry_run=True)
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 1200)
    for _ in range(3):
        node.agent.tick()
        node.clock.advance(1)
    assert node.locked(0) is None
    counts = node.agent.applier.clock_counts
    assert counts[(node.uuid(0), "Spec", "dry_run")] == 1
    assert all(result == "dry_run" for _, _, result in counts)
    status = node.kube.statuses[-1]
    assert status.gpus[0].lockedSmClockMHz is None  # nothing is locked
    assert condition(status, "SpecApplied") == ("True", "DryRun")
    assert "1 clock-locked" in status.conditions[2].message


def test_a_simulated_serving_engine_runs_under_the_locked_clock() -> None:
    pod = decode_pod(annotations={SIM_WORKLOAD: "llm-serving", "sim.edpilot.io/requests-per-second": "2"})
    node = sim_node(pods=[pod])
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 900)
    node.agent.tick()
    node.clock.advance(2)
    node.agent.tick()
    engine = node.backend.jobs["default/llm-0"].engine
    assert engine is not None and engine.config.locked_clock_mhz == 900
    assert node.agent.snapshot is not None and node.agent.snapshot.gpus[0].smClockMHz <= 900
    node.agent.shutdown()
    node.clock.advance(1)
    node.backend.advance()
    assert engine.config.locked_clock_mhz is None


def test_a_simulated_decode_job_runs_under_the_locked_clock() -> None:
    """Jobs that are not serving engines (a synchronous step over the pod's GPUs) follow the lock
    too: lower clock, lower power."""
    node = sim_node()
    node.agent.tick()
    node.clock.advance(5)
    node.agent.tick()
    assert node.agent.snapshot is not None
    free = node.agent.snapshot.gpus[0]
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 900)
    node.agent.tick()
    node.clock.advance(5)
    node.agent.tick()
    locked = node.agent.snapshot.gpus[0]
    assert locked.lockedSmClockMHz == 900
    assert locked.smClockMHz <= 900 < free.smClockMHz
    assert locked.powerWatts < 0.8 * free.powerWatts


def test_metrics_expose_the_locked_clock_and_clock_actuations() -> None:
    node = sim_node()
    node.kube.spec = lock_spec(node.clock, node.uuid(0), 1200)
    node.agent.tick()
    registry = CollectorRegistry()
    registry.register(
        AgentCollector(
            "gpu-node-0",
            lambda: node.agent.snapshot,
            lambda: node.agent.applier.counts,
            lambda: node.agent.applier.clock_counts,
        )
    )
    text = generate_latest(registry).decode()
    uuid = node.uuid(0)
    labels = f'gpu_index="0",gpu_uuid="{uuid}",namespace="default",node="gpu-node-0",pod="llm-0"'
    assert f"edpilot_gpu_locked_sm_clock_mhz{{{labels}}} 1200.0" in text
    assert 'edpilot_gpu_locked_sm_clock_mhz{gpu_index="1"' not in text  # not locked: no series
    assert (
        f'edpilot_agent_clock_actuations_total{{gpu_uuid="{uuid}",node="gpu-node-0",reason="Spec",result="applied"}} 1.0'
        in text
    )
