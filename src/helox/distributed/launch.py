"""Launch files for the schedulers people train on: a Slurm batch script (srun + torchrun, one
task per node), a Kubeflow Trainer `TrainJob` and the Training Operator's `PyTorchJob`. Each
is a template shipped with Helox (helox/launchers/), rendered for a recipe and a world size by
`helox launch-file`; rendered examples are kept in deploy/.

Every file starts `python -m helox.cli train RECIPE` under torchrun on each node; the recipe's
`parallel` section says how the ranks share the work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from string import Template

from helox.errors import HeloxError
from helox.resources import bundled

TARGETS = {"slurm": "slurm.sbatch", "trainjob": "trainjob.yaml", "pytorchjob": "pytorchjob.yaml"}


@dataclass(frozen=True)
class LaunchSpec:
    recipe: str
    """The recipe as the nodes see it (a path on their shared storage, or a bundled name)."""
    nodes: int = 1
    nproc_per_node: int = 1
    gpus: bool = True
    """One GPU per process (NCCL); False runs CPU processes (gloo)."""
    run_dir: str = "workspace/runs/helox"
    image: str = "python:3.11"
    """The container image (Kubernetes) with Helox installed."""
    max_restarts: int = 1
    port: int = 29500
    cpus_per_task: int = 8
    time_limit: str = "24:00:00"

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def name(self) -> str:
        """A Kubernetes- and Slurm-safe job name from the recipe's file name."""
        stem = re.sub(r"\.ya?ml$", "", self.recipe.rsplit("/", 1)[-1]).lower()
        return re.sub(r"[^a-z0-9-]+", "-", stem).strip("-")[:40] or "run"


def render(target: str, spec: LaunchSpec) -> str:
    """The launch file of `target` (slurm, trainjob, pytorchjob) for `spec`."""
    if target not in TARGETS:
        raise HeloxError(f"unknown launch target {target!r}",
                         hint=f"choose one of {', '.join(TARGETS)}")
    if spec.nodes < 1 or spec.nproc_per_node < 1:
        raise HeloxError(f"{spec.nodes} nodes × {spec.nproc_per_node} processes is no job",
                         hint="pass --nodes and --nproc-per-node of at least 1")
    template = Template((bundled("launchers") / TARGETS[target]).read_text())
    return template.substitute(_values(target, spec))


def _values(target: str, spec: LaunchSpec) -> dict[str, str]:
    device = "nvidia.com/gpu" if spec.gpus else "cpu"
    per_node = spec.nproc_per_node if spec.gpus else spec.cpus_per_task
    args = (f"--nodes {spec.nodes} --nproc-per-node {spec.nproc_per_node} --run-dir "
            f"{spec.run_dir}" + ("" if target == "slurm" else f" --image {spec.image}"))
    return {
        "name": spec.name, "recipe": spec.recipe, "run_dir": spec.run_dir,
        "nodes": str(spec.nodes), "nproc_per_node": str(spec.nproc_per_node),
        "world_size": str(spec.world_size), "workers": str(spec.nodes - 1),
        "image": spec.image, "max_restarts": str(spec.max_restarts), "port": str(spec.port),
        "cpus_per_task": str(spec.cpus_per_task), "time_limit": spec.time_limit,
        "gpu_line": f"#SBATCH --gpus-per-node={spec.nproc_per_node}\n" if spec.gpus else "",
        "resources": f'        {device}: "{per_node}"',
        "pod_resources": f'                    {device}: "{per_node}"',
        "rendered_by": f"helox launch-file {target} {spec.recipe} {args}"
                       f"{'' if spec.gpus else ' --cpu'}",
    }
