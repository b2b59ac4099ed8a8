"""`edpilot report`: its table shows the numbers of the status it read, and --plot writes valid PNGs
with the expected series, both from `edpilot simulate --json` output and from EnergyPolicies on a
real API server."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubetest import Cluster
from matplotlib.image import imread

from edpilot import report
from edpilot.contract import state_object
from edpilot.edp import Metrics
from edpilot.optimizer import Config, OptimizerState, Probe
from edpilot.simulate import run_fleet, sample_fleet

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- helpers


def png_chunks(path: Path) -> dict[str, Any]:
    """Check the PNG structure (signature, chunk CRCs, IHDR first, IEND last) and return its size
    and text chunks."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    pos, kinds, texts = 8, [], {}
    width = height = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        kinds.append(kind)
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            texts[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    return {"width": width, "height": height, "text": texts}


def table_rows(text: str) -> dict[str, list[str]]:
    """Workload rows of the printed table, by workload name, as whitespace-separated cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("  workload") and ":" not in line:
            cells = line.split()
            rows[cells[0]] = cells
    return rows


def same(cell: str, value: float | None, digits: int = 4) -> bool:
    if value is None:
        return cell == "-"
    return float(cell) == pytest.approx(value, rel=0.6 * 10 ** (1 - digits), abs=1e-12)


def expected_explored_series(
    explored: list[dict[str, Any]], chosen: dict[str, Any] | None, baseline: bool
) -> dict[str, int]:
    """Per panel: one series per precision among kept probes with a value on that axis, one for
    rejected probes, one for the chosen configuration, one for the baseline line."""
    out = {}
    for panel, key in (("power cap", "cap"), ("batch size", "batchSize"), ("precision", "quantization")):
        points = [p for p in explored if p["objective"] is not None and p[key] is not None]
        kept = {p["quantization"] for p in points if p["failed"] is None}
        rejected = any(p["failed"] is not None for p in points)
        has_chosen = chosen is not None and chosen.get(key) is not None
        out[panel] = len(kept) + int(rejected) + int(has_chosen) + int(baseline)
    return out


def distinct_colours(path: Path) -> int:
    pixels = imread(path)
    return len({tuple(px) for px in pixels.reshape(-1, pixels.shape[-1])[::7].tolist()})


# ---------------------------------------------------------------- from `edpilot simulate --json`


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    result = run_fleet(sample_fleet(), seed=3)
    path = tmp_path_factory.mktemp("sim") / "sim.json"
    path.write_text(json.dumps(result.model_dump(mode="json")))
    return path, json.loads(path.read_text())


def test_table_shows_the_simulated_numbers(
    simulated: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, sim = simulated
    assert (
        report.main(["--from-simulation", str(path), "--price", "0.2", "--carbon-intensity", "350", "-q"])
        == 0
    )
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert set(rows) == {w["name"] for w in sim["workloads"]}
    for w in sim["workloads"]:
        cells = rows[w["name"]]
        b, f = w["baseline"], w["final"]
        kwh = w["energySavedJoules"] / 3.6e6
        caps = [c for c in w["capWatts"].values() if c is not None]
        assert cells[1] == w["phase"]
        assert same(cells[2], b["joulesPerUnit"]) and same(cells[3], f["joulesPerUnit"])
        assert same(cells[4], b["edp"]) and same(cells[5], f["edp"])
        assert (
            same(cells[6], w["edpReductionPercent"], digits=1)
            or abs(float(cells[6]) - w["edpReductionPercent"]) <= 0.05
        )
        assert abs(float(cells[7]) - w["slowdownPercent"]) <= 0.05
        assert abs(float(cells[8]) - max(caps)) <= 0.5
        assert cells[9] == (str(w["batchSize"]) if w["batchSize"] is not None else "-")
        assert cells[10] == (w["quantization"] or "-")
        assert int(cells[11]) == w["probes"] == len(w["explored"])
        assert same(cells[12], kwh)
        assert same(cells[13], kwh * 0.2)
        assert same(cells[14], kwh * 350 / 1000)
    total = sum(w["energySavedJoules"] for w in sim["workloads"]) / 3.6e6
    assert f"total energy saved: {total:.4g} kWh ({total * 0.2:.4g} USD, {total * 0.35:.4g} kg CO2e)" in out


def test_plots_are_pngs_with_the_expected_series(
    simulated: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, sim = simulated
    out_dir = tmp_path / "out"
    assert report.main(["--from-simulation", str(path), "--plot", str(out_dir)]) == 0
    progress = capsys.readouterr().err
    assert f"[{len(sim['workloads']) + 1}/{len(sim['workloads']) + 1}] plotting" in progress
    files = sorted(out_dir.iterdir())
    assert len(files) == len(sim["workloads"]) + 1
    for w in sim["workloads"]:
        png = out_dir / f"simulate--seed-3--{w['name']}--explored.png"
        info = png_chunks(png)
        assert info["width"] > 600 and info["height"] > 200
        explored = [
            {**p, "cap": max(c for c in p["capWatts"].values() if c is not None)} for p in w["explored"]
        ]
        chosen = next(p for p in explored if p["objective"] == w["final"]["objective"])
        assert json.loads(info["text"]["Series"]) == expected_explored_series(explored, chosen, baseline=True)
        assert distinct_colours(png) > 8, f"{png} looks blank"
    saved = png_chunks(out_dir / "energy-saved.png")
    assert json.loads(saved["text"]["Series"]) == {"energy saved": len(sim["workloads"])}


def test_a_file_that_is_not_simulation_output_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"workloads": 3}')
    assert report.main(["--from-simulation", str(bad), "-q"]) == 2
    assert "is not `edpilot simulate --json` output" in capsys.readouterr().err


# ---------------------------------------------------------------- from EnergyPolicies on an API server


def _metrics(jpu: float, spu: float, ups: float) -> Metrics:
    return Metrics(
        joulesPerUnit=jpu, secondsPerUnit=spu, unitsPerSecond=ups, edp=jpu * spu, objective=jpu * spu
    )


def _state() -> OptimizerState:
    baseline = Probe(stage="baseline", config=Config(), metrics=_metrics(0.02, 0.001, 8000))
    probes = [
        Probe(stage="quantization", config=Config(quantization="fp8"), metrics=_metrics(0.012, 0.0009, 9000)),
        Probe(
            stage="batch",
            config=Config(quantization="fp8", batchSize=64),
            metrics=_metrics(0.006, 0.001, 60000),
        ),
        Probe(
            stage="cap",
            config=Config(quantization="fp8", batchSize=64, capWatts=450),
            metrics=_metrics(0.005, 0.00102, 59000),
        ),
        Probe(
            stage="cap",
            config=Config(quantization="fp8", batchSize=64, capWatts=350),
            metrics=_metrics(0.0045, 0.0013, 46000),
            failed="slowdown 23 % > 10 %",
        ),
    ]
    return OptimizerState(
        phase="Converged", baseline=baseline, probes=probes, incumbent=probes[2], energySavedJoules=7.2e6
    )


def _policy(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "edpilot.io/v1alpha1",
        "kind": "EnergyPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "objective": "EDP",
            "powerCap": {"mode": "Auto"},
            "batchSize": {"mode": "Auto"},
            "quantization": {"mode": "Auto", "allowed": ["bf16", "fp8"]},
            "workMetric": {"name": "generated_tokens_total", "unit": "tokens"},
        },
    }


def _status(state: OptimizerState, embedded: bool = False) -> dict[str, Any]:
    """The status; with `embedded` the state in its row, as operators before WorkloadOptimizerState
    objects kept it."""
    measurement = {"joulesPerUnit": 0.02, "secondsPerUnit": 0.001, "edp": 2e-5, "unitsPerSecond": 8000}
    current = {"joulesPerUnit": 0.005, "secondsPerUnit": 0.00102, "edp": 5.1e-6, "unitsPerSecond": 59000}
    return {
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Steering",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
            {
                "type": "Converged",
                "status": "True",
                "reason": "AllConverged",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            },
        ],
        "workloads": [
            {
                "name": "decode-0",
                "pods": ["default/decode-0"],
                "nodes": ["report-test-node"],
                "gpus": 1,
                "phase": "Converged",
                "powerCapWatts": 450,
                "batchSize": 64,
                "quantization": "fp8",
                "baseline": measurement,
                "current": current,
                "edpReductionPercent": 74.5,
                "slowdownPercent": -637.5,
                "energySavedJoules": 7.2e6,
                "probes": 4,
                "message": "converged",
                **({"optimizer": state.model_dump(mode="json", exclude_none=True)} if embedded else {}),
            },
            {
                "name": "decode-1",
                "pods": ["default/decode-1"],
                "phase": "Pending",
                "message": "waiting for a report",
            },
        ],
        "totals": {"workloads": 2, "gpus": 1, "energySavedJoules": 7.2e6, "averageEdpReductionPercent": 74.5},
    }


def _node_report() -> dict[str, Any]:
    return {
        "nodeName": "report-test-node",
        "agentVersion": "test",
        "backend": "sim",
        "time": "2026-01-01T00:00:00Z",
        "gpus": [
            {
                "index": 0,
                "uuid": "GPU-0",
                "model": "NVIDIA H100 80GB HBM3",
                "minLimitWatts": 200,
                "maxLimitWatts": 700,
                "defaultLimitWatts": 700,
                "enforcedLimitWatts": 450,
                "powerWatts": 420,
                "energyJoules": 1e6,
                "pods": ["default/decode-0"],
            }
        ],
    }


@pytest.fixture
def api(crds_installed: Cluster) -> Iterator[Cluster]:
    """The real API server; the objects a test makes are deleted after it, as the session's
    cluster is shared with other tests (and their operators)."""
    yield crds_installed
    crds_installed.kubectl(
        "delete", "energypolicies", "report-decode", "-n", "default", "--ignore-not-found", "--wait=false"
    )
    crds_installed.kubectl(
        "delete", "gpunodereports", "report-test-node", "--ignore-not-found", "--wait=false"
    )


def test_report_reads_policies_from_the_api_server(
    api: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _state()
    api.kubectl("apply", "-f", "-", input=json.dumps(_policy("report-decode")))
    api.kubectl(
        "patch", "energypolicies", "report-decode", "-n", "default", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": _status(state)}),
    )  # fmt: skip
    uid = api.get_json("energypolicies", "report-decode", "-n", "default")["metadata"]["uid"]
    held = state_object(
        "default", "report-decode", uid, "decode-0", state.model_dump(mode="json", exclude_none=True)
    )
    api.kubectl("apply", "-f", "-", input=json.dumps(held))
    api.kubectl(
        "apply", "-f", "-",
        input=json.dumps({"apiVersion": "edpilot.io/v1alpha1", "kind": "GPUNodeReport", "metadata": {"name": "report-test-node"}}),
    )  # fmt: skip
    api.kubectl(
        "patch", "gpunodereports", "report-test-node", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": _node_report()}),
    )  # fmt: skip
    stored = api.get_json("energypolicies", "report-decode", "-n", "default")["status"]
    history = tmp_path / "history.jsonl"
    args = ["--kubeconfig", str(api.kubeconfig), "-n", "default", "--history", str(history), "--price", "0.1"]

    assert report.main([*args, "--plot", str(tmp_path / "plots")]) == 0
    captured = capsys.readouterr()
    assert "[1/1] reading EnergyPolicy default/report-decode" in captured.err
    out = captured.out
    assert "EnergyPolicy default/report-decode  objective=EDP  workloads=2  gpus=1" in out
    assert "Converged=True Ready=True" in out
    row = stored["workloads"][0]
    cells = table_rows(out)["decode-0"]
    assert cells[1] == row["phase"]
    assert same(cells[2], row["baseline"]["joulesPerUnit"]) and same(
        cells[3], row["current"]["joulesPerUnit"]
    )
    assert same(cells[4], row["baseline"]["edp"]) and same(cells[5], row["current"]["edp"])
    assert float(cells[6]) == row["edpReductionPercent"] and float(cells[7]) == row["slowdownPercent"]
    assert float(cells[8]) == row["powerCapWatts"] and int(cells[9]) == row["batchSize"]
    assert cells[10] == row["quantization"] and int(cells[11]) == row["probes"]
    assert same(cells[12], row["energySavedJoules"] / 3.6e6) and same(
        cells[13], row["energySavedJoules"] / 3.6e6 * 0.1
    )
    assert table_rows(out)["decode-1"][1:4] == ["Pending", "-", "-"]
    assert "decode-1: waiting for a report" in out

    # The explored points come from the stored optimizer state; a probe without a cap ran at the
    # GPU's default limit, which the GPUNodeReport says.
    assert report.main([*args, "--json", "-q"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    decode = parsed[0]["workloads"][0]
    assert [p["capWatts"] for p in decode["explored"]] == [700, 700, 450, 350]
    assert decode["chosen"] == decode["explored"][2]
    assert decode["baselineObjective"] == pytest.approx(2e-5)
    explored = [{**p, "cap": p["capWatts"]} for p in decode["explored"]]
    info = png_chunks(tmp_path / "plots" / "default--report-decode--decode-0--explored.png")
    chosen = {**decode["chosen"], "cap": decode["chosen"]["capWatts"]}
    assert json.loads(info["text"]["Series"]) == expected_explored_series(explored, chosen, baseline=True)

    # Two readings in the history: energy saved over time has two points per workload.
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    assert len(lines) == 4 and {line["workload"] for line in lines} == {"decode-0", "decode-1"}
    assert decode["savings"][0][1] == decode["savings"][1][1] == 7.2e6
    assert datetime.fromisoformat(lines[-1]["time"]) <= datetime.now(UTC)
    saved = png_chunks(tmp_path / "plots" / "energy-saved.png")
    assert json.loads(saved["text"]["Series"]) == {"energy saved": 2}


def test_explored_points_come_from_the_state_objects_or_a_not_yet_migrated_row() -> None:
    state = _state()
    body = state.model_dump(mode="json", exclude_none=True)
    objects = [
        state_object("default", "p", "uid", "decode-0", body),
        state_object("default", "other", "uid", "decode-0", {"schemaVersion": 1, "probes": "x"}),
    ]
    policy = {**_policy("p"), "status": _status(state)}
    (from_objects,) = report.from_policies([policy], states=objects)
    (from_row,) = report.from_policies([{**policy, "status": _status(state, embedded=True)}])
    (without,) = report.from_policies([policy])
    explored = [p.capWatts for p in from_objects.workloads[0].explored]
    assert explored == [None, None, 450, 350]  # no GPUNodeReport: the default cap is unknown
    assert from_row.workloads[0].explored == from_objects.workloads[0].explored
    assert without.workloads[0].explored == [] and without.workloads[0].chosen is None


def test_unreachable_cluster_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n"
        "current-context: x\n"
    )
    assert report.main(["--kubeconfig", str(kubeconfig), "-q"]) == 1
    assert "cannot read EnergyPolicies" in capsys.readouterr().err
