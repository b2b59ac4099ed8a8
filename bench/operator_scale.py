"""The operator at fleet scale: the real control plane with 100, 500 and 2,000 KWOK nodes of 8
GPUs, simulated node agents in one process writing a report every 10 s per node (staggered),
50 EnergyPolicies over 10 namespaces governing 400 one-GPU pods.

For each size the agents first run until every node's report exists with a status (as when an
operator restarts on a running fleet). Then a fresh operator starts (how long until its first
decision is reported: kopf lists and indexes every object first), warms up, then runs a measured
window, reporting:
  - decision lag: a report's status write -> the operator's write carrying the decision made on
    that report (matched by the report's time, which the optimizer keeps), p50 and p99; both
    ends timed by the API server (managedFields, whole seconds), so the harness's own delays
    in this busy process do not count;
  - the operator's CPU (cores) and peak memory (VmHWM) from /proc;
  - API requests per second by verb and resource (the API server's apiserver_request_total,
    before and after; all clients, with who issues each kind in the table);
  - the harness's own health: reports written, how late its ticks ran, nodes still Ready.
Goal at 2,000 nodes: p99 lag under one report interval, under one core, under 500 MB.

The 400 pods sit on the first 100 nodes (4 per node) at every size; the other nodes report
idle GPUs, which is what the operator must also read and answer (report specs, leases).

    .venv/bin/python -m bench.operator_scale [--sizes 100,500,2000] [--measure-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
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
    machine,
    node_names,
    operator_command,
    parse_request_totals,
    policies_path,
    policy_watcher,
    ready_nodes,
    request_rates,
    state_watcher,
    summary,
    terminated_watchers,
)
from edpilot.models import GROUP, VERSION

# Who issues each kind of request in this setup (the API server does not count by client).
ISSUERS = {
    ("PATCH", "gpunodereports.edpilot.io", "status"): "agents",
    ("POST", "gpunodereports.edpilot.io", ""): "agents",
    ("PATCH", "gpunodereports.edpilot.io", ""): "operator (report spec)",
    ("PATCH", "energypolicies.edpilot.io", "status"): "operator (policy status)",
    ("PATCH", "energypolicies.edpilot.io", ""): "operator (finalizer)",
    ("APPLY", "workloadoptimizerstates.edpilot.io", ""): "operator (optimizer state)",
    ("DELETE", "workloadoptimizerstates.edpilot.io", ""): "operator (optimizer state)",
    ("PATCH", "pods", ""): "operator (hints)",
    ("POST", "events", ""): "operator, controllers",
    ("PATCH", "events", ""): "operator, controllers",
    ("PATCH", "nodes", ""): "KWOK",
    ("PATCH", "nodes", "status"): "KWOK",
    ("PUT", "nodes", "status"): "KWOK",
    ("GET", "nodes", ""): "KWOK",
    ("PUT", "leases.coordination.k8s.io", ""): "KWOK, controllers",
    ("PATCH", "leases.coordination.k8s.io", ""): "operator (its liveness Lease)",
    ("POST", "leases.coordination.k8s.io", ""): "operator (its Lease, once), KWOK (node leases)",
    ("WATCH", "leases.coordination.k8s.io", ""): "agents (the operator's Lease), bench",
    ("PUT", "pods", "status"): "KWOK",
    ("WATCH", "gpunodereports.edpilot.io", ""): "operator, bench",
}


def setup_workloads(api: Api, policies: int, pods: int, namespaces: int, pod_nodes: list[str]) -> None:
    per_ns = policies // namespaces
    for n in range(namespaces):
        ensure_namespace(api, f"scale-{n}")
    pod_bodies = []
    for i in range(pods):
        policy = i % policies
        ns = f"scale-{policy // per_ns}"
        pod_bodies.append(
            (
                f"/api/v1/namespaces/{ns}/pods",
                gpu_pod(ns, f"w{i}", pod_nodes[i % len(pod_nodes)], {"app": f"p{policy}"}),
            )
        )
    create_all(api, pod_bodies)
    create_all(
        api,
        [
            (
                policies_path(f"scale-{j // per_ns}"),
                cap_policy(f"scale-{j // per_ns}", f"p{j}", {"app": f"p{j}"}),
            )
            for j in range(policies)
        ],
    )


def measure(
    api: Api,
    cp: ControlPlane,
    fleet: Fleet,
    size: int,
    warmup: float,
    seconds: float,
    operator_args: list[str],
    startup_timeout: float,
    steady_seconds: float,
    converge_timeout: float,
) -> dict[str, Any]:
    procs = Processes(logs=cp.dir / f"logs-{size}")
    lag = DecisionLag(fleet.writes)
    watcher = policy_watcher(api, lag.on_event).start()
    states = state_watcher(api, lag.on_event).start()
    operator = procs.start("operator", operator_command(cp.kubeconfig, *operator_args))
    probe = ProcessProbe(operator.pid, period=2.0).start()
    try:
        # kopf first lists and indexes every pod, policy and report; the warm-up starts at the
        # operator's first decision, and how long that took is a result of its own.
        first_decision = lag.wait_for_first(startup_timeout)
        time.sleep(warmup)
        fleet.stats.reset()
        writes_before = fleet.writes.count
        window = measure_window(api, probe, seconds)
        writes_after = fleet.writes.count
        peak, rss_end = probe.memory_mb("VmHWM"), probe.memory_mb("VmRSS")
        lags = lag.between(window.start_wall, window.start_wall + window.seconds)
        steady = measure_steady(api, probe, steady_seconds, converge_timeout) if steady_seconds > 0 else None
        alive = operator.poll() is None
    finally:
        probe.stop()
        watcher.stop()
        states.stop()
        procs.stop_all()
    log = cp.dir / f"logs-{size}" / "operator.log"
    log_lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return {
        "nodes": size,
        "measured_seconds": window.seconds,
        "operator_alive": alive,
        "decision_lag_s": summary(lags),
        "decision_lags_unmatched": lag.unmatched,
        "operator_cpu_cores": window.cpu_cores,
        "operator_peak_rss_mb": peak,
        "operator_rss_mb_at_end": rss_end,
        "operator_first_decision_s": first_decision,
        "reports_per_second": (writes_after - writes_before) / window.seconds,
        "report_write_errors": fleet.writes.errors,
        "harness_tick_lateness_s": summary(fleet.stats.lateness),
        "nodes_ready": ready_nodes(api),
        "apiserver_terminated_watchers": window.watchers_cut_off,
        "bench_watches_cut_off": {
            "energypolicies": watcher.cut_off,
            "gpunodereports": fleet.reports.cut_off,
            "pods": fleet.pods.watcher.cut_off,
        },
        "requests_per_second": window.requests,
        "steady": steady,
        "operator_errors_logged": sum(1 for line in log_lines if " ERROR " in line),
        "operator_log_tail": log_lines[-10:],
    }


def workload_phases(api: Api) -> dict[str, int]:
    """How many workloads of every policy's status are in each phase."""
    phases: dict[str, int] = {}
    for policy in api.ok("GET", f"/apis/{GROUP}/{VERSION}/energypolicies")["items"]:
        for row in (policy.get("status") or {}).get("workloads") or []:
            phases[row.get("phase", "?")] = phases.get(row.get("phase", "?"), 0) + 1
    return phases


def measure_steady(api: Api, probe: ProcessProbe, seconds: float, timeout: float) -> dict[str, Any]:
    """Once every workload has converged (or `timeout` passed): the operator's API writes and CPU
    over `seconds`, the steady state a fleet spends most of its time in."""
    began = time.monotonic()
    phases = workload_phases(api)
    while set(phases) - {"Converged"} and time.monotonic() - began < timeout:
        time.sleep(10.0)
        phases = workload_phases(api)
    waited = time.monotonic() - began
    window = measure_window(api, probe, seconds)
    return {
        "waited_for_convergence_s": waited,
        "phases_at_start": phases,
        "measured_seconds": window.seconds,
        "operator_cpu_cores": window.cpu_cores,
        "requests_per_second": window.requests,
    }


@dataclass(frozen=True)
class Window:
    start_wall: float
    seconds: float
    cpu_cores: float  # the operator's
    requests: list[dict[str, Any]]  # API requests per second by kind, all clients (`rows_of`)
    watchers_cut_off: dict[str, float]  # watchers the API server terminated as too slow, by resource


def measure_window(api: Api, probe: ProcessProbe, seconds: float) -> Window:
    """The API server's request rates and the operator's CPU over the next `seconds`."""
    metrics_before, cpu_before = api.text("/metrics"), probe.cpu_seconds()
    start_wall, start = time.time(), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    metrics_after, cpu_after = api.text("/metrics"), probe.cpu_seconds()
    rates = request_rates(parse_request_totals(metrics_before), parse_request_totals(metrics_after), elapsed)
    cpu_cores = (cpu_after - cpu_before) / elapsed
    cut_off = terminated_watchers(metrics_before, metrics_after)
    return Window(start_wall, elapsed, cpu_cores, rows_of(rates), cut_off)


def rows_of(rates: dict[tuple[str, str, str], float]) -> list[dict[str, Any]]:
    return [
        {
            "verb": v,
            "resource": r,
            "subresource": s,
            "per_second": round(x, 2),
            "issued_by": ISSUERS.get((v, r, s), ""),
        }
        for (v, r, s), x in rates.items()
    ]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,500,2000", help="node counts, ascending, comma-separated")
    p.add_argument("--policies", type=int, default=50)
    p.add_argument("--pods", type=int, default=400)
    p.add_argument("--namespaces", type=int, default=10)
    p.add_argument("--report-interval", type=float, default=10.0)
    p.add_argument("--warmup-seconds", type=float, default=40.0)
    p.add_argument("--measure-seconds", type=float, default=60.0)
    p.add_argument(
        "--steady-seconds",
        type=float,
        default=60.0,
        help="after the measured window, wait until every workload has converged, then count the "
        "operator's API writes over this long (0: skip)",
    )
    p.add_argument("--converge-timeout", type=float, default=900.0, help="longest wait for convergence")
    p.add_argument(
        "--startup-timeout", type=float, default=240.0, help="longest wait for the operator's first decision"
    )
    p.add_argument(
        "--report-every-tick",
        action="store_true",
        help="agents report at every tick whatever the spec asks (the worst case; by default they "
        "follow the spec's interval, fast only while something on the node explores)",
    )
    p.add_argument("--operator-arg", action="append", default=[], help="extra operator flag (repeatable)")
    p.add_argument("--name", default="operator_scale", help="results file stem")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.monotonic()
    result: dict[str, Any] = {**machine(), "args": vars(args), "sizes": []}
    cp = ControlPlane.start()
    fleet: Fleet | None = None
    try:
        api = Api(cp.kubeconfig)
        fleet = Fleet(api, interval=args.report_interval, follow_spec=not args.report_every_tick)
        for i, size in enumerate(sizes):
            try:
                setup = cp.grow(api, size)
                if i == 0:
                    setup_workloads(
                        api, args.policies, args.pods, args.namespaces, node_names(min(size, 100))
                    )
                    fleet.start_watches()
                fleet.stop()
                fleet.add_nodes(node_names(size))
                fleet.start()
                reported, settle = fleet.wait_reported(args.startup_timeout)
                row = measure(
                    api,
                    cp,
                    fleet,
                    size,
                    args.warmup_seconds,
                    args.measure_seconds,
                    args.operator_arg,
                    args.startup_timeout,
                    args.steady_seconds if size == sizes[-1] else 0.0,
                    args.converge_timeout,
                )
            except Exception as exc:  # a size this machine cannot carry is a result too
                result["failed"] = {"nodes": size, "error": f"{type(exc).__name__}: {exc}"[:1000]}
                break
            row["node_setup_seconds"] = setup
            row["reports_before_operator"] = reported
            row["fleet_settle_seconds"] = settle
            result["sizes"].append(row)
            print(
                json.dumps(
                    {k: v for k, v in row.items() if k not in ("requests_per_second", "operator_log_tail")}
                ),
                flush=True,
            )
    finally:
        if fleet is not None:
            fleet.shutdown()
        cp.stop()
    result["total_seconds"] = time.monotonic() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    return 0


WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE")


def writes_per_node_minute(size: dict[str, Any], issuer: str) -> float:
    """API writes per node per minute by the clients whose name starts with `issuer` (events,
    which controllers write too, count as the operator's: an upper bound)."""
    per_second = sum(
        float(q["per_second"])
        for q in size["requests_per_second"]
        if q["verb"] in WRITE_VERBS and q["issued_by"].startswith(issuer)
    )
    return 60.0 * per_second / int(size["nodes"])


def cpu_per_report_ms(size: dict[str, Any], smaller: dict[str, Any] | None) -> float | None:
    """The operator's CPU per report the agents wrote: its work grows with reports. Measured as
    the marginal cost against the next smaller size where there is one (the policies' own work
    is the same at every size), else as the plain ratio (an upper bound)."""
    reports, cpu = float(size["reports_per_second"]), float(size["operator_cpu_cores"])
    if smaller is not None and reports > smaller["reports_per_second"]:
        extra_cpu = cpu - float(smaller["operator_cpu_cores"])
        return 1000.0 * max(extra_cpu, 0.0) / (reports - float(smaller["reports_per_second"]))
    return 1000.0 * cpu / reports if reports > 0 else None


def cores_at(size: dict[str, Any], smaller: dict[str, Any] | None, nodes: int) -> float | None:
    """The operator's CPU extrapolated to `nodes` at the same reports per node."""
    per_report = cpu_per_report_ms(size, smaller)
    if per_report is None:
        return None
    more_reports = float(size["reports_per_second"]) * (nodes / int(size["nodes"]) - 1.0)
    return float(size["operator_cpu_cores"]) + per_report / 1000.0 * more_reports


def _f(value: Any, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def render(r: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = r["sizes"]
    interval = r["args"]["report_interval"]
    head = "| | " + " | ".join(f"{s['nodes']} nodes" for s in rows) + " |"
    rule = "|---|" + "---|" * len(rows)

    def line(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    first = rows[0]
    lines = [
        f"# Operator at fleet scale ({r['args']['policies']} policies, {r['args']['pods']} GPU pods)",
        "",
        f"{r['date']}, {r['machine']}, {r['cpus']} CPUs shared with the control plane, KWOK, the simulated "
        f"agents and other work (load average at start {r['load_average_at_start'][0]:.2f}), Python "
        f"{r['python']}, edpilot {r['edpilot']} ({r.get('commit', '?')}). Produced by `python -m bench.operator_scale` in "
        f"{r['total_seconds'] / 60:.1f} min. Agents: real `NodeAgent`s with the simulated backend in one "
        "process; one shared pod watch and one report watch feed every node's view and writes share one "
        f"connection pool. Each node ticks every {interval:.0f} s, staggered, and "
        + (
            "reports at every tick. "
            if r["args"].get("report_every_tick", True)
            else "ticks and reports at its report spec's interval instead when that is longer (fast "
            "only while something on the node explores, as a real agent reports). "
        )
        + "Operator flags: "
        f"{' '.join(r['args']['operator_arg']) or 'defaults'}. Each size: the agents run until every node has reported, then a fresh operator, "
        f"{r['args']['warmup_seconds']:.0f} s warm-up, {r['args']['measure_seconds']:.0f} s measured. "
        "Decision lag: from a report's write to the write of the decision on it, both as the API "
        "server timed them (managedFields, whole seconds).",
        "",
        head,
        rule,
        line("decision lag p50 (s)", [_f(s["decision_lag_s"]["p50"]) for s in rows]),
        line("decision lag p99 (s)", [_f(s["decision_lag_s"]["p99"]) for s in rows]),
        line("decisions measured", [str(s["decision_lag_s"]["count"]) for s in rows]),
        line("operator CPU (cores)", [_f(s["operator_cpu_cores"]) for s in rows]),
        line("operator peak RSS (MB)", [_f(s["operator_peak_rss_mb"], ".0f") for s in rows]),
        line("operator RSS at the end (MB)", [_f(s["operator_rss_mb_at_end"], ".0f") for s in rows]),
        line(
            "operator start to first decision (s)",
            [
                _f(s["operator_first_decision_s"], ".0f") if s["operator_first_decision_s"] else "none"
                for s in rows
            ],
        ),
        line(
            "CPU vs first size",
            [_f(s["operator_cpu_cores"] / max(first["operator_cpu_cores"], 1e-9), ".1f") + "x" for s in rows],
        ),
        line("nodes vs first size", [_f(s["nodes"] / first["nodes"], ".0f") + "x" for s in rows]),
        line(
            "operator CPU per 1,000 nodes (cores)",
            [_f(1000 * s["operator_cpu_cores"] / s["nodes"]) for s in rows],
        ),
        line("reports written / s", [_f(s["reports_per_second"], ".1f") for s in rows]),
        line(
            "operator CPU per report, marginal (ms)",
            [_f(cpu_per_report_ms(s, rows[i - 1] if i else None), ".1f") for i, s in enumerate(rows)],
        ),
        line(
            "operator cores extrapolated to 10,000 nodes",
            [_f(cores_at(s, rows[i - 1] if i else None, 10_000)) for i, s in enumerate(rows)],
        ),
        line("operator API writes / node / min", [_f(writes_per_node_minute(s, "operator")) for s in rows]),
        line("agents' API writes / node / min", [_f(writes_per_node_minute(s, "agents")) for s in rows]),
        line("harness tick lateness p99 (s)", [_f(s["harness_tick_lateness_s"]["p99"]) for s in rows]),
        line("nodes Ready", [f"{s['nodes_ready']}/{s['nodes']}" for s in rows]),
        line(
            "operator alive / errors logged",
            [f"{s['operator_alive']} / {s['operator_errors_logged']}" for s in rows],
        ),
        line(
            "watchers the API server cut off as too slow",
            [
                ", ".join(f"{k}: {v:.0f}" for k, v in s["apiserver_terminated_watchers"].items()) or "0"
                for s in rows
            ],
        ),
        line("node setup (s)", [_f(s["node_setup_seconds"], ".0f") for s in rows]),
        line(
            "reports before the operator started",
            [f"{s.get('reports_before_operator', '-')}/{s['nodes']}" for s in rows],
        ),
    ]
    if "failed" in r:
        lines += ["", f"The {r['failed']['nodes']}-node run did not complete: {r['failed']['error']}"]
    largest = rows[-1]
    lag99 = largest["decision_lag_s"]["p99"]
    lines += [
        "",
        f"Goal at {largest['nodes']} nodes: p99 lag under {interval:.0f} s: "
        f"{'met' if lag99 is not None and lag99 < interval else 'NOT met'} ({_f(lag99)} s); under one core: "
        f"{'met' if largest['operator_cpu_cores'] < 1 else 'NOT met'} ({largest['operator_cpu_cores']:.2f}); "
        f"under 500 MB: {'met' if largest['operator_peak_rss_mb'] < 500 else 'NOT met'} "
        f"({largest['operator_peak_rss_mb']:.0f} MB).",
    ]
    lines += steady_lines(largest)
    lines += [
        "",
        "API requests per second by verb and resource (all clients):",
        "",
        "| verb | resource | subresource | issued by | "
        + " | ".join(f"{s['nodes']} nodes" for s in rows)
        + " |",
        "|---|---|---|---|" + "---|" * len(rows),
    ]
    kinds: dict[tuple[str, str, str], str] = {}
    for s in rows:
        for q in s["requests_per_second"]:
            kinds.setdefault((q["verb"], q["resource"], q["subresource"]), q["issued_by"])
    ordered = sorted(kinds, key=lambda k: -max(_rate(s, k) for s in rows))
    for k in ordered[:18]:
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} | {kinds[k]} | "
            + " | ".join(_f(_rate(s, k), ".1f") for s in rows)
            + " |"
        )
    return "\n".join(lines) + "\n"


def steady_lines(size: dict[str, Any]) -> list[str]:
    steady = size.get("steady")
    if not steady:
        return []
    phases = ", ".join(f"{n} {phase}" for phase, n in sorted(steady["phases_at_start"].items()))
    converged = set(steady["phases_at_start"]) <= {"Converged"}
    as_size = {"nodes": size["nodes"], "requests_per_second": steady["requests_per_second"]}
    per_node = writes_per_node_minute(as_size, "operator")
    writes = [
        q
        for q in steady["requests_per_second"]
        if q["verb"] in WRITE_VERBS and q["issued_by"].startswith("operator")
    ]
    return [
        "",
        f"Steady state at {size['nodes']} nodes: {steady['waited_for_convergence_s']:.0f} s after the measured "
        f"window, the workloads were {phases}"
        + ("" if converged else " (the wait timed out: not every workload had converged)")
        + f". Over the next {steady['measured_seconds']:.0f} s the operator made "
        f"{per_node:.3f} API writes per node per minute (goal: at most 1: "
        f"{'met' if converged and per_node <= 1 else 'NOT met' if converged else 'not measured'}) and used "
        f"{steady['operator_cpu_cores']:.2f} cores. Its writes per second: "
        + (
            ", ".join(
                f"{q['verb']} {q['resource']} {q['subresource']}".rstrip() + f" {q['per_second']:.2f}"
                for q in writes
            )
            or "none"
        )
        + ".",
    ]


def _rate(size: dict[str, Any], key: tuple[str, str, str]) -> float:
    for q in size["requests_per_second"]:
        if (q["verb"], q["resource"], q["subresource"]) == key:
            return float(q["per_second"])
    return 0.0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
