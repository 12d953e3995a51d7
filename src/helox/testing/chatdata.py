"""Small fine-tuning setups for tests: conversation and preference files, and the overrides
of a tiny model that reads SmolLM2's tokenizer (so chat templates have their special tokens).

A tiny chat run trained from scratch on the conversations is a base that LoRA, SFT and DPO
runs start from (train.init_from), in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from helox.chat.parity import parity_split
from helox.chat.tooluse import tool_use_set

TINY_MODEL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4",
              "model.num_kv_heads=2", "model.max_seq_len=1024", "sample.prompts=[]"]
PAIR_ROW_TOKENS = 64


def write_chat_files(folder: Path, tokenizer, conversations: int = 16,
                     pairs: int = 48, held_out_pairs: int = 16) -> dict[str, Path]:
    """tokenizer.json (the given `tokenizers.Tokenizer`), chats.jsonl (tool-use
    conversations), pairs.jsonl and held_out.jsonl (preference pairs in a style a tiny model
    learns at once: the chosen answer says "Sure.", the rejected one "No.")."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.jsonl" for name in ("chats", "pairs", "held_out")}
    files["tokenizer"] = folder / "tokenizer.json"
    tokenizer.save(str(files["tokenizer"]))
    files["chats"].write_text("".join(json.dumps(c.model_dump(exclude_none=True)) + "\n"
                                      for c in tool_use_set(conversations, seed=5)))
    for name, split in zip(("pairs", "held_out"),
                           parity_split(seed=1, train=pairs, test=held_out_pairs)):
        files[name].write_text("".join(
            json.dumps({**pair, "chosen": "Sure.", "rejected": "No."}) + "\n" for pair in split))
    return files


def sft_overrides(files: dict[str, Path], *extra: str) -> list[str]:
    """A tiny chat run on the conversations (rows of 1024 tokens, assistant turns trained)."""
    return ["data.name=chats", f"data.train=[{{path: {files['chats']}, format: chat}}]",
            "data.val=[]", "data.chat.template=chatml", f"tokenizer.path={files['tokenizer']}",
            "tokenizer.eos_token=<|endoftext|>", "train.seq_len=1024",
            "train.document_masking=true", "train.eval_every_steps=0", "optim.warmup_steps=1",
            *TINY_MODEL, *extra]


def dpo_overrides(files: dict[str, Path], base: Path, *extra: str) -> list[str]:
    """A tiny DPO run on the pairs (one per 64-token row) from `base`."""
    return ["data.name=pairs", f"data.train=[{{path: {files['pairs']}, format: preference}}]",
            f"data.val=[{{path: {files['held_out']}, format: preference}}]",
            "data.chat.template=chatml", f"tokenizer.path={files['tokenizer']}",
            "tokenizer.eos_token=<|endoftext|>", f"train.seq_len={PAIR_ROW_TOKENS}",
            "train.micro_batch_size=8", "train.max_steps=8", "train.document_masking=true",
            f"train.init_from={base}", "optim.lr=5e-3", "optim.warmup_steps=1",
            "checkpoint.every_steps=4", "dpo={beta: 0.5}", *TINY_MODEL,
            "train.eval_every_steps=4", "train.eval_batches=2", *extra]
