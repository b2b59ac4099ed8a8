"""Priors are data (issue 15 item 3): the checked-in table is what gpusim computes now, and
placement reads the table, so it never runs the simulator."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from edpilot import gpu_priors, make_priors, placement
from edpilot.gpu_priors import GPU_PRIORS, REFERENCE_MODEL


def test_the_checked_in_table_matches_gpusim() -> None:
    # Exact: the table writes floats by repr. A failure means gpusim was recalibrated: run
    # `make priors` and review what moved in the diff.
    assert make_priors.table() == GPU_PRIORS


def test_the_generator_writes_a_table_that_reads_back_as_it_computed(tmp_path: Path) -> None:
    out = tmp_path / "priors.py"
    assert make_priors.main(["--out", str(out)]) == 0
    namespace: dict[str, object] = {}
    exec(compile(out.read_text(), str(out), "exec"), namespace)
    assert namespace["GPU_PRIORS"] == make_priors.table()
    assert namespace["REFERENCE_MODEL"] == REFERENCE_MODEL


def test_placement_reads_the_table_and_never_the_simulator() -> None:
    # (lint-imports holds budgets and the operator to the same.)
    imported: set[str] = set()
    for node in ast.walk(ast.parse(inspect.getsource(placement))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    assert not any("gpusim" in name or "make_priors" in name for name in imported)
    assert "edpilot.gpu_priors" in imported


@pytest.mark.parametrize("name", list(GPU_PRIORS))
def test_each_simulated_model_is_placed_by_its_table_row(name: str) -> None:
    default, lo, hi, rel, source, curve = GPU_PRIORS[name]
    prior = placement.prior_for(name)
    assert prior is not None
    assert (prior.default_limit_watts, prior.min_limit_watts, prior.max_limit_watts) == (default, lo, hi)
    assert (prior.relative_joules_per_unit, prior.source, prior.compute_curve) == (rel, source, curve)
    assert placement.compute_bound_curve(name, lo, hi) == curve


def test_the_reference_model_is_the_unit_of_energy() -> None:
    assert GPU_PRIORS[REFERENCE_MODEL][3] == 1.0
    assert gpu_priors.REFERENCE_MODEL in GPU_PRIORS
