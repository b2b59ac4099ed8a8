"""`edpilot report`: what each policy did for each workload, as a table and, with --plot, figures.

It reads either the EnergyPolicies of the current kubeconfig (their status rows) with their
WorkloadOptimizerStates (each workload's optimizer state, which holds every explored configuration) or the output of `edpilot simulate --json`, turns both
into one `PolicyReport` form, and prints baseline and current J/unit and EDP, slowdown, cap, batch
size, profile, phase and energy saved (kWh, and money and CO2 when given a price and a grid carbon
intensity). `--plot DIR` writes, per workload, the explored configurations on the objective
against power cap, batch size and precision with the chosen one marked, and the energy saved over
time. An edge module: it does I/O (the API server, files, the clock).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edpilot.contract import STATE_PLURAL, StoredState, WorkloadFigures, states_of, stored_state
from edpilot.models import GROUP, VERSION, Measurement, WorkloadStatus
from edpilot.optimizer import OptimizerState, Probe, load_state
from edpilot.simulate import Figures as SimFigures
from edpilot.simulate import FleetResult, WorkloadResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

JOULES_PER_KWH = 3.6e6
EXPLORED_PANELS = ("power cap", "batch size", "precision")


# ---------------------------------------------------------------- one form for both sources


class Point(BaseModel):
    """One explored configuration and what it measured."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    quantization: str | None = None
    batchSize: int | None = None
    capWatts: float | None = None  # the highest member's cap; None when unknown
    objective: float | None = None
    unitsPerSecond: float | None = None
    failed: str | None = None


class WorkloadRow(WorkloadFigures):
    """A workload's status figures (the one status row model) and what the report adds to them."""

    name: str
    gpus: int = 0
    explored: list[Point] = Field(default_factory=list)
    chosen: Point | None = None
    baselineObjective: float | None = None
    savings: list[tuple[float, float]] = Field(
        default_factory=list
    )  # (seconds since the first reading, joules saved)


class PolicyReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    namespace: str
    name: str
    objective: str
    conditions: dict[str, str] = {}  # type -> status
    gpus: int = 0
    energySavedJoules: float = 0.0
    averageEdpReductionPercent: float | None = None
    workloads: list[WorkloadRow] = []

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Progress:
    """Counts through a long operation on stderr, so a large fleet does not look hung."""

    def __init__(self, what: str, total: int, out: TextIO | None) -> None:
        self.what, self.total, self.out, self.done = what, total, out, 0

    def step(self, item: str) -> None:
        self.done += 1
        if self.out is not None:
            print(f"[{self.done}/{self.total}] {self.what} {item}", file=self.out, flush=True)


# ---------------------------------------------------------------- from `edpilot simulate --json`


def _sim_measurement(f: SimFigures | None) -> Measurement | None:
    if f is None:
        return None
    return Measurement(
        joulesPerUnit=f.joulesPerUnit,
        secondsPerUnit=f.secondsPerUnit,
        edp=f.edp,
        unitsPerSecond=f.unitsPerSecond,
    )


def _highest(caps: Iterable[float | None]) -> float | None:
    known = [c for c in caps if c is not None]
    return max(known) if known else None


def _sim_row(w: WorkloadResult) -> WorkloadRow:
    explored = [
        Point(
            stage=p.stage,
            quantization=p.quantization,
            batchSize=p.batchSize,
            capWatts=_highest(p.capWatts.values()),
            objective=p.objective,
            unitsPerSecond=p.unitsPerSecond,
            failed=p.failed,
        )
        for p in w.explored
    ]
    chosen: Point | None = None
    if w.final is not None:
        # The kept configuration is one of the probes (its metrics are the incumbent's), or the baseline.
        chosen = next((p for p in explored if p.failed is None and p.objective == w.final.objective), None)
        if chosen is None and w.baseline is not None and w.final.objective == w.baseline.objective:
            chosen = Point(stage="baseline", capWatts=w.defaultCapWatts, objective=w.baseline.objective)
    return WorkloadRow(
        name=w.name,
        phase=w.phase,
        gpus=w.gpus,
        baseline=_sim_measurement(w.baseline),
        current=_sim_measurement(w.final),
        edpReductionPercent=w.edpReductionPercent,
        slowdownPercent=w.slowdownPercent,
        powerCapWatts=_highest(w.capWatts.values()),
        smClockMHz=_highest(w.smClockMHz.values()),
        batchSize=w.batchSize,
        quantization=w.quantization,
        energySavedJoules=w.energySavedJoules,
        probes=w.probes,
        explored=explored,
        chosen=chosen,
        baselineObjective=w.baseline.objective if w.baseline else None,
        savings=list(w.energySavedSeries),
    )


def from_simulation(result: FleetResult) -> list[PolicyReport]:
    """The simulated fleet as one report group (each simulated workload carries its own policy)."""
    rows = [_sim_row(w) for w in result.workloads]
    reductions = [r.edpReductionPercent for r in rows if r.edpReductionPercent is not None]
    objectives = sorted({w.objective for w in result.workloads})
    return [
        PolicyReport(
            namespace="simulate",
            name=f"seed-{result.seed}",
            objective="/".join(objectives),
            gpus=sum(r.gpus for r in rows),
            energySavedJoules=sum(r.energySavedJoules for r in rows),
            averageEdpReductionPercent=sum(reductions) / len(reductions) if reductions else None,
            workloads=rows,
        )
    ]


# ---------------------------------------------------------------- from EnergyPolicy objects


def _probe_point(probe: Probe, baseline_cap: float | None) -> Point:
    cfg = probe.config
    cap = _highest([cfg.capWatts, *cfg.memberCaps.values()])
    return Point(
        stage=probe.stage,
        quantization=cfg.quantization,
        batchSize=cfg.batchSize,
        capWatts=cap if cap is not None else baseline_cap,
        objective=probe.metrics.objective if probe.metrics else None,
        unitsPerSecond=probe.metrics.unitsPerSecond if probe.metrics else None,
        failed=probe.failed,
    )


def _policy_row(
    row: WorkloadStatus,
    default_caps: Mapping[str, float],
    warn: TextIO | None,
    stored: Mapping[str, Any] | None = None,
) -> WorkloadRow:
    # Probes without a cap ran at the baseline cap: the default limit of the pods' GPUs.
    baseline_cap = _highest(default_caps.get(pod) for pod in row.pods)
    state: OptimizerState | None = None
    body = stored if stored is not None else row.optimizer  # the row's: not migrated yet
    if body:
        try:
            state = load_state(body)
        except ValueError as exc:  # unreadable, or written by a newer optimizer (StateTooNew)
            if warn is not None:
                print(
                    f"warning: {row.name}: optimizer state unreadable, no explored points: {exc}", file=warn
                )
    explored = [_probe_point(p, baseline_cap) for p in state.probes] if state else []
    incumbent = state.incumbent if state else None
    return WorkloadRow(
        **row.model_dump(include=set(WorkloadFigures.model_fields)),
        name=row.name,
        gpus=row.gpus,
        explored=explored,
        chosen=_probe_point(incumbent, baseline_cap) if incumbent else None,
        baselineObjective=state.baseline.metrics.objective
        if state and state.baseline and state.baseline.metrics
        else None,
    )


def from_policies(
    policies: Sequence[Mapping[str, Any]],
    default_caps: Mapping[str, float] | None = None,
    progress: TextIO | None = None,
    states: Iterable[Mapping[str, Any]] = (),
) -> list[PolicyReport]:
    """Reports of EnergyPolicy objects as the API server returns them. `default_caps` maps
    "namespace/pod" to its GPUs' default power limit (from GPUNodeReports); `states` are the
    WorkloadOptimizerState objects of those policies' namespaces."""
    caps = default_caps or {}
    by_policy: dict[str, list[StoredState]] = {}
    for obj in states:
        meta = obj.get("metadata") or {}
        found = stored_state(str(meta.get("name", "")), obj.get("spec") or {})
        if found is not None:
            by_policy.setdefault(f"{meta.get('namespace', '')}/{found.policy}", []).append(found)
    counter = Progress("reading EnergyPolicy", len(policies), progress)
    out = []
    for obj in policies:
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        counter.step(f"{namespace}/{name}")
        status = obj.get("status") or {}
        held = states_of(by_policy.get(f"{namespace}/{name}", []), name)
        rows = []
        for raw in status.get("workloads") or []:
            try:
                row = WorkloadStatus.model_validate(raw)
                rows.append(_policy_row(row, caps, progress, held.get(row.name)))
            except ValidationError as exc:
                if progress is not None:
                    print(f"warning: {namespace}/{name}: a workload row is unreadable: {exc}", file=progress)
        totals = status.get("totals") or {}
        out.append(
            PolicyReport(
                namespace=namespace,
                name=name,
                objective=str((obj.get("spec") or {}).get("objective", "EDP")),
                conditions={str(c.get("type")): str(c.get("status")) for c in status.get("conditions") or []},
                gpus=int(totals.get("gpus", 0)),
                energySavedJoules=float(totals.get("energySavedJoules", 0.0)),
                averageEdpReductionPercent=totals.get("averageEdpReductionPercent"),
                workloads=rows,
            )
        )
    return out


def default_caps_from_reports(reports: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """namespace/pod -> the highest default power limit of the GPUs it holds."""
    caps: dict[str, float] = {}
    for report in reports:
        for gpu in (report.get("status") or {}).get("gpus") or []:
            for pod in gpu.get("pods") or []:
                caps[pod] = max(caps.get(pod, 0.0), float(gpu.get("defaultLimitWatts", 0.0)))
    return caps


def read_cluster(
    kubeconfig: str | None, context: str | None, namespace: str | None, progress: TextIO | None
) -> list[PolicyReport]:
    from kubernetes import client, config

    api: client.ApiClient
    if kubeconfig or context or not _in_cluster():
        api = config.new_client_from_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        api = client.ApiClient()
    objects = client.CustomObjectsApi(api)
    if progress is not None:
        print("listing EnergyPolicies, their states and GPUNodeReports ...", file=progress, flush=True)
    if namespace:
        listed = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, "energypolicies")
        held = objects.list_namespaced_custom_object(GROUP, VERSION, namespace, STATE_PLURAL)
    else:
        listed = objects.list_cluster_custom_object(GROUP, VERSION, "energypolicies")
        held = objects.list_cluster_custom_object(GROUP, VERSION, STATE_PLURAL)
    policies = cast(dict[str, Any], listed)
    states = cast(dict[str, Any], held)["items"]
    reports = cast(dict[str, Any], objects.list_cluster_custom_object(GROUP, VERSION, "gpunodereports"))
    items = sorted(policies["items"], key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))
    return from_policies(items, default_caps_from_reports(reports["items"]), progress, states)


def _in_cluster() -> bool:
    return Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()


# ---------------------------------------------------------------- savings history (cluster mode)


def append_history(path: Path, reports: Sequence[PolicyReport], now: datetime) -> None:
    """Append this reading's energy saved per workload; later runs plot savings over time from it."""
    with path.open("a") as f:
        for policy in reports:
            for w in policy.workloads:
                record = {
                    "time": now.isoformat(),
                    "policy": policy.key,
                    "workload": w.name,
                    "energySavedJoules": w.energySavedJoules,
                }
                f.write(json.dumps(record) + "\n")


def apply_history(path: Path, reports: Sequence[PolicyReport]) -> None:
    """Fill each workload's savings series from the readings in `path`."""
    series: dict[tuple[str, str], list[tuple[datetime, float]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            series.setdefault((r["policy"], r["workload"]), []).append(
                (datetime.fromisoformat(r["time"]), float(r["energySavedJoules"]))
            )
    starts = [t for points in series.values() for t, _ in points]
    if not starts:
        return
    start = min(starts)
    for policy in reports:
        for w in policy.workloads:
            points = sorted(series.get((policy.key, w.name), []))
            w.savings = [((t - start).total_seconds(), j) for t, j in points]


# ---------------------------------------------------------------- the table


def _num(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


class Prices(BaseModel):
    perKwh: float | None = None
    currency: str = "USD"
    gramsCo2PerKwh: float | None = None

    def cost(self, joules: float) -> float | None:
        return None if self.perKwh is None else joules / JOULES_PER_KWH * self.perKwh

    def co2_kg(self, joules: float) -> float | None:
        return None if self.gramsCo2PerKwh is None else joules / JOULES_PER_KWH * self.gramsCo2PerKwh / 1000


COLUMNS = (
    ("workload", "<"),
    ("phase", "<"),
    ("J/unit-base", ">"),
    ("J/unit-now", ">"),
    ("EDP-base", ">"),
    ("EDP-now", ">"),
    ("EDP-red-%", ">"),
    ("slowdown-%", ">"),
    ("cap-W", ">"),
    ("batch", ">"),
    ("profile", ">"),
    ("probes", ">"),
    ("saved-kWh", ">"),
)


def _cells(w: WorkloadRow, prices: Prices) -> list[str]:
    b, c = w.baseline, w.current
    cells = [
        w.name,
        w.phase,
        _num(b.joulesPerUnit if b else None),
        _num(c.joulesPerUnit if c else None),
        _num(b.edp if b else None),
        _num(c.edp if c else None),
        _num(w.edpReductionPercent, ".1f"),
        _num(w.slowdownPercent, ".1f"),
        _num(w.powerCapWatts, ".0f"),
        _num(w.batchSize, "d"),
        w.quantization or "-",
        str(w.probes),
        _num(w.energySavedJoules / JOULES_PER_KWH),
    ]
    if prices.perKwh is not None:
        cells.append(_num(prices.cost(w.energySavedJoules)))
    if prices.gramsCo2PerKwh is not None:
        cells.append(_num(prices.co2_kg(w.energySavedJoules)))
    return cells


def _money(joules: float, prices: Prices) -> str:
    extra = []
    cost, co2 = prices.cost(joules), prices.co2_kg(joules)
    if cost is not None:
        extra.append(f"{cost:.4g} {prices.currency}")
    if co2 is not None:
        extra.append(f"{co2:.4g} kg CO2e")
    return f" ({', '.join(extra)})" if extra else ""


def table(reports: Sequence[PolicyReport], prices: Prices) -> str:
    head = [name for name, _ in COLUMNS]
    align = [a for _, a in COLUMNS]
    if prices.perKwh is not None:
        head.append(f"saved-{prices.currency}")
        align.append(">")
    if prices.gramsCo2PerKwh is not None:
        head.append("saved-kgCO2e")
        align.append(">")
    lines: list[str] = []
    total = 0.0
    for policy in reports:
        total += policy.energySavedJoules
        conditions = " ".join(f"{t}={s}" for t, s in sorted(policy.conditions.items()))
        lines.append(
            f"EnergyPolicy {policy.key}  objective={policy.objective}  workloads={len(policy.workloads)}  "
            f"gpus={policy.gpus}  avg-EDP-red={_num(policy.averageEdpReductionPercent, '.1f')}%  "
            f"saved={policy.energySavedJoules / JOULES_PER_KWH:.4g} kWh{_money(policy.energySavedJoules, prices)}"
            + (f"  {conditions}" if conditions else "")
        )
        rows = [head, *(_cells(w, prices) for w in policy.workloads)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for r in rows:
            lines.append(
                "  " + " ".join(f"{cell:{a}{width}}" for cell, a, width in zip(r, align, widths, strict=True))
            )
        for w in policy.workloads:
            if w.message and w.phase != "Converged":
                lines.append(f"  {w.name}: {w.message}")
        lines.append("")
    lines.append(f"total energy saved: {total / JOULES_PER_KWH:.4g} kWh{_money(total, prices)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


def _series_counts(fig: Figure) -> dict[str, int]:
    """Drawn series per panel: the artists that carry a legend label."""
    counts: dict[str, int] = {}
    for ax in fig.axes:
        handles, _ = ax.get_legend_handles_labels()
        counts[str(ax.get_label())] = len(handles)
    return counts


def _panel(ax: Axes, w: WorkloadRow, objective: str, attr: str, title: str) -> None:
    ax.set_label(title)
    ax.set_title(f"{objective} against {title}")
    points = [p for p in w.explored if p.objective is not None and getattr(p, attr) is not None]
    ys: dict[int, float] = {id(p): p.objective for p in points if p.objective is not None}
    kept = [p for p in points if p.failed is None]
    rejected = [p for p in points if p.failed is not None]
    categorical = attr == "quantization"
    for profile in sorted({str(p.quantization) for p in kept}):
        mine = [p for p in kept if str(p.quantization) == profile]
        ax.plot([getattr(p, attr) for p in mine], [ys[id(p)] for p in mine], "o", label=profile, alpha=0.8)
    if rejected:
        ax.plot(
            [getattr(p, attr) for p in rejected],
            [ys[id(p)] for p in rejected],
            "x",
            color="grey",
            label="rejected",
        )
    chosen = w.chosen
    if chosen is not None and chosen.objective is not None and getattr(chosen, attr) is not None:
        ax.plot(
            [getattr(chosen, attr)],
            [chosen.objective],
            "*",
            markersize=16,
            color="crimson",
            markeredgecolor="black",
            label="chosen",
        )
    if w.baselineObjective is not None:
        ax.axhline(w.baselineObjective, linestyle="--", color="black", linewidth=1, label="baseline")
    if not points:
        ax.text(0.5, 0.5, "not explored", ha="center", va="center", transform=ax.transAxes, color="grey")
    if attr == "batchSize" and points:
        ax.set_xscale("log", base=2)
    values = [*ys.values(), *([w.baselineObjective] if w.baselineObjective else [])]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel({"capWatts": "power cap (W)", "batchSize": "batch size", "quantization": "precision"}[attr])
    ax.set_ylabel(f"{objective} per unit")
    if not categorical:
        ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def explored_figure(policy: PolicyReport, w: WorkloadRow) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, attr, title in zip(axes, ("capWatts", "batchSize", "quantization"), EXPLORED_PANELS, strict=True):
        _panel(ax, w, policy.objective, attr, title)
    fig.suptitle(f"{policy.key} / {w.name}: explored configurations ({w.phase})")
    return fig


def savings_figure(reports: Sequence[PolicyReport]) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    ax.set_label("energy saved")
    for policy in reports:
        for w in policy.workloads:
            if w.savings:
                ax.plot(
                    [t / 3600 for t, _ in w.savings],
                    [j / JOULES_PER_KWH for _, j in w.savings],
                    marker="." if len(w.savings) < 20 else None,
                    label=f"{policy.name}/{w.name}"
                    if policy.namespace == "simulate"
                    else f"{policy.key}/{w.name}",
                )
    if not ax.get_legend_handles_labels()[0]:
        ax.text(0.5, 0.5, "no readings yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("time (h)")
    ax.set_ylabel("energy saved (kWh)")
    ax.set_title("Energy saved against each workload's baseline")
    ax.grid(True, alpha=0.3)
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig: Figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    counts = _series_counts(fig)
    fig.savefig(
        path, format="png", dpi=90, metadata={"Software": "edpilot report", "Series": json.dumps(counts)}
    )


def write_plots(reports: Sequence[PolicyReport], out_dir: Path, progress: TextIO | None = None) -> list[Path]:
    """Write one explored-configurations PNG per workload and one energy-saved PNG; returns the paths.
    Each PNG carries a `Series` text chunk: the drawn series per panel."""
    out_dir.mkdir(parents=True, exist_ok=True)
    workloads = [(p, w) for p in reports for w in p.workloads]
    counter = Progress("plotting", len(workloads) + 1, progress)
    paths = []
    for policy, w in workloads:
        counter.step(f"{policy.key}/{w.name}")
        path = out_dir / f"{_safe(policy.namespace)}--{_safe(policy.name)}--{_safe(w.name)}--explored.png"
        _save(explored_figure(policy, w), path)
        paths.append(path)
    counter.step("energy saved over time")
    path = out_dir / "energy-saved.png"
    _save(savings_figure(reports), path)
    paths.append(path)
    return paths


# ---------------------------------------------------------------- the command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="edpilot report", description=__doc__.splitlines()[0])
    p.add_argument(
        "--from-simulation",
        metavar="FILE",
        help="read `edpilot simulate --json` output (- for stdin) instead of the cluster",
    )
    p.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, ~/.kube/config, in-cluster")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("-n", "--namespace", default=None, help="only this namespace (default: all)")
    p.add_argument("--price", type=float, default=None, metavar="PER_KWH", help="energy price per kWh")
    p.add_argument("--currency", default="USD", help="currency of --price (default USD)")
    p.add_argument(
        "--carbon-intensity",
        type=float,
        default=None,
        metavar="G_PER_KWH",
        help="grid carbon intensity in g CO2e per kWh",
    )
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="write PNG figures into DIR")
    p.add_argument(
        "--history",
        type=Path,
        default=None,
        metavar="FILE",
        help="cluster mode: append this reading to FILE and plot energy saved over time from it",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    if args.price is not None and args.price < 0:
        p.error("--price must not be negative")
    if args.carbon_intensity is not None and args.carbon_intensity < 0:
        p.error("--carbon-intensity must not be negative")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    progress = None if args.quiet else sys.stderr
    if args.from_simulation:
        text = sys.stdin.read() if args.from_simulation == "-" else Path(args.from_simulation).read_text()
        try:
            reports = from_simulation(FleetResult.model_validate_json(text))
        except ValidationError as exc:
            print(
                f"edpilot report: {args.from_simulation} is not `edpilot simulate --json` output: {exc}",
                file=sys.stderr,
            )
            return 2
    else:
        try:
            reports = read_cluster(args.kubeconfig, args.context, args.namespace, progress)
        except Exception as exc:  # the client raises many kinds; a person needs the message
            print(f"edpilot report: cannot read EnergyPolicies: {exc}", file=sys.stderr)
            return 1
        if args.history is not None:
            append_history(args.history, reports, datetime.now(UTC))
            apply_history(args.history, reports)
        else:
            # Without a history, one reading: the savings figure shows where each workload stands.
            for policy in reports:
                for w in policy.workloads:
                    w.savings = [(0.0, w.energySavedJoules)]
    prices = Prices(perKwh=args.price, currency=args.currency, gramsCo2PerKwh=args.carbon_intensity)
    if args.json:
        json.dump([r.model_dump(mode="json") for r in reports], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(table(reports, prices))
    if args.plot is not None:
        paths = write_plots(reports, args.plot, progress)
        if progress is not None:
            print(f"wrote {len(paths)} figures to {args.plot}", file=progress)
    return 0
