"""Serving throughput: the continuously batched engine (KV cache, one forward per token for all
active requests) against its naive mode (no cache, no batching: one request at a time, the
whole context recomputed for every token), on the same model and requests.

What is measured: wall time from submitting N concurrent greedy requests (default 8, prompts of
24–45 tokens) to the last one's end, each generating exactly M new tokens (default 64; no stop
token, so every request runs to max_tokens), and the generated tokens per second. The model is
a randomly initialised Llama of ~10M parameters (10 layers, d_model 256, 8 heads, 4 KV heads,
vocab 8192 tied, context 512) in fp32 on the CPU (or --device), the tokenizer a BPE trained on
a slice of the bundled corpus (detokenization is part of serving). Each engine first serves one
short warm-up request, not timed. The greedy outputs of the two modes are compared.

    python bench/serve_engine.py                      # 8 requests x 64 tokens, CPU
    python bench/serve_engine.py --requests 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import lzma
import time
from itertools import islice

import torch

from helox.data.tokenizer import train_bpe
from helox.model.config import ModelConfig
from helox.model.llama import Llama
from helox.resources import corpus_dir
from helox.serve.engine import Engine
from helox.serve.sampling import SamplingParams

EOS = "<|endoftext|>"
CONFIG = ModelConfig(vocab_size=8192, d_model=256, num_layers=10, num_heads=8, num_kv_heads=4,
                     max_seq_len=512)


def corpus_texts(count: int) -> list[str]:
    with lzma.open(corpus_dir() / "train.jsonl.xz", "rt") as f:
        return [json.loads(line)["text"] for line in islice(f, count)]


def serve(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    """(seconds, outputs) of serving every prompt concurrently."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, stop_token_ids=frozenset())
    engine.submit(prompts[0][:4], SamplingParams(max_tokens=4, temperature=0)).result()
    started = time.perf_counter()
    handles = [engine.submit(prompt, params) for prompt in prompts]
    outputs = [handle.result().token_ids for handle in handles]
    return time.perf_counter() - started, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    texts = corpus_texts(2000)
    tokenizer = train_bpe(texts, CONFIG.vocab_size, 2, EOS)
    torch.manual_seed(0)
    model = Llama(CONFIG).eval().to(args.device)
    prompts = [tokenizer.encode(text).ids[:24 + 3 * i] for i, text in
               enumerate(texts[100:100 + args.requests])]
    generated = args.requests * args.new_tokens
    print(f"model: {model.num_params() / 1e6:.1f}M parameters, {args.device}, "
          f"{torch.get_num_threads()} threads; {args.requests} requests x {args.new_tokens} "
          f"new tokens, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    seconds, outputs = {}, {}
    for mode in ("batched", "naive"):
        with Engine(model, tokenizer, tokenizer.token_to_id(EOS), naive=mode == "naive",
                    max_batch_size=args.requests) as engine:
            seconds[mode], outputs[mode] = serve(engine, prompts, args.new_tokens)
        label = {"batched": "batched (KV cache)", "naive": "naive (no cache, one at a time)"}
        print(f"{label[mode]:34s} {seconds[mode]:7.2f} s  "
              f"{generated / seconds[mode]:8.1f} tokens/s")
    print(f"{'batched / naive throughput':34s} {seconds['naive'] / seconds['batched']:7.2f}x")
    print(f"identical greedy outputs: {outputs['batched'] == outputs['naive']}")

if __name__ == "__main__":
    main()
