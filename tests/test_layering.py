"""Imports flow one way: models <- stages <- jobs <- cli, and everything may use pipeline's core.

- models/ is pure model code: it imports nothing from pipeline/, stages/, jobs/ or cli/.
- stages/ never imports jobs/ or cli/; jobs/ never imports cli/ (the CLI is the top layer).
- pipeline/ never imports jobs/ or cli/.
- pipeline's core (everything but device.py, the one module that knows devices, and workers.py,
  whose worker processes set torch's thread count) imports neither models/ nor stages/ nor torch:
  `pipeline status` / `export` read a run dir of millions of rows without loading torch.

Walked with ast, so lazy imports inside functions count too; only imports under
`if TYPE_CHECKING:` are skipped (annotations, never executed).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_CORE = {"device.py", "workers.py"}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _modules(path: Path) -> set[str]:
    """Every module the file imports (dotted names), lazy imports included."""
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _imports(path: Path) -> set[str]:
    return {m.split(".")[0] for m in _modules(path)}


def _core() -> list[Path]:
    return [p for p in (ROOT / "pipeline").rglob("*.py") if p.name not in NOT_CORE]


RULES = [("models", {"pipeline", "stages", "jobs", "cli"}), ("stages", {"jobs", "cli"}), ("jobs", {"cli"}),
         ("pipeline", {"jobs", "cli"})]


@pytest.mark.parametrize("package,forbidden", RULES)
def test_package_does_not_import_upwards(package, forbidden):
    bad = {str(p.relative_to(ROOT)): sorted(_imports(p) & forbidden) for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


CORE = {"records.py", "ledger.py", "status.py", "export.py", "manifest.py", "run_input.py", "preview.py",
        "captions_json.py", "screen.py", "runner.py", "build.py", "read.py", "fetch.py", "local.py"}


def test_pipeline_core_imports_no_model_stage_or_torch():
    core = _core()
    assert len(core) > 10 and CORE <= {p.name for p in core}
    bad = {p.name: sorted(_imports(p) & {"models", "stages", "torch"}) for p in core}
    assert {k: v for k, v in bad.items() if v} == {}


# report_html calls back into compare; issue 13 part B (branch `harden`) makes the renderer take data.
# Remove this entry with that change.
KNOWN_CYCLE_EDGES = {("jobs.report_html", "jobs.compare")}


@pytest.mark.parametrize("package", ["jobs", "pipeline", "stages", "models", "cli"])
def test_no_import_cycles_inside_a_package(package):
    """A cycle that only works because one import is lazy (jobs/caption.py <-> caption_ray.py once)
    is still a cycle: modules of a package import each other one way."""
    mods = {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    graph = {m: {d for d in _modules(p) if d in mods and d != m and (m, d) not in KNOWN_CYCLE_EDGES}
             for m, p in mods.items()}
    path: list[str] = []

    def visit(m: str, seen: set[str]) -> None:
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in seen:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d, seen)
        path.pop()
        seen.add(m)

    done: set[str] = set()
    for m in sorted(graph):
        visit(m, done)


def test_the_walker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                 "def f():\n    from models.base import X\n")
    assert _imports(f) == {"typing", "models"}


def test_plan_status_and_export_never_load_torch(tmp_path):
    """The whole command line of `pipeline plan`, `status` and `export` (json: the streamed sort),
    in a fresh interpreter, on a committed run made without a model."""
    from tests.synthetic_runs import synthesize

    (tmp_path / "m.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    synthesize(tmp_path / "run", str(tmp_path / "m.txt"), 2, shards=[0])
    code = ("import sys\nfrom cli.app import app\nm, run = sys.argv[1:]\n"
            "for args in (['plan', '--input', m, '--out', run, '--shard-size', '2'], ['status', run],\n"
            "             ['export', run, '--partial'], ['export', run + '-none']):\n"
            "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'models', 'stages')))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.txt"), str(tmp_path / "run")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert "1 done (0 with failed rows: 0 images), 1 pending (1 images)" in r.stdout          # plan
    assert "done       2 images in 1 shard(s)" in r.stdout                                      # status
    assert (tmp_path / "run" / "captions.partial.json").exists()                                 # export
    assert "is not a run directory" in r.stderr
