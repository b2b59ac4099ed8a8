"""Load and soak: 500 KWOK GPU nodes with simulated agents reporting every 10 s, the operator
under policy churn (100 policies created, 100 updated and 100 deleted a minute) for 15 minutes.

Reports the operator's memory slope (MB/min, least squares after a warm-up), its CPU, how long
it takes to react to each create/update/delete (its policy watch plus its timer) and to each
report (decision lag) minute by minute, whether any watch fell behind for good, and whether every
remaining policy's status is right at the end (rows match the pods it governs, generation, Ready,
and no hints left on pods of deleted policies).

Churn: slot k (of --slots) owns --pods-per-slot pods labelled slot=s<k>. Every minute each slot
creates policy s<k>-c<cycle>, updates it 20 s later (maxSlowdownPercent 10 -> 15) and deletes
it 40 s later. In the last cycle the even slots keep their policy, so the end state has both
live policies and released pods to check.

    .venv/bin/python -m bench.soak [--minutes 15] [--nodes 500]
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edpilot_operator.localrun import Processes

from bench.fleet import (
    RESULTS,
    Api,
    ControlPlane,
    DecisionLag,
    Fleet,
    ProcessProbe,
    cap_policy,
    create_all,
    ensure_namespace,
    gpu_pod,
    linear_slope,
    machine,
    node_names,
    operator_command,
    parse_request_totals,
    policies_path,
    policy_status_problems,
    policy_watcher,
    ready_nodes,
    request_rates,
    state_watcher,
    summary,
    terminated_watchers,
)

CYCLE_SECONDS = 60.0
UPDATE_AFTER = 20.0
DELETE_AFTER = 40.0


@dataclass
class Churn:
    """Policy writes and the operator's first visible reaction to each."""

    api: Api
    namespaces: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (policy key, "g<generation>" | "deleted") -> wall time
    written: dict[tuple[str, str], float] = field(default_factory=dict)
    reacted: dict[tuple[str, str], float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=lambda: {"create": 0, "update": 0, "delete": 0})

    def namespace(self, slot: int) -> str:
        return f"soak-{slot % self.namespaces}"

    def on_event(self, kind: str, obj: dict[str, Any], received: float) -> None:
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        observed = (obj.get("status") or {}).get("observedGeneration")
        with self.lock:
            if kind == "DELETED":
                self.reacted.setdefault((key, "deleted"), received)
            elif isinstance(observed, int):
                for g in range(1, observed + 1):
                    self.reacted.setdefault((key, f"g{g}"), received)

    def act(self, op: str, slot: int, cycle: int) -> None:
        ns, name = self.namespace(slot), f"s{slot}-c{cycle}"
        key = f"{ns}/{name}"
        path = policies_path(ns)
        if op == "create":
            code, payload = self.api.request("POST", path, cap_policy(ns, name, {"slot": f"s{slot}"}))
            what = "g1"
        elif op == "update":
            code, payload = self.api.request(
                "PATCH",
                f"{path}/{name}",
                {"spec": {"maxSlowdownPercent": 15}},
                "application/merge-patch+json",
            )
            what = f"g{payload.get('metadata', {}).get('generation', 2)}" if code < 300 else "g2"
        else:
            code, payload = self.api.request("DELETE", f"{path}/{name}")
            what = "deleted"
        done = time.time()
        with self.lock:
            if code >= 300:
                self.errors.append(f"{op} {key}: {code} {str(payload)[:200]}")
                return
            self.ops[op] += 1
            self.written[(key, what)] = done

    def lags(self, start: float, end: float, op: str | None = None) -> tuple[list[float], int]:
        """Reaction lags of writes made in [start, end) and how many got no reaction at all."""
        lags, missing = [], 0
        with self.lock:
            for (key, what), at in self.written.items():
                if not start <= at < end:
                    continue
                if op is not None and (what == "deleted") != (op == "delete"):
                    continue
                reacted = self.reacted.get((key, what))
                if reacted is None:
                    missing += 1
                else:
                    lags.append(max(0.0, reacted - at))
        return lags, missing


def schedule(slots: int, cycles: int, start: float) -> list[tuple[float, str, int, int]]:
    """(monotonic time, op, slot, cycle) of every churn write; slots spread over the minute."""
    plan = []
    for cycle in range(cycles):
        for slot in range(slots):
            t = start + cycle * CYCLE_SECONDS + slot * CYCLE_SECONDS / slots
            plan.append((t, "create", slot, cycle))
            plan.append((t + UPDATE_AFTER, "update", slot, cycle))
            if not (cycle == cycles - 1 and slot % 2 == 0):
                plan.append((t + DELETE_AFTER, "delete", slot, cycle))
    heapq.heapify(plan)
    return plan


def run_churn(churn: Churn, plan: list[tuple[float, str, int, int]], stop: threading.Event) -> None:
    while plan and not stop.is_set():
        due, op, slot, cycle = heapq.heappop(plan)
        wait = due - time.monotonic()
        if wait > 0 and stop.wait(wait):
            return
        try:
            churn.act(op, slot, cycle)
        except Exception as exc:  # a timeout under load is a result, not a crash
            with churn.lock:
                churn.errors.append(f"{op} s{slot}-c{cycle}: {exc}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=500)
    p.add_argument("--minutes", type=float, default=15.0, help="length of the churn")
    p.add_argument("--slots", type=int, default=100, help="policies created (and updated, deleted) a minute")
    p.add_argument("--pods-per-slot", type=int, default=2)
    p.add_argument("--namespaces", type=int, default=10)
    p.add_argument("--report-interval", type=float, default=10.0, help="seconds between a node's reports")
    p.add_argument("--warmup-minutes", type=float, default=3.0, help="left out of the memory slope")
    p.add_argument("--settle-seconds", type=float, default=180.0, help="longest wait for a correct end state")
    p.add_argument("--operator-arg", action="append", default=[], help="extra operator flag (repeatable)")
    p.add_argument("--name", default="soak", help="results file stem")
    args = p.parse_args(argv)

    result: dict[str, Any] = {**machine(), "args": vars(args)}
    cp = ControlPlane.start()
    procs = Processes(logs=cp.dir / "proc-logs")
    fleet: Fleet | None = None
    try:
        api = Api(cp.kubeconfig)
        result["node_setup_seconds"] = cp.grow(api, args.nodes)
        nodes = node_names(args.nodes)
        churn = Churn(api, args.namespaces)
        for n in range(args.namespaces):
            ensure_namespace(api, churn.namespace(n))
        total = args.slots * args.pods_per_slot
        pods = [
            (
                f"/api/v1/namespaces/{churn.namespace(slot)}/pods",
                gpu_pod(
                    churn.namespace(slot),
                    f"s{slot}-p{j}",
                    nodes[(slot * args.pods_per_slot + j) * args.nodes // total],
                    {"slot": f"s{slot}"},
                ),
            )
            for slot in range(args.slots)
            for j in range(args.pods_per_slot)
        ]
        create_all(api, pods)

        fleet = Fleet(api, interval=args.report_interval)
        fleet.start_watches()
        fleet.add_nodes(nodes)
        fleet.start()
        lag = DecisionLag(fleet.writes)
        watcher = policy_watcher(api, lag.on_event, churn.on_event).start()
        states = state_watcher(api, lag.on_event).start()
        operator = procs.start("operator", operator_command(cp.kubeconfig, *args.operator_arg))
        probe = ProcessProbe(operator.pid, period=5.0).start()
        metrics_before = api.text("/metrics")
        t0_wall, t0 = time.time(), time.monotonic()
        stop = threading.Event()
        cycles = max(1, round(args.minutes * 60 / CYCLE_SECONDS))
        churner = threading.Thread(
            target=run_churn, args=(churn, schedule(args.slots, cycles, t0 + 5), stop), daemon=True
        )
        churner.start()
        end_of_churn = t0 + 5 + cycles * CYCLE_SECONDS
        minutes: list[dict[str, Any]] = []
        while time.monotonic() < end_of_churn:
            minute_start = time.time()
            time.sleep(min(60.0, max(0.0, end_of_churn - time.monotonic())))
            minute_end = time.time()
            reaction, missing = churn.lags(minute_start - 60, minute_start)  # writes a minute old
            row = {
                "minute": len(minutes) + 1,
                "operator_rss_mb": probe.samples[-1][2] if probe.samples else None,
                "decision_lag_s": summary(lag.between(minute_start, minute_end)),
                "reaction_lag_s_of_previous_minute": summary(reaction),
                "unanswered_writes_of_previous_minute": missing,
                "live_operator": operator.poll() is None,
            }
            minutes.append(row)
            print(json.dumps(row), flush=True)
        churner.join(60)
        churn_wall = time.time() - t0_wall
        metrics_after = api.text("/metrics")
        cpu_churn = probe.cpu_seconds() - probe.samples[0][1]
        # The end state: wait until it is right (or the settle time is spent), then check once more.
        settle_start = time.monotonic()
        problems: list[str] = ["not checked"]
        while time.monotonic() - settle_start < args.settle_seconds:
            policies = api.ok("GET", "/apis/edpilot.io/v1alpha1/energypolicies")["items"]
            all_pods = api.ok("GET", "/api/v1/pods")["items"]
            problems = policy_status_problems(policies, all_pods)
            if not problems:
                break
            time.sleep(10)
        settled_after = time.monotonic() - settle_start
        stop.set()
        probe.stop()

        times = [(t - t0) / 60 for t, _, _ in probe.samples]
        rss = [m for _, _, m in probe.samples]
        late = [(t, m) for t, m in zip(times, rss, strict=True) if t >= args.warmup_minutes]
        all_lags, all_missing = churn.lags(0, float("inf"))
        decision = lag.between(t0_wall, t0_wall + churn_wall)
        rates = request_rates(
            parse_request_totals(metrics_before), parse_request_totals(metrics_after), churn_wall
        )
        result.update(
            {
                "nodes": args.nodes,
                "nodes_ready_at_end": ready_nodes(api),
                "pods": total,
                "churn_minutes": churn_wall / 60,
                "churn_ops": dict(churn.ops),
                "churn_errors": churn.errors[:20],
                "churn_error_count": len(churn.errors),
                "operator_alive": operator.poll() is None,
                "operator_cpu_cores": cpu_churn / churn_wall,
                "operator_rss_mb_first": rss[0] if rss else None,
                "operator_rss_mb_last": rss[-1] if rss else None,
                "operator_rss_mb_peak": probe.memory_mb("VmHWM") if operator.poll() is None else None,
                "memory_slope_mb_per_min_after_warmup": linear_slope(
                    [t for t, _ in late], [m for _, m in late]
                ),
                "memory_slope_mb_per_min_second_half": _half_slope(times, rss, args.minutes),
                "memory_samples": [[round(t, 3), round(m, 1)] for t, m in zip(times, rss, strict=True)],
                "reaction_lag_s": {
                    "create_or_update": summary(churn.lags(0, float("inf"), "create")[0]),
                    "delete": summary(churn.lags(0, float("inf"), "delete")[0]),
                },
                "reaction_lag_all_s": summary(all_lags),
                "unanswered_writes": all_missing,
                "decision_lag_s": summary(decision),
                "decision_lags_unmatched": lag.unmatched,
                "reports_written": fleet.writes.count,
                "report_write_errors": fleet.writes.errors,
                "harness_tick_lateness_s": summary(fleet.stats.lateness),
                "apiserver_terminated_watchers": terminated_watchers(metrics_before, metrics_after),
                "bench_watches_cut_off": {
                    "energypolicies": watcher.cut_off,
                    "gpunodereports": fleet.reports.cut_off,
                    "pods": fleet.pods.watcher.cut_off,
                },
                "requests_per_second": [
                    {"verb": v, "resource": r, "subresource": s, "per_second": round(x, 2)}
                    for (v, r, s), x in rates.items()
                ],
                "minutes": minutes,
                "end_state_problems": problems[:50],
                "end_state_problem_count": len(problems),
                "end_state_settled_seconds": settled_after,
            }
        )
        watcher.stop()
        states.stop()
    finally:
        if fleet is not None:
            fleet.shutdown()
        procs.stop_all()
        log = cp.dir / "proc-logs" / "operator.log"
        if log.exists():
            result["operator_log_tail"] = log.read_text(errors="replace").splitlines()[-20:]
        cp.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0 if result.get("end_state_problem_count") == 0 else 1


def _half_slope(times: list[float], rss: list[float], minutes: float) -> float | None:
    half = [(t, m) for t, m in zip(times, rss, strict=True) if t >= minutes / 2]
    return linear_slope([t for t, _ in half], [m for _, m in half])


def _f(value: Any, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def render(r: dict[str, Any]) -> str:
    rl, dl = r["reaction_lag_all_s"], r["decision_lag_s"]
    lines = [
        f"# Soak: {r['nodes']} KWOK GPU nodes, policy churn for {r['churn_minutes']:.1f} min",
        "",
        f"{r['date']}, {r['machine']}, {r['cpus']} CPUs (shared with other work; load average at start "
        f"{r['load_average_at_start'][0]:.2f}), Python {r['python']}, edpilot {r['edpilot']} ({r.get('commit', '?')}). "
        "Produced by `python -m bench.soak`. Simulated agents run in one process (one shared pod watch "
        "and one report watch feed every node's agent; writes share one connection pool), reporting "
        f"every {r['args']['report_interval']:.0f} s, staggered.",
        "",
        f"Churn: {r['churn_ops']['create']} creates, {r['churn_ops']['update']} updates, "
        f"{r['churn_ops']['delete']} deletes ({r['churn_error_count']} failed) over {r['pods']} GPU pods.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| operator memory slope after {r['args']['warmup_minutes']:g} min warm-up | "
        f"{_f(r['memory_slope_mb_per_min_after_warmup'], '+.3f')} MB/min |",
        f"| operator memory slope, second half | {_f(r['memory_slope_mb_per_min_second_half'], '+.3f')} MB/min |",
        f"| operator RSS first / last / peak | {_f(r['operator_rss_mb_first'], '.0f')} / "
        f"{_f(r['operator_rss_mb_last'], '.0f')} / {_f(r['operator_rss_mb_peak'], '.0f')} MB |",
        f"| operator CPU | {r['operator_cpu_cores']:.2f} cores |",
        f"| reaction to a policy write (create/update/delete), p50 / p99 / max | {_f(rl['p50'])} / "
        f"{_f(rl['p99'])} / {_f(rl['max'])} s (n={rl['count']}) |",
        f"| writes never answered | {r['unanswered_writes']} |",
        f"| decision lag (report written -> policy status on it), p50 / p99 / max | {_f(dl['p50'])} / "
        f"{_f(dl['p99'])} / {_f(dl['max'])} s (n={dl['count']}) |",
        "| watchers the API server cut off as too slow | "
        + (", ".join(f"{k}: {v:.0f}" for k, v in r["apiserver_terminated_watchers"].items()) or "0")
        + " (of which this bench's own watches: "
        + (", ".join(f"{k}: {v}" for k, v in r["bench_watches_cut_off"].items() if v) or "none")
        + "; every watch resumed) |",
        f"| reports written / write errors | {r['reports_written']} / {r['report_write_errors']} |",
        f"| harness tick lateness p99 | {_f(r['harness_tick_lateness_s']['p99'])} s |",
        f"| nodes Ready at the end | {r['nodes_ready_at_end']} of {r['nodes']} |",
        f"| end state | {'correct' if r['end_state_problem_count'] == 0 else str(r['end_state_problem_count']) + ' problems'}"
        f" after {r['end_state_settled_seconds']:.0f} s of settling |",
        "",
        "Minute by minute (reaction lag is of the writes made in the minute before):",
        "",
        "| minute | operator RSS (MB) | decision lag p50 / p99 (s) | reaction lag p50 / p99 (s) | unanswered |",
        "|---|---|---|---|---|",
    ]
    for m in r["minutes"]:
        d, re_ = m["decision_lag_s"], m["reaction_lag_s_of_previous_minute"]
        lines.append(
            f"| {m['minute']} | {_f(m['operator_rss_mb'], '.0f')} | {_f(d['p50'])} / {_f(d['p99'])} | "
            f"{_f(re_['p50'])} / {_f(re_['p99'])} | {m['unanswered_writes_of_previous_minute']} |"
        )
    lines += ["", "API requests per second (all clients) by verb and resource:", ""]
    lines += ["| verb | resource | subresource | per second |", "|---|---|---|---|"]
    for row in r["requests_per_second"][:15]:
        lines.append(f"| {row['verb']} | {row['resource']} | {row['subresource']} | {row['per_second']} |")
    if r["end_state_problems"]:
        lines += ["", "End-state problems (first 50):", ""] + [f"- {x}" for x in r["end_state_problems"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
