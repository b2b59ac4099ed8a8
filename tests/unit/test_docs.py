"""The generated docs are up to date with their sources (CRDs, chart values, metric collectors, probe
data), cover every field, and the hand-written docs link only to files that exist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
GENERATED = ("api.md", "helm-values.md", "metrics.md", "h100-probe.md")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    proc = subprocess.run(
        [sys.executable, str(REPO / "hack" / "gen-docs.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("name", GENERATED)
def test_generated_docs_are_up_to_date(regenerated: Path, name: str) -> None:
    committed = DOCS / name
    assert committed.exists(), f"docs/{name} is missing: run `make docs`"
    assert committed.read_text() == (regenerated / name).read_text(), (
        f"docs/{name} is out of date with its source: run `make docs` and commit the result"
    )


def _crd_fields(schema: dict[str, Any], path: str = "") -> Iterator[str]:
    for name, sub in schema.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        yield here
        if sub.get("type") == "array":
            yield from _crd_fields(sub.get("items", {}), f"{here}[]")
        else:
            yield from _crd_fields(sub, here)


def test_api_doc_lists_every_crd_field_with_its_bounds() -> None:
    text = (DOCS / "api.md").read_text()
    for path in sorted((REPO / "crds").glob("*.yaml")):
        schema = yaml.safe_load(path.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for field in _crd_fields(schema):
            if field in ("apiVersion", "kind", "metadata"):
                continue
            assert re.search(rf"\| `{re.escape(field)}`( \(required\))? \|", text), (
                f"{field} missing in api.md"
            )
    row = next(line for line in text.splitlines() if line.startswith("| `spec.maxSlowdownPercent`"))
    assert ">= 0; <= 90" in row and "`10`" in row


def _leaves(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def test_helm_values_doc_lists_every_value_with_its_default() -> None:
    text = (DOCS / "helm-values.md").read_text()
    values = yaml.safe_load((REPO / "charts" / "edpilot" / "values.yaml").read_text())
    for path, value in _leaves(values):
        leaf = ".".join(path)
        row = next((line for line in text.splitlines() if line.startswith(f"| `{leaf}` |")), None)
        assert row is not None, f"{leaf} missing in helm-values.md"
        assert json.dumps(value, separators=(", ", ": ")).replace("|", "\\|") in row, row


def test_metrics_doc_lists_what_the_dashboard_reads() -> None:
    text = (DOCS / "metrics.md").read_text()
    dashboard = (REPO / "charts" / "edpilot" / "dashboards" / "edpilot.json").read_text()
    used = set(re.findall(r"edpilot_[a-z_]+", dashboard))
    documented = set(re.findall(r"`(edpilot_[a-z_]+)`", text))
    for name in used:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert base in documented, f"{name} is on the dashboard but not in docs/metrics.md"


def test_doc_links_point_at_files_that_exist() -> None:
    for page in DOCS.glob("*.md"):
        prose = re.sub(r"`[^`\n]*`", "", page.read_text())
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).resolve().exists(), f"{page.name} links to missing {target}"
