"""Launch files: each parses (bash -n for the Slurm script, YAML for the Kubernetes
manifests) and names the recipe and the world size it was rendered for; the examples in
deploy/ are what the command renders today."""

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from helox.distributed.launch import LaunchSpec, render
from helox.errors import HeloxError

ROOT = Path(__file__).resolve().parents[2]
SPEC = LaunchSpec("recipes/pretrain.yaml", nodes=3, nproc_per_node=2, run_dir="/shared/run")


def test_the_slurm_script_is_valid_bash_and_launches_the_recipe_on_the_world(tmp_path):
    script = tmp_path / "train.sbatch"
    script.write_text(render("slurm", SPEC))
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes=3" in text and "#SBATCH --ntasks-per-node=1" in text
    assert "#SBATCH --gpus-per-node=2" in text and "world size 6" in text
    command = shlex.split(text[text.index("srun "):].replace("\\\n", " "))
    assert command[:4] == ["srun", "--kill-on-bad-exit=1", "python", "-m"]
    assert {"--nnodes=3", "--nproc-per-node=2", "--rdzv-backend=c10d"} <= set(command)
    assert command[-6:] == ["-m", "helox.cli", "train", "recipes/pretrain.yaml", "--run-dir",
                            "/shared/run"]


def test_the_trainjob_names_nodes_processes_and_the_recipe():
    job = yaml.safe_load(render("trainjob", SPEC))
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] * trainer["numProcPerNode"] == 6
    assert trainer["command"][:5] == ["torchrun", "-m", "helox.cli", "train",
                                      "recipes/pretrain.yaml"]
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "2"}
    assert job["metadata"]["name"] == "helox-pretrain"


def test_the_pytorchjob_has_a_master_and_the_other_nodes_as_workers():
    job = yaml.safe_load(render("pytorchjob", SPEC))
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == 3
    assert int(job["spec"]["nprocPerNode"]) == 2
    for role in ("Master", "Worker"):
        container = replicas[role]["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"  # the operator's convention
        assert "recipes/pretrain.yaml" in container["command"]


def test_cpu_jobs_ask_for_cores_not_gpus():
    spec = LaunchSpec("quickstart", nodes=2, nproc_per_node=2, gpus=False)
    assert "--gpus-per-node" not in render("slurm", spec)
    limits = yaml.safe_load(render("trainjob", spec))["spec"]["trainer"]["resourcesPerNode"]
    assert limits["limits"] == {"cpu": "8"}


def test_an_unknown_target_is_refused_with_the_choices():
    with pytest.raises(HeloxError, match="unknown launch target 'lsf'") as caught:
        render("lsf", SPEC)
    assert "slurm, trainjob, pytorchjob" in caught.value.hint


@pytest.mark.parametrize("name", ["slurm.sbatch", "trainjob.yaml", "pytorchjob.yaml"])
def test_the_examples_in_deploy_are_the_current_rendering(name):
    spec = LaunchSpec("quickstart", nodes=2, nproc_per_node=4,
                      run_dir="/shared/runs/quickstart", image="ghcr.io/example/helox:latest")
    assert (ROOT / "deploy" / name).read_text() == render(name.split(".")[0], spec), \
        "regenerate with the command in the file's 'Rendered by' line"
