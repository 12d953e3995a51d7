"""`helox import-hf`: a transformers Llama (folder, or GGUF file) → a Helox run folder with one
checkpoint and a recipe that fine-tunes it."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from helox.chat.templates import TEMPLATE_FILE, ChatTemplate
from helox.checkpoint import TOKENIZER_FILE, checkpoint_dir, snapshot, write_snapshot
from helox.config import RunConfig
from helox.errors import HeloxError
from helox.export.hf import publish, require_transformers, staging_folder
from helox.checkpoint.fingerprint import model_fingerprint
from helox.fileio import sha256_files, sha256_json
from helox.model.hf import from_hf_config, from_hf_state_dict
from helox.model.llama import Llama
from helox.resources import corpus_dir

FINETUNE_RECIPE = "finetune.yaml"
FINETUNE_SEQ_LEN = 256


def load_transformers_llama(source: Path):
    """(model in fp32, its fast tokenizer) from a folder or a .gguf file, offline."""
    transformers = require_transformers()
    if not source.exists():
        raise HeloxError(f"{source} does not exist",
                         hint="pass a transformers model folder (config.json + weights + "
                              "tokenizer) or a .gguf file")
    folder, extra = (source.parent, {"gguf_file": source.name}) if source.is_file() else \
        (source, {})
    if source.is_file() and source.suffix != ".gguf":
        raise HeloxError(f"{source} is a file but not a .gguf",
                         hint="pass the model's folder, or a GGUF file")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise HeloxError(f"{source}: transformers cannot read its config ({exc})",
                         hint="a Hugging Face model folder has a config.json") from None
    if config.model_type != "llama":
        raise HeloxError(f"{source} is a '{config.model_type}' model; only Llama imports",
                         hint="Helox's model is the Llama architecture (SmolLM2, TinyLlama, "
                              "Llama 2/3 without RoPE scaling)")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32, **extra).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                           **extra)
    if not getattr(tokenizer, "is_fast", False):
        raise HeloxError(f"{source}: the tokenizer is not a fast (tokenizer.json) one",
                         hint="Helox runs tokenizers through Hugging Face `tokenizers`; "
                              "save the tokenizer with a tokenizer.json")
    return model, tokenizer


def source_digest(source: Path) -> str:
    """sha256 of the source's weight files (a GGUF file itself), for the lineage."""
    files = [source] if source.is_file() else sorted(
        [*source.glob("*.safetensors"), *source.glob("*.bin")])
    return sha256_files(files)


def finetune_raw_config(name: str, model_cfg: dict, tokenizer_json: Path, eos_token: str,
                        checkpoint: Path) -> dict:
    """A recipe that starts from the imported checkpoint. Its data is the bundled corpus
    (inside the installed package): replace `data` with your own documents."""
    max_seq_len = model_cfg["max_seq_len"]
    corpus = {"train": [{"path": str(corpus_dir() / "train.jsonl.xz")}],
              "val": [{"path": str(corpus_dir() / "val.jsonl.xz")}]}
    return {
        "name": f"{name}-finetune",
        "data": {"name": f"{name}-finetune", **corpus},
        "tokenizer": {"path": str(tokenizer_json.resolve()), "eos_token": eos_token},
        "model": model_cfg,
        "train": {"init_from": str(checkpoint.resolve()), "init_optimizer": False,
                  "max_steps": 100,
                  "micro_batch_size": 4, "seq_len": min(FINETUNE_SEQ_LEN, max_seq_len),
                  "eval_every_steps": 50, "eval_batches": 4},
        "optim": {"lr": 3.0e-5, "warmup_steps": 10, "weight_decay": 0.0},
        "checkpoint": {"every_steps": 50, "keep_last": 2},
    }


def import_transformers_model(source: Path, out_dir: Path, overwrite: bool) -> Path:
    hf_model, hf_tokenizer = load_transformers_llama(source)
    model_cfg = from_hf_config(hf_model.config)
    model = Llama(model_cfg)
    state = from_hf_state_dict(hf_model.state_dict(), model_cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    staging = staging_folder(out_dir, overwrite)
    tokenizer_json = staging / "tokenizer.json"
    hf_tokenizer.backend_tokenizer.save(str(tokenizer_json))
    eos_token = hf_tokenizer.eos_token or hf_tokenizer.pad_token
    if eos_token is None:
        raise HeloxError(f"{source}: the tokenizer names no end-of-sequence token",
                         hint="set eos_token in its tokenizer_config.json")
    if isinstance(hf_tokenizer.chat_template, str):  # its own chat template, for fine-tuning
        ChatTemplate("tokenizer", hf_tokenizer.chat_template,
                     tuple(sorted(hf_tokenizer.special_tokens_map.items()))).save(
            staging / TEMPLATE_FILE)
    name = (source.stem if source.is_file() else source.name).replace(" ", "-")
    model_dict = model_cfg.model_dump(mode="json")
    final_checkpoint = checkpoint_dir(out_dir, 0)
    raw = finetune_raw_config(name, model_dict, Path(out_dir) / "tokenizer.json", eos_token,
                              final_checkpoint)
    (staging / FINETUNE_RECIPE).write_text(
        f"# Fine-tunes {source} (imported by `helox import-hf`). Replace `data` with your\n"
        f"# documents; `helox train {Path(out_dir) / FINETUNE_RECIPE}`.\n"
        + yaml.safe_dump(raw, sort_keys=False))
    # The checkpoint's config names the files where they will be once published.
    config = RunConfig.model_validate(raw, context={"check_files": False})
    fingerprint = model_fingerprint(model)
    run_info = {"fingerprint": fingerprint, "config_sha256": sha256_json(
                    config.model_dump(mode="json")),
                "dataset_version": "", "imported_from": str(source),
                "parent_model": f"{source}@sha256:{source_digest(source)}",
                "resume_key": ""}
    snap = snapshot(0, {"model": model}, config.model_dump(mode="json"), run_info,
                    extra_files={TOKENIZER_FILE: tokenizer_json})
    write_snapshot(staging, snap, keep_last=1, keep_best=False)
    publish(staging, Path(out_dir))
    return final_checkpoint


def import_hf(source: Path, out_dir: Path, overwrite: bool = False) -> Path:
    """Convert a transformers Llama folder (or a GGUF file transformers reads, dequantized to
    fp32) into `out_dir`: a run folder with one checkpoint (step 0) and `finetune.yaml`, a
    recipe that fine-tunes it (`helox train out_dir/finetune.yaml`). Returns the checkpoint."""
    return import_transformers_model(Path(source), Path(out_dir), overwrite)
