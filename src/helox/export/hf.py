"""Export to a Hugging Face folder that `transformers` loads offline, and import of a
transformers Llama (a folder, or a GGUF file transformers can read) as a Helox checkpoint.

The exported tokenizer puts the end-of-document token first (it is also the BOS), because
Helox reads every document after one: `AutoTokenizer(text)` then gives the ids the model was
trained on, and `generate` continues a prompt the way `helox generate` does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from helox.errors import HeloxError
from helox.checkpoint.fingerprint import canonical_state
from helox.export.source import ExportSource
from helox.model.hf import to_hf_config, to_hf_state_dict

HF_WEIGHTS = "model.safetensors"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise HeloxError("the Hugging Face export needs transformers",
                         hint="pip install 'helox[hf]'") from None
    return transformers


def staging_folder(out_dir: Path, overwrite: bool) -> Path:
    """An empty sibling folder to write into; `publish` renames it to `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise HeloxError(f"{out_dir} exists and is not empty",
                         hint="choose another --out, or pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish(staging: Path, out_dir: Path) -> Path:
    """Replace `out_dir` by the finished staging folder (a reader never sees half a folder)."""
    if out_dir.exists():
        old = out_dir.with_name(f".old-{out_dir.name}")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)
    return out_dir


def write_hf(source: ExportSource, out_dir: Path, metadata: dict[str, str],
             overwrite: bool = False) -> Path:
    """config.json, generation_config.json, model.safetensors (fp32, the training metadata in
    its header), tokenizer.json + tokenizer_config.json, README.md."""
    transformers = require_transformers()
    out_dir = Path(out_dir)
    staging = staging_folder(out_dir, overwrite)
    cfg = source.model.cfg
    eos = source.eos_id
    config = to_hf_config(cfg, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                          architectures=["LlamaForCausalLM"])
    config.save_pretrained(staging)
    add_legacy_rope_theta(staging / "config.json", cfg.rope_theta)
    transformers.GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                                  do_sample=False).save_pretrained(staging)
    weights = to_hf_state_dict(canonical_state(source.model), cfg)
    save_file(weights, str(staging / HF_WEIGHTS), metadata={"format": "pt", **metadata})
    write_hf_tokenizer(source, staging)
    (staging / "README.md").write_text(model_card(source, metadata))
    return publish(staging, out_dir)


def add_legacy_rope_theta(config_json: Path, rope_theta: float) -> None:
    """transformers 5 writes RoPE's base inside `rope_parameters`; 4.x reads `rope_theta` at
    the top level and would silently take 10000 without it."""
    config = json.loads(config_json.read_text())
    config.setdefault("rope_theta", rope_theta)
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_hf_tokenizer(source: ExportSource, folder: Path) -> None:
    transformers = require_transformers()
    eos = source.eos_token
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=source.tokenizer, bos_token=eos, eos_token=eos, pad_token=eos,
        add_bos_token=True, model_max_length=source.model.cfg.max_seq_len)
    tokenizer.save_pretrained(folder)
    # transformers 5 names its own backend class; 4.x knows only the fast tokenizer's name,
    # which 5 still reads.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def model_card(source: ExportSource, metadata: dict[str, str]) -> str:
    cfg = source.model.cfg
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in sorted(metadata.items()))
    return (f"# {source.name} ({source.checkpoint.name})\n\n"
            f"A Llama-architecture model trained with Helox: {cfg.num_layers} layers, d_model "
            f"{cfg.d_model}, {cfg.num_heads} heads ({cfg.kv_heads} key-value), vocabulary "
            f"{cfg.vocab_size}, context {cfg.max_seq_len} tokens, "
            f"{source.model.num_params():,} parameters.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "tokenizer = AutoTokenizer.from_pretrained(FOLDER)\n"
            "model = AutoModelForCausalLM.from_pretrained(FOLDER)\n"
            "ids = tokenizer('And God said', return_tensors='pt').input_ids\n"
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0], "
            "skip_special_tokens=True))\n```\n\n"
            f"The tokenizer puts `{source.eos_token}` first: Helox reads every document after "
            "one, as its BOS.\n\n"
            "## Provenance\n\nAlso in `model.safetensors`' metadata; `helox provenance verify` "
            "checks them against the signed manifest.\n\n"
            f"| key | value |\n|---|---|\n{rows}\n")
