"""Precision: fp16 with dynamic loss scaling, bf16 autocast, the per-layer fp32 policy and
activation checkpointing, on tiny models (tier 1)."""

import copy
import json
import math

import pytest
import torch
import yaml
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from helox import allocator
from helox.cli import app
from helox.model.config import ModelConfig
from helox.data.loader import MicroBatch
from helox.errors import HeloxError
from helox.model.llama import Llama
from helox.observe.metrics import read_metrics
from helox.testing.tiny import tiny_config, tiny_raw_config
from helox.training.loop import train
from helox.training.precision import apply_precision_policy, describe_precision
from helox.training.step import make_loss_fn, make_scaler, pick_attention, train_step

CPU = torch.device("cpu")


def tiny_model(num_layers: int = 2, **overrides) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig(vocab_size=97, d_model=32, num_layers=num_layers, num_heads=4,
                             num_kv_heads=2, max_seq_len=24, **overrides))


def fixed_batches() -> list[MicroBatch]:
    """8 random sequences to memorise: the loss falls from ~ln(97) towards 0."""
    tokens = torch.randint(0, 97, (8, 17), generator=torch.Generator().manual_seed(1))
    return [MicroBatch(rows[:, :-1], rows[:, 1:]) for rows in tokens.split(4)]


def setup(precision: str, **scaler_options):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    scaler = make_scaler(precision, CPU, **scaler_options) if scaler_options else None
    return model, optimizer, make_loss_fn(model, CPU, precision), scaler


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return [t.detach().clone() for t in [*model.parameters(), *moments]]


def unchanged(before: list[torch.Tensor], model, optimizer) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, snapshot(model, optimizer)))


# ---------------------------------------------------------------------------------------------
# fp16 and the loss scaler


def test_scaler_only_for_fp16():
    assert make_scaler("bf16", CPU) is None and make_scaler("fp32", CPU) is None
    assert isinstance(make_scaler("fp16", CPU), torch.amp.GradScaler)


def test_fp16_scale_grows_after_clean_steps_and_halves_on_a_nan_step_without_an_update():
    model, optimizer, loss_fn, scaler = setup("fp16", init_scale=2.0**10, growth_interval=3)
    batches = fixed_batches()
    scales = [train_step(loss_fn, model, optimizer, batches, 1.0, scaler=scaler).loss_scale
              for _ in range(4)]
    assert scales == [2.0**10] * 3 + [2.0**11]  # grew after 3 clean steps
    before = snapshot(model, optimizer)
    def nan_loss_fn(batch):  # a NaN loss, as FaultInjector makes one
        return {name: value * float("nan") for name, value in loss_fn(batch).items()}

    poisoned = train_step(nan_loss_fn, model, optimizer, batches, 1.0, scaler=scaler)
    assert poisoned.skip_reason == "nonfinite" and poisoned.loss_scale == 2.0**11
    assert not poisoned.overflowed  # a NaN loss is a fault, not the scaler probing
    assert unchanged(before, model, optimizer)  # no update: weights and AdamW moments as they were
    assert scaler.get_scale() == 2.0**10  # backed off
    # The growth count restarted: three more clean steps before the scale doubles again.
    scales = [train_step(loss_fn, model, optimizer, batches, 1.0, scaler=scaler).loss_scale
              for _ in range(4)]
    assert scales == [2.0**10] * 3 + [2.0**11]


def test_fp16_gradient_overflow_backs_off_until_the_step_fits():
    """A scale too large for fp16 makes the scaled gradients inf although the loss is finite:
    those steps are skipped and the scale halves until the gradients fit."""
    model, optimizer, loss_fn, scaler = setup("fp16", init_scale=2.0**28)
    before = snapshot(model, optimizer)
    first = train_step(loss_fn, model, optimizer, fixed_batches(), 1.0, scaler=scaler)
    assert first.skip_reason == "nonfinite" and math.isfinite(first.loss) and first.overflowed
    assert unchanged(before, model, optimizer)
    assert scaler.get_scale() == 2.0**27
    outcomes = [train_step(loss_fn, model, optimizer, fixed_batches(), 1.0, scaler=scaler)
                for _ in range(10)]
    assert not outcomes[-1].skipped and outcomes[-1].loss_scale < 2.0**27


def test_a_nonfinite_loss_with_finite_gradients_still_backs_off():
    """An inf term without gradient: the scaler's own check (on the gradients) sees nothing,
    the step is skipped all the same and the scale must not grow on it."""
    model, optimizer, loss_fn, scaler = setup("fp16", init_scale=2.0**10, growth_interval=1)

    def with_inf(batch):
        return {name: value + float("inf") for name, value in loss_fn(batch).items()}

    before = snapshot(model, optimizer)
    outcome = train_step(with_inf, model, optimizer, fixed_batches(), None, scaler=scaler)
    assert outcome.skip_reason == "nonfinite" and math.isfinite(outcome.grad_norm)
    assert unchanged(before, model, optimizer)
    assert scaler.get_scale() == 2.0**9


def test_a_gate_rejected_fp16_step_does_not_back_off_the_scale():
    model, optimizer, loss_fn, scaler = setup("fp16", init_scale=2.0**10)
    train_step(loss_fn, model, optimizer, fixed_batches(), 1.0, scaler=scaler)
    before = snapshot(model, optimizer)
    outcome = train_step(loss_fn, model, optimizer, fixed_batches(), 1.0, scaler=scaler,
                         gate=lambda loss, norm: "spike")
    assert outcome.skip_reason == "spike" and unchanged(before, model, optimizer)
    assert scaler.get_scale() == 2.0**10


def test_fp16_reports_unscaled_loss_and_gradient_norm():
    batches = fixed_batches()
    model, optimizer, loss_fn, scaler = setup("fp16", init_scale=2.0**12)
    with torch.no_grad():
        direct = sum(loss_fn(b)["lm"] for b in batches).item() / 8 / 16
    scaled = train_step(loss_fn, model, optimizer, batches, None, scaler=scaler)
    model, optimizer, loss_fn, _ = setup("fp16")
    plain = train_step(loss_fn, model, optimizer, batches, None)  # fp16 autocast, no scaler
    assert plain.loss_scale is None and scaled.loss_scale == 2.0**12
    assert scaled.loss == pytest.approx(direct, rel=1e-6)
    assert scaled.loss == pytest.approx(plain.loss, rel=1e-6)
    assert scaled.grad_norm == pytest.approx(plain.grad_norm, rel=1e-3)


def test_fp16_training_converges_like_fp32():
    """40 steps memorising 8 sequences (loss 4.56 -> 1.39): fp16 with the scaler ends within
    1% of fp32 (measured: 0.015% apart; bf16 0.27%)."""
    final = {}
    for precision in ("fp32", "fp16"):
        model, optimizer, loss_fn, scaler = setup(
            precision, **({"init_scale": 2.0**10, "growth_interval": 5}
                          if precision == "fp16" else {}))
        outcomes = [train_step(loss_fn, model, optimizer, fixed_batches(), 1.0, scaler=scaler)
                    for _ in range(40)]
        assert not any(o.skipped for o in outcomes)
        final[precision] = outcomes[-1].loss
    assert final["fp32"] < 0.4 * math.log(97)
    assert final["fp16"] == pytest.approx(final["fp32"], rel=0.01)


def test_bf16_autocast_trains():
    model, optimizer, loss_fn, _ = setup("bf16")
    dtypes = []
    model.lm_head.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    outcomes = [train_step(loss_fn, model, optimizer, fixed_batches(), 1.0) for _ in range(20)]
    assert set(dtypes) == {torch.bfloat16}  # autocast really ran the head in bf16
    assert outcomes[-1].loss < 0.7 * outcomes[0].loss


# ---------------------------------------------------------------------------------------------
# Per-layer precision policy


def record_dtypes(model: nn.Module) -> dict[str, tuple[torch.dtype, torch.dtype]]:
    """name -> (dtype of the first input, dtype of the output), filled by the next forward."""
    seen = {}

    def hook(name: str, args: tuple, out: torch.Tensor) -> None:
        seen.setdefault(name, (args[0].dtype, out.dtype))

    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(lambda m, args, out, name=name: hook(name, args, out))
    return seen


def forward_bf16(model: nn.Module) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(torch.randint(0, 97, (2, 12)))


def test_policy_modules_compute_in_fp32_under_bf16_autocast_and_the_others_in_bf16():
    model = tiny_model(tie_embeddings=False)
    patterns = ["*norm", "lm_head", "blocks.0.mlp", "*.up_proj", "blocks.1.attn.o_proj"]
    wrapped = apply_precision_policy(model, patterns, "cpu")
    # blocks.0.mlp covers its own up_proj; only blocks.1's is wrapped on its own.
    assert wrapped == ["blocks.0.attn_norm", "blocks.0.mlp_norm", "blocks.0.mlp",
                       "blocks.1.attn_norm", "blocks.1.attn.o_proj", "blocks.1.mlp_norm",
                       "blocks.1.mlp.up_proj", "norm", "lm_head"]
    seen = record_dtypes(model)
    logits = forward_bf16(model)
    assert logits.dtype == torch.float32
    fp32 = (torch.float32, torch.float32)
    for name in ["norm", "blocks.1.mlp_norm", "lm_head", "blocks.0.mlp", "blocks.1.mlp.up_proj",
                 "blocks.0.mlp.gate_proj", "blocks.0.mlp.down_proj"]:  # the last two inside
        assert seen[name] == fp32, name
    # Fed bf16 attention output, it computes in fp32 (a bf16 input on its fp32 weight with
    # autocast off would not even run):
    assert seen["blocks.1.attn.o_proj"] == (torch.bfloat16, torch.float32)
    for name in ["blocks.0.attn.q_proj", "blocks.0.attn.o_proj", "blocks.1.mlp.gate_proj",
                 "blocks.1.mlp.down_proj"]:
        assert seen[name][1] == torch.bfloat16, name


def test_without_a_policy_the_head_computes_in_bf16():
    model = tiny_model()
    seen = record_dtypes(model)
    assert forward_bf16(model).dtype == torch.bfloat16
    assert seen["lm_head"][1] == torch.bfloat16


def test_policy_keeps_state_dict_names_survives_deepcopy_and_applies_once():
    model = tiny_model()
    keys = list(model.state_dict())
    apply_precision_policy(model, ["lm_head"], "cpu")
    apply_precision_policy(model, ["lm_head"], "cpu")
    assert list(model.state_dict()) == keys
    assert type(model.lm_head).__mro__[1] is nn.Linear  # wrapped once
    ema = copy.deepcopy(model)  # what AveragedModel does
    assert forward_bf16(ema).dtype == torch.float32


def test_a_pattern_matching_nothing_names_the_modules_there_are():
    with pytest.raises(HeloxError) as error:
        apply_precision_policy(tiny_model(), ["*norm", "blocks.*.atn"], "cpu")
    message = str(error.value)
    assert "['blocks.*.atn']" in message and "blocks.*.attn.q_proj" in message
    assert "blocks.0.attn" not in message  # indices folded, the list stays short


def test_describe_precision_rows():
    model = tiny_model()
    rows = {r.name: r for r in describe_precision(model, "bf16", ["*norm", "blocks.1.attn.q_proj"])}
    assert list(rows) == ["embed", "blocks.0.attn_norm", "blocks.0.attn", "blocks.0.mlp_norm",
                          "blocks.0.mlp", "blocks.1.attn_norm", "blocks.1.attn",
                          "blocks.1.mlp_norm", "blocks.1.mlp", "norm", "lm_head"]
    assert rows["norm"].compute == "fp32 (policy)" and rows["blocks.0.attn"].compute == "bf16"
    assert rows["blocks.1.attn"].compute == "bf16; fp32: q_proj"
    assert rows["embed"].compute == "fp32"  # a lookup: autocast lowers nothing in it
    assert rows["lm_head"].kind == "Linear (tied)" and rows["lm_head"].params == 0
    assert sum(r.params for r in rows.values()) == model.num_params()
    assert {r.compute for r in describe_precision(model, "fp32", ["*norm"])} == {"fp32"}


def test_policy_and_checkpointing_compile_without_graph_breaks():
    """fullgraph: the fp32 wrapper and the checkpointed blocks trace into one graph
    (aot_eager: the same tracing as inductor, without its minutes of C++ compiles on CPU)."""
    eager = tiny_model()
    for model in (eager, compiled := copy.deepcopy(eager)):
        apply_precision_policy(model, ["*norm", "lm_head"], "cpu")
        model.set_activation_checkpointing(True)
    torch._dynamo.reset()
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    tokens = torch.randint(0, 97, (2, 12))
    outputs = []
    for model in (eager, fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
        logits.float().square().mean().backward()
        outputs.append(logits)
    assert outputs[1].dtype == torch.float32
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    # The compiled backward rounds to bf16 at other points (measured: at most 0.9% apart per
    # parameter, the same with checkpointing off; in fp32 the gradients are bitwise equal).
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert (b.grad - a.grad).norm() < 0.02 * a.grad.norm()


# ---------------------------------------------------------------------------------------------
# Activation checkpointing


def saved_bytes_and_grads(model: Llama, tokens: torch.Tensor, precision: str):
    """Bytes of activations autograd keeps for the backward (the weights it also references
    cost nothing extra), and the gradients."""
    saved = []
    weights = {p.data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return sum(saved), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointed_blocks_give_identical_gradients_and_keep_fewer_activations(precision):
    tokens = torch.randint(0, 97, (4, 21), generator=torch.Generator().manual_seed(2))
    plain = tiny_model(num_layers=4).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_activation_checkpointing(True)
    bytes_plain, grads_plain = saved_bytes_and_grads(plain, tokens, precision)
    bytes_ckpt, grads_ckpt = saved_bytes_and_grads(checkpointed, tokens, precision)
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_ckpt))  # bitwise
    # 4 blocks of a 32-wide model, measured: 151 kB kept instead of 1,436 kB in fp32 (10.5%),
    # 152 kB instead of 1,023 kB in bf16; only each block's input stays.
    assert bytes_ckpt < 0.25 * bytes_plain
    some = copy.deepcopy(plain)
    some.set_activation_checkpointing([0, 2])
    assert bytes_ckpt < saved_bytes_and_grads(some, tokens, precision)[0] < bytes_plain


def test_checkpointing_is_off_in_eval_and_without_grad():
    model = tiny_model()
    model.set_activation_checkpointing(True)
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        train_logits = model.train()(tokens)
    torch.testing.assert_close(model.eval()(tokens), train_logits, rtol=0, atol=0)


def test_bad_checkpoint_indices_name_the_valid_range():
    with pytest.raises(HeloxError, match=r"\[2, -1\].*2 blocks: indices 0\.\.1"):
        tiny_model().set_activation_checkpointing([0, 2, -1])


# ---------------------------------------------------------------------------------------------
# helox train --dry-run


def write_recipe(tmp_path, **train) -> str:
    raw = tiny_raw_config(tmp_path / "ws")
    raw["model"]["vocab_size"] = 512  # set: no dataset to prepare
    raw["train"] |= train
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_dry_run_prints_the_layers_and_does_not_train(tmp_path):
    recipe = write_recipe(tmp_path, precision="bf16", activation_checkpointing=[1],
                          fp32_modules=["*norm", "lm_head"])
    result = CliRunner().invoke(app, ["train", recipe, "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    row = next(line for line in lines if "blocks.1.mlp " in line)
    assert "36,864" in row and "bf16" in row and "yes" in row
    assert "fp32 (policy)" in next(line for line in lines if "lm_head" in line)
    assert "yes" not in next(line for line in lines if "blocks.0.mlp " in line)
    assert "131,392 parameters" in result.stdout and "adamw state 1.0 MiB" in result.stdout
    assert not (tmp_path / "ws" / "runs").exists()
    plan = json.loads(CliRunner().invoke(app, ["train", recipe, "--dry-run", "--json"]).stdout)
    layers = {layer["module"]: layer for layer in plan["layers"]}
    assert layers["blocks.1.mlp"]["checkpointed"] and not layers["blocks.0.mlp"]["checkpointed"]
    assert layers["blocks.1.mlp"]["params"] == 36_864 and plan["num_params"] == 131_392
    assert plan["optimizer_state_bytes"] == 8 * 131_392 and plan["checkpointed_blocks"] == 1


def test_dry_run_refuses_a_pattern_matching_nothing(tmp_path):
    recipe = write_recipe(tmp_path, fp32_modules=["*nrom"])
    result = CliRunner().invoke(app, ["train", recipe, "--dry-run"])
    assert isinstance(result.exception, HeloxError)
    assert "*nrom" in str(result.exception)


# ---------------------------------------------------------------------------------------------
# The attention kernel


def test_the_attention_kernel_is_chosen_by_device_and_precision():
    cuda = torch.device("cuda")
    assert pick_attention("auto", CPU, "bf16", 256) == "math"
    assert pick_attention("auto", CPU, "fp16", 32) == "math"
    assert pick_attention("auto", CPU, "bf16", 512) == "sdpa"  # T² scores cost more there
    assert pick_attention("auto", CPU, "fp32", 256) == "sdpa"
    assert pick_attention("auto", cuda, "bf16", 256) == "sdpa"
    assert pick_attention("sdpa", CPU, "bf16", 256) == "sdpa"
    assert pick_attention("math", CPU, "fp32", 2048) == "math"


def test_math_attention_compiles_into_one_graph_with_the_policy():
    eager = tiny_model()
    eager.set_attention("math")
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        apply_precision_policy(model, ["*norm"], "cpu")
    torch._dynamo.reset()
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    tokens = torch.randint(0, 97, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fn(tokens), eager(tokens), rtol=0, atol=0)


def test_a_run_records_its_attention_kernel_and_both_train_alike(tmp_path, tiny_dataset,
                                                                 workspace):
    """And whether freed memory was kept (helox.allocator; the sdpa run turns it off)."""
    losses = {}
    for kernel in ("auto", "sdpa"):
        run_dir = tmp_path / kernel
        config = tiny_config(workspace, ["train.precision=bf16", f"train.attention={kernel}",
                                         "train.max_steps=6", "train.eval_every_steps=0",
                                         f"train.reuse_memory={kernel == 'auto'}"])
        train(config, run_dir, tiny_dataset, console=Console(quiet=True))
        run_info = json.loads((run_dir / "run.json").read_text())
        assert run_info["attention"] == ("math" if kernel == "auto" else "sdpa")
        assert run_info["reuse_memory"] == (kernel == "auto" and allocator.available())
        losses[kernel] = [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl")
                          if "loss" in m]
    assert losses["auto"] == pytest.approx(losses["sdpa"], rel=0.01)  # bf16 rounding apart
    plan = json.loads(CliRunner().invoke(app, ["train", write_recipe(tmp_path, precision="bf16"),
                                               "--dry-run", "--json"]).stdout)
    assert plan["attention"] == "math" and plan["reuse_memory"] == allocator.available()


def test_compiled_bf16_math_attention_gives_finite_gradients_like_eager():
    """Inductor on CPU once turned the keys' gradient into NaN where rotated keys (RoPE in its
    cat([-x2, x1]) form) fed math attention in bf16 at head dim 64: every step was rejected.
    apply_rope's half-by-half form compiles to the eager gradients (within bf16 rounding)."""
    grads = {}
    tokens = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(1))
    for mode in ("eager", "inductor"):
        torch.manual_seed(0)  # the shape that showed it (the reference shape's head dim 64)
        model = Llama(ModelConfig(vocab_size=512, d_model=384, num_layers=1, num_heads=6,
                                  d_ffn=768, max_seq_len=64, tie_embeddings=False))
        model.set_attention("math")
        loss_fn = make_loss_fn(model, CPU, "bf16")
        if mode == "inductor":
            torch._dynamo.reset()
            loss_fn = torch.compile(loss_fn)
        loss_fn(MicroBatch(tokens[:, :-1], tokens[:, 1:]))["lm"].backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["eager"].items():
        compiled_grad = grads["inductor"][name]
        assert torch.isfinite(compiled_grad).all(), name
        assert (compiled_grad - grad).norm() < 0.05 * grad.norm(), name
