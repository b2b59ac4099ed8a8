"""Engine presets (workMetric.engine) against expositions in each engine's own format.

The fixtures in tests/agent/fixtures were written for these tests in the format vLLM (v1 engine,
two data-parallel engines in one pod) and SGLang (--enable-metrics) serve at /metrics, following
their documentation; they go through the agent's real parser."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from edpilot_agent.scraper import MetricsParser, ScrapeError, parse_sample
from pydantic import ValidationError

from edpilot.models import ENGINE_PRESETS, EnergyPolicySpec, MeasuredWorkload

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_OF = {"vllm": "vllm-v1.prom", "sglang": "sglang.prom"}


def fixture(engine: str) -> str:
    return (FIXTURES / FIXTURE_OF[engine]).read_text()


def series(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of an exposition by name, parsed by the agent's own line parser."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, labels, value = parse_sample(line)
        found.setdefault(name, []).append((labels, value))
    return found


def preset_policy(engine: str, **spec: object) -> EnergyPolicySpec:
    return EnergyPolicySpec.model_validate(
        {
            "selector": {},
            "latencySLO": {"maxSeconds": 0.05},
            "firstTokenSLO": {"quantile": 0.99, "maxSeconds": 1.0},
            "workMetric": {"engine": engine, "port": 8000},
            **spec,
        }
    )


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples[name])


def test_every_engine_has_a_fixture() -> None:
    assert set(FIXTURE_OF) == set(ENGINE_PRESETS)


@pytest.mark.parametrize("engine", sorted(ENGINE_PRESETS))
def test_every_metric_a_preset_names_is_in_the_engines_exposition(engine: str) -> None:
    preset = ENGINE_PRESETS[engine]
    samples = series(fixture(engine))
    assert preset.work in samples  # prometheus_client writes a counter with its _total suffix
    assert preset.finished in samples
    for gauge in (preset.running, preset.waiting):
        assert gauge in samples, gauge
    for histogram in (preset.latency, preset.firstToken):
        for suffix in ("_bucket", "_sum", "_count"):
            assert f"{histogram}{suffix}" in samples, f"{histogram}{suffix}"
    assert all(name.startswith(preset.prefix) for name in samples)


@pytest.mark.parametrize("engine", sorted(ENGINE_PRESETS))
def test_a_preset_policy_reads_every_figure_from_the_engines_exposition(engine: str) -> None:
    preset = ENGINE_PRESETS[engine]
    workload = MeasuredWorkload.of_policy("ns", "pod", preset_policy(engine))
    assert (workload.metricName, workload.unit) == (preset.work, "tokens")
    reading = MetricsParser().parse(workload, fixture(engine))
    samples = series(fixture(engine))
    assert reading.error == ""
    # Summed over the engine's series: its data-parallel engines, its finish reasons.
    assert reading.work_units == total(samples, preset.work)
    assert reading.requests_running == total(samples, preset.running)
    assert reading.requests_waiting == total(samples, preset.waiting)
    assert reading.requests_finished == total(samples, preset.finished)
    # The mean inter-token latency (no quantile asked) is the histogram's sum over its count.
    mean = total(samples, f"{preset.latency}_sum") / total(samples, f"{preset.latency}_count")
    assert reading.latency_seconds is not None and math.isclose(reading.latency_seconds, mean)
    assert reading.first_token_seconds is not None and 0.1 < reading.first_token_seconds < 10.0


def test_a_histogram_split_over_data_parallel_engines_is_read_as_one() -> None:
    """vLLM with --data-parallel-size 2 serves one histogram series per engine: the pod's latency
    covers both, not whichever series came first."""
    policy = preset_policy("vllm", latencySLO={"quantile": 0.5, "maxSeconds": 0.05})
    workload = MeasuredWorkload.of_policy("ns", "pod", policy)
    text = fixture("vllm")
    engine_0 = "\n".join(line for line in text.splitlines() if 'engine="1"' not in line)
    both, one = MetricsParser().parse(workload, text), MetricsParser().parse(workload, engine_0)
    assert both.work_units is not None and one.work_units is not None
    assert both.work_units > one.work_units
    assert both.latency_seconds is not None and one.latency_seconds is not None
    assert 0.025 < both.latency_seconds < 0.05
    assert both.latency_seconds != one.latency_seconds


def test_explicit_names_win_over_the_preset() -> None:
    policy = preset_policy(
        "sglang",
        latencySLO={"metricName": "sglang:e2e_request_latency_seconds", "maxSeconds": 30},
        workMetric={
            "engine": "sglang",
            "name": "sglang:prompt_tokens_total",
            "unit": "prompt tokens",
            "load": {"waiting": "sglang:num_grammar_queue_reqs"},
        },
    )
    names = policy.metrics()
    assert (names.work, names.unit, names.latency) == (
        "sglang:prompt_tokens_total",
        "prompt tokens",
        "sglang:e2e_request_latency_seconds",
    )
    assert (names.running, names.waiting, names.finished) == (
        "sglang:num_running_reqs",
        "sglang:num_grammar_queue_reqs",
        "sglang:num_requests_total",
    )
    assert names.firstToken == "sglang:time_to_first_token_seconds"


def test_a_preset_makes_the_policy_load_driven_and_custom_keeps_todays_names() -> None:
    assert preset_policy("vllm").load_driven
    custom = EnergyPolicySpec.model_validate({"selector": {}, "workMetric": {"name": "work_units_total"}})
    assert not custom.load_driven and custom.metrics().unit == "units"
    assert custom.metrics().running is None
    # `load: {}` with engine custom still takes vLLM's names, as before presets existed.
    serving = EnergyPolicySpec.model_validate(
        {
            "selector": {},
            "latencySLO": {"metricName": "itl_seconds", "maxSeconds": 0.05},
            "workMetric": {"name": "tokens_total", "load": {}},
        }
    )
    assert serving.load_driven
    assert serving.metrics().running == "vllm:num_requests_running"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"workMetric": {"engine": "custom"}}, "workMetric.name is required unless"),
        ({"workMetric": {"engine": "vllm"}}, "set latencySLO too"),
        (
            {"workMetric": {"name": "t_total", "load": {}}, "latencySLO": {"maxSeconds": 1}},
            "latencySLO.metricName is required unless",
        ),
        (
            {
                "workMetric": {"engine": "vllm", "name": "sglang:generation_tokens_total"},
                "latencySLO": {"maxSeconds": 1},
            },
            "workMetric.name names sglang's metric",
        ),
        (
            {
                "workMetric": {"engine": "sglang", "load": {"running": "vllm:num_requests_running"}},
                "latencySLO": {"maxSeconds": 1},
            },
            "workMetric.load.running names vllm's metric",
        ),
        (
            {
                "workMetric": {"engine": "sglang"},
                "latencySLO": {"metricName": "vllm:inter_token_latency_seconds", "maxSeconds": 1},
            },
            "latencySLO.metricName names vllm's metric",
        ),
    ],
)
def test_nonsense_is_refused_with_a_clear_message(spec: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        EnergyPolicySpec.model_validate({"selector": {}, **spec})


def test_a_fixture_line_the_parser_could_not_read_would_fail_the_suite() -> None:
    """Guards the guard: `series` uses the agent's parser, which refuses what is not the format."""
    with pytest.raises(ScrapeError):
        parse_sample('vllm:num_requests_running{engine="0" 3')
