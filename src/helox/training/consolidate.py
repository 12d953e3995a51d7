"""`helox checkpoint consolidate`: a multi-process job's checkpoint (format 3: shards in dcp/,
one file per rank) rewritten in the single-file form one process writes (format 2): full
weights in model.safetensors (and ema.safetensors), the optimizer in optimizer.pt, the trainer
state in state.pt. Every reader reads format 3 directly; this is for tools outside Helox, and
for a warm start of optimizer states (`train.init_optimizer`), which reads single files.

It lives beside the trainer because the optimizer's single-file form is indexed by the
trainer's own param groups, which are rebuilt here from the checkpoint's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from helox import checkpoint as ckpt
from helox.checkpoint.layout import (CHECKSUMS_FILE, CONFIG_FILE, FORMAT_FILE, RUN_INFO_FILE,
                                     STATE_FILE)
from helox.checkpoint.sharded import SHARDED, load_dcp_part
from helox.checkpoint.writer import Snapshot, host_optimizer_state, host_weights
from helox.errors import HeloxError
from helox.model.llama import Llama
from helox.training.optim import build_optimizer

if TYPE_CHECKING:  # the composition of configs sits above the trainer: annotations only
    from helox.config import RunConfig

BOOKKEEPING = {CHECKSUMS_FILE, CONFIG_FILE, FORMAT_FILE, RUN_INFO_FILE, STATE_FILE}


def consolidate(source: Path, out: Path, config: RunConfig) -> Path:
    """Checkpoint folder `source` (format 3), trained with `config` (its config.yaml), as a
    format-2 checkpoint folder `out`, verified first; returns `out`."""
    source = Path(source)
    problem = ckpt.verify_checkpoint(source)
    if problem:
        raise HeloxError(f"{source} is not a valid checkpoint: {problem}",
                         hint="pass another checkpoint folder of the run")
    parts = ckpt.read_format(source).get("parts", {})
    sharded = [name for name, file in parts.items() if file == SHARDED]
    if not sharded:
        raise HeloxError(f"{source} is already in the single-file form",
                         hint="copy it as it is; consolidate reads multi-process checkpoints")
    restored = ckpt.read_checkpoint(source, rank=0)
    run_info = ckpt.read_run_info(source)
    metadata = {"step": str(restored.step), "fingerprint": run_info.get("fingerprint", "")}
    model = Llama(config.model)
    weights, optimizers = {}, {}
    for name in sharded:  # the modules: the model and its EMA
        if name != "optimizer":
            module = model if name == "model" else Llama(config.model)
            load_dcp_part(source, name, module)
            weights[name] = host_weights(module, metadata)
    if "optimizer" in sharded:
        optimizers["optimizer"] = _optimizer(source, model, config)
    extra_files = {path.name: path for path in source.iterdir()
                   if path.is_file() and path.name not in BOOKKEEPING
                   and not path.name.startswith("rank-")}
    snap = Snapshot(step=restored.step, weights=weights, optimizers=optimizers,
                    state=restored.state, config=config.model_dump(mode="json"),
                    run_info=run_info, extra_files=extra_files, val_loss=None, copy_s=0.0)
    return ckpt.write_folder(Path(out), snap)


def _optimizer(source: Path, model: nn.Module, config: RunConfig) -> dict:
    optimizer = build_optimizer(model, config.optim)
    load_dcp_part(source, "optimizer", optimizer, model)
    return host_optimizer_state(optimizer, model)


def default_out(source: Path) -> Path:
    """RUN_DIR/consolidated/<checkpoint name> (outside checkpoints/, which the run owns)."""
    run_dir = ckpt.run_dir_of(source) or source.parent
    return run_dir / "consolidated" / source.name

