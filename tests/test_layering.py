"""Imports flow one way: models <- stages <- jobs <- cli (pipeline's core is shared by all).

models/ is pure model code: it may import nothing from pipeline/, stages/ or jobs/. stages/ may
not import jobs/. The core modules of pipeline/ (everything but cli.py and commands/) may not
import jobs/. Walked with ast, so lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


RULES = [("models", {"pipeline", "stages", "jobs"}), ("stages", {"jobs"})]


@pytest.mark.parametrize("package,forbidden", RULES)
def test_package_does_not_import_upwards(package, forbidden):
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & forbidden) for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_pipeline_core_does_not_import_jobs():
    core = [p for p in (ROOT / "pipeline").glob("*.py") if p.name != "cli.py"]
    assert core and {str(p.name): "jobs" for p in core if "jobs" in _imports(p)} == {}
