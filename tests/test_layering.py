"""The layering holds: no package cycle, eval/export/observe never import training, no helox
import hidden in a function (scripts/import_graph.py), and the model imports nothing of the
data or observe packages when it is imported."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_import_graph_has_no_cycle_and_keeps_its_rules():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "import_graph.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " 0 cycles, 0 function-local helox imports outside cli.py, 0 problems" in done.stdout


def test_importing_the_model_loads_only_its_own_package():
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import helox.model.llama"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
              if line.startswith("import time:")}
    helox_modules = sorted(name for name in loaded if name.startswith("helox"))
    assert "helox.model.llama" in helox_modules
    assert all(name.split(".")[1] in ("model", "configbase", "errors", "version")
               for name in helox_modules if "." in name), helox_modules
    assert not loaded & {"rensa", "detect_secrets", "pyarrow", "plotly"}
