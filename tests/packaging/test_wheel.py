"""The package works installed: a wheel built from this checkout, installed into a new
virtual environment outside it, runs `helox run` on the bundled recipe (by name), `helox
eval` on a bundled suite, `helox export` and `helox import-hf`, all from a temporary folder.

The new environment gets its dependencies from this test environment's site-packages (a path
line in a .pth file, after its own site-packages): that spares a reinstall of torch and the
rest, and cannot leak the checkout in, because the editable install's finder is an import line
of a .pth file there, which Python only runs for site-packages folders of its own. The test
checks that `helox` is imported from the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--set", "train.max_steps=3", "--set", "optim.warmup_steps=1",
         "--set", "train.compile=false", "--set", "data.train.0.max_documents=150",
         "--set", "data.val.0.max_documents=20", "--set", "train.eval_every_steps=3",
         "--set", "checkpoint.every_steps=3", "--set", "data.num_workers=1",
         "--set", "sample.max_new_tokens=4", "--set", "release.promote_to=null"]

pytestmark = pytest.mark.slow


def run(command: list, cwd: Path, ok_codes=(0,)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode in ok_codes, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a new virtual environment holding the wheel of this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(REPO / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", root / "dist", source], cwd=root)
    (wheel,) = (root / "dist").glob("helox-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; "
                     "print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip())
    (site / "helox-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install",
         "--no-deps", "--no-index", "--quiet", wheel], cwd=root)
    return venv / "bin"


def test_the_wheel_holds_the_package_data_and_is_imported_from_the_venv(installed, tmp_path):
    where = run([installed / "python", "-c", "import helox, helox.resources as r; "
                 "print(helox.__file__); print(r.bundled_recipes()); "
                 "print(sorted(p.name for p in r.suites_dir().iterdir()))"], cwd=tmp_path)
    module, recipes, suites = where.stdout.splitlines()
    assert Path(module).is_relative_to(installed.parent) and not Path(module).is_relative_to(REPO)
    assert "quickstart" in recipes and "mixture" in recipes
    assert "quickstart" in suites and "lm_eval" in suites
    slurm = run([installed / "helox", "launch-file", "slurm", "quickstart", "--nodes", "2"],
                cwd=tmp_path).stdout
    assert "#SBATCH --nodes=2" in slurm  # the launch templates ship in the wheel


def test_run_eval_export_and_import_from_a_temporary_folder(installed, tmp_path):
    helox = installed / "helox"
    summary = json.loads(run([helox, "run", "quickstart", *QUICK, "--json"], cwd=tmp_path).stdout)
    run_dir = tmp_path / "workspace" / "runs" / "quickstart"
    assert summary["step"] == 3 and Path(summary["run_dir"]) == Path("workspace/runs/quickstart")
    assert (run_dir / "checkpoints" / "step-00000003").is_dir()
    # The release stages ran from the wheel: a 3-step model fails the suite's thresholds (so
    # it is not promoted: promote_to is null) but is exported and registered at dev.
    release = summary["release"]
    assert release["eval"]["passed"] is False and release["registered"] == "models:/quickstart/1"
    assert set(release["exports"]) == {"hf", "gguf"}
    # A 3-step model fails the suite's thresholds (exit 1); the results are written either way.
    evaluated = json.loads(run([helox, "eval", run_dir, "--suite", "quickstart", "--json"],
                               cwd=tmp_path, ok_codes=(0, 1)).stdout)
    assert (Path(evaluated["folder"]) / "results.json").is_file()
    assert evaluated["result"]["suite"] == "quickstart"
    exported = json.loads(run([helox, "export", run_dir, "--format", "hf", "--out",
                               tmp_path / "hf", "--json"], cwd=tmp_path).stdout)
    assert Path(exported["artifact"]) == tmp_path / "hf"
    imported = json.loads(run([helox, "import-hf", tmp_path / "hf", "--out",
                               tmp_path / "imported", "--json"], cwd=tmp_path).stdout)
    assert Path(imported["checkpoint"]).is_dir()
    recipe = (tmp_path / "imported" / "finetune.yaml").read_text()
    assert str(installed.parent) in recipe  # the bundled corpus, inside the installed package
