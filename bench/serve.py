"""`helox serve` under load over loopback: the continuously batched engine (KV cache) against
the same model served naively (no cache, no batching), in one run, under the same load and the
same chaos.

Each server serves MODEL's newest checkpoint as prod and an earlier checkpoint of the same run
as the canary candidate (automatic rollback off: the traffic mix must stay the same for both).
The load is `helox.testing.loadtest`: --clients concurrent clients (own user ids, the official
`openai` client, greedy completions of --max-tokens, every other one streamed, the first two
naming the current adapter once one is loaded) for --duration seconds, while a chaos task
loads a LoRA adapter, shifts the canary to 25%, swaps the adapter for another (new name; the
old one unloaded once no request names it) and shifts the canary to 50%. The adapters are
rank-8 adapters of the prod model with random weights (serving them costs what a trained one
costs). Each server first answers warm-up requests (one over HTTP, one on each
version's engine), not counted.

Reported per server: requests answered and failed, requests/s and generated tokens/s over the
run (from the first request to the last answer, requests in flight at the end included),
latency p50/p95/p99 and streamed time to first token p50/p95, answers per version; then the
batched / naive ratios. Clients, server and engine share one process (and its GIL) on the
same CPUs, as a loopback test does.

Without --model, a small model (d_model 256, 4 layers, context 256, 512-token BPE) is trained
for a few dozen steps in a temporary workspace: it needs real weights, not quality.

    python bench/serve.py                                   # 8 clients x 20 s, CPU
    python bench/serve.py --model workspace/runs/quickstart --clients 16 --duration 60
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from rich.console import Console

from helox.checkpoint import list_checkpoints, load_trained_model, resolve_checkpoint
from helox.checkpoint.fingerprint import model_fingerprint
from helox.data.prepare import prepare_dataset
from helox.finetune.lora import LoraConfig
from helox.serve.canary import CanaryConfig
from helox.serve.sampling import SamplingParams
from helox.serve.server import ServeConfig, open_state, serve_in_thread
from helox.testing.adapters import write_random_adapter
from helox.testing.loadtest import LoadConfig, Summary, chaos_plan, run_load
from helox.testing.tiny import tiny_config
from helox.training.loop import train

SMALL_MODEL = ["name=serve-bench", "model.d_model=256", "model.num_layers=4",
               "model.num_heads=8", "model.num_kv_heads=4", "model.max_seq_len=256",
               "train.seq_len=128", "train.max_steps=30", "train.eval_every_steps=30",
               "checkpoint.every_steps=10", "checkpoint.keep_last=3"]
ADAPTER = LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj"])
CANARY_PERCENTS = (25, 50)
NO_ROLLBACK = CanaryConfig(min_requests=1_000_000)
MODES = ("batched", "naive")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a Helox run folder (default: train a "
                        "small one in a temporary workspace)")
    parser.add_argument("--candidate", type=Path, help="the canary candidate (default: the "
                        "run's second-newest checkpoint)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of load per server (default 20)")
    parser.add_argument("--max-tokens", type=int, default=32,
                        help="max_tokens of every request (default 32)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="the batched engine's rows (default 8)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds, each serving batched then naive (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto (default cpu)")
    return parser.parse_args()


def small_run(workspace: Path) -> Path:
    """Train the small default model; returns its run folder."""
    config = tiny_config(workspace, SMALL_MODEL)
    run_dir = workspace / "runs" / "serve-bench"
    train(config, run_dir, prepare_dataset(config), console=Console(quiet=True))
    return run_dir


def earlier_checkpoint(run_dir: Path) -> Path:
    checkpoints = list_checkpoints(run_dir)
    if len(checkpoints) < 2:
        raise SystemExit(f"{run_dir} has {len(checkpoints)} checkpoint(s): pass --candidate")
    return checkpoints[1]


def write_adapters(run_dir: Path, into: Path) -> list[tuple[str, Path]]:
    """Two random-weight adapters of the run's newest checkpoint (a fresh adapter's B is zero,
    which would make the adapter a no-op)."""
    base = load_trained_model(resolve_checkpoint(run_dir, warn=print)).model
    fingerprint = model_fingerprint(base)
    return [(name, write_random_adapter(base, into / name, ADAPTER, seed, fingerprint,
                                        scale=0.05))
            for seed, name in enumerate(("bench-lora-1", "bench-lora-2"))]


def serve_under_load(mode: str, run_dir: Path, candidate: Path, adapters: list, workspace: Path,
                     args: argparse.Namespace) -> tuple[Summary, str]:
    """One server of `mode` under the load and chaos; (summary, the canary's state after)."""
    config = ServeConfig(model=str(run_dir), candidate=str(candidate), canary=NO_ROLLBACK,
                         workspace=workspace, device=args.device,
                         max_batch_size=args.max_batch_size, naive=mode == "naive")
    state = open_state(config)
    load = LoadConfig(clients=args.clients, duration_s=args.duration, max_tokens=args.max_tokens)
    with serve_in_thread(state) as served:
        model = state.router.prod.name
        warm_up(served.url, model, [d for _, d in state.router.deployments()])
        result = run_load(served.url, model, load,
                          chaos_plan(args.duration, adapters, CANARY_PERCENTS))
        canary = state.router.snapshot()
    return result.summary, f"canary at {canary['percent']:g}%, rolled back: " \
                           f"{canary['rolled_back'] or 'no'}"


def warm_up(url: str, model: str, deployments: list) -> None:
    """One request over HTTP and one on each engine, so first-call costs are not measured."""
    httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Warm", "max_tokens": 4},
               timeout=120).raise_for_status()
    for deployment in deployments:
        engine = deployment.engine
        engine.submit(engine.document_prompt("Warm up"), SamplingParams(max_tokens=4)).result()


def row(label: str, s: Summary) -> str:
    ms = [1e3 * s.latency_s[p] for p in ("p50", "p95", "p99")] + \
        [1e3 * s.ttft_s[p] for p in ("p50", "p95")]
    return (f"{label:<18} {s.requests:>8} {s.failed:>6} {s.requests_per_s:>7.1f} "
            f"{s.tokens_per_s:>9.0f} " + " ".join(f"{v:>8.0f}" for v in ms))


def print_results(runs: list[tuple[str, int, Summary, str]]) -> None:
    print(f"\n{'server':<18} {'requests':>8} {'failed':>6} {'req/s':>7} {'tokens/s':>9} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'TTFT p50':>8} {'TTFT p95':>8}")
    for mode, round_index, summary, _ in runs:
        print(row(f"{mode} (round {round_index + 1})", summary))
    print()
    for mode, round_index, summary, canary in runs:
        versions = ", ".join(f"{v}: {n}" for v, n in sorted(summary.by_version.items()))
        models = ", ".join(f"{m}: {n}" for m, n in sorted(summary.by_model.items()))
        print(f"{mode} round {round_index + 1}: answers by version {versions}; by model asked "
              f"{models}; {canary}")
        for failure in summary.failures[:10]:
            print(f"  FAILED {failure}")
    by_mode = {mode: [s for m, _, s, _ in runs if m == mode] for mode in MODES}
    pairs = list(zip(by_mode["batched"], by_mode["naive"]))
    print("\nbatched / naive (median over rounds):")
    for label, figure in (("requests/s", lambda s: s.requests_per_s),
                          ("tokens/s", lambda s: s.tokens_per_s),
                          ("latency p50", lambda s: s.latency_s["p50"]),
                          ("latency p95", lambda s: s.latency_s["p95"]),
                          ("latency p99", lambda s: s.latency_s["p99"]),
                          ("TTFT p50", lambda s: s.ttft_s["p50"]),
                          ("TTFT p95", lambda s: s.ttft_s["p95"])):
        ratio = statistics.median(figure(b) / figure(n) for b, n in pairs)
        print(f"  {label:<12} {ratio:6.2f}x")


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="helox-serve-bench-") as temp:
        workspace = Path(temp)
        run_dir = args.model or small_run(workspace)
        candidate = args.candidate or earlier_checkpoint(run_dir)
        adapters = write_adapters(run_dir, workspace / "adapters")
        plan = chaos_plan(args.duration, adapters, CANARY_PERCENTS)
        print(f"model {run_dir} (prod: newest checkpoint; candidate: {candidate.name}), "
              f"{args.device}, {torch.get_num_threads()} threads; {args.clients} clients x "
              f"{args.duration:g} s, max_tokens {args.max_tokens}, max_batch_size "
              f"{args.max_batch_size}; chaos: "
              + ", ".join(f"{s.describe()} at {s.at_s:.1f} s" for s in plan))
        runs = []
        for round_index in range(args.rounds):
            for mode in MODES:
                summary, canary = serve_under_load(mode, run_dir, candidate, adapters,
                                                   workspace, args)
                print(f"  round {round_index + 1}/{args.rounds} {mode:<8} "
                      f"{summary.requests} requests, {summary.failed} failed")
                runs.append((mode, round_index, summary, canary))
    print_results(runs)
    print(f"\nbenchmark time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
