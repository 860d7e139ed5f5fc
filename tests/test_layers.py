"""The library layer never imports Prefect (DESIGN.md, "Layers")."""

import pkgutil
import subprocess
import sys

import cvpipe


def test_importing_every_cvpipe_module_does_not_import_prefect():
    modules = sorted(m.name for m in pkgutil.iter_modules(cvpipe.__path__, "cvpipe."))
    assert "cvpipe.storage" in modules and "cvpipe.shards" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(k for k in sys.modules if k == 'prefect' or k.startswith('prefect.'))\n"
        "print(','.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"prefect imported by cvpipe: {out.stdout} {out.stderr[-2000:]}"
