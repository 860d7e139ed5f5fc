"""The house rules, checked from the code: the library never imports Prefect, and
imports point down the data's route only (docs/ARCHITECTURE.md, "Layers")."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import cvpipe

ROOT = Path(cvpipe.__file__).resolve().parent
# The route, lowest first: a layer may import itself and the layers before it.
LAYERS = ["core", "data", "models", "infer", "label", "learn", "index", "experiments"]


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(cvpipe.__path__, "cvpipe."))


def test_importing_every_cvpipe_module_does_not_import_prefect():
    modules = _all_modules()
    assert "cvpipe.core.storage" in modules and "cvpipe.data.shards" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k == 'prefect' or k.startswith('prefect.'))\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"prefect imported by cvpipe: {out.stdout} {out.stderr[-2000:]}"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported cvpipe module) of every import in a file, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names if n.startswith("cvpipe.")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("cvpipe.")]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_library_module_sits_in_a_layer():
    loose = [p.name for p in ROOT.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside the layer folders: {loose}"
    assert sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()) == sorted(LAYERS)


def test_imports_point_down_the_route():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        here = _layer("cvpipe." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        if here is None:
            continue
        for line, module in _imports(path):
            there = _layer(module)
            if there is not None and LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} ({here}) imports {module}")
    assert upward == [], "imports pointing up the route:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from cvpipe.learn import training\n")
    assert [m for _, m in _imports(bad)] == ["cvpipe.learn", "cvpipe.learn.training"]
    assert LAYERS.index(_layer("cvpipe.learn.training")) > LAYERS.index("data")


def test_tasks_hold_no_algorithm_and_flows_are_the_only_cli():
    """tasks/ imports the library and Prefect only; nothing in cvpipe/ or tasks/ imports
    flows/ (the console script lives with the flows)."""
    top = ROOT.parent
    for folder in ("cvpipe", "tasks"):
        for path in (top / folder).rglob("*.py"):
            src = path.read_text()
            assert "from flows" not in src and "import flows" not in src, path
