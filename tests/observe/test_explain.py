"""`helox explain`: attention maps against transformers' eager attention, the logit lens against
a hand-run forward, hooks and modes left as found, and the files of a real run's explanation."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from tokenizers import Tokenizer
from typer.testing import CliRunner

from helox.cli import app
from helox.model.config import ModelConfig
from helox.errors import HeloxError
from helox.model.hf import to_hf_config, to_hf_state_dict
from helox.model.llama import Llama
from helox.observe.explain import explain, explain_run, visible
from helox.testing.browser import find_chromium, render
from helox.testing.tiny import tiny_config
from helox.checkpoint import list_checkpoints
from helox.training.loop import train

VOCAB, T, TOP_K = 101, 20, 4
PROMPT = "In the beginning"


def tiny_model(seed: int = 0, **overrides) -> Llama:
    """GQA (4 query heads share 2 K/V heads), norms perturbed off 1 so the lens's norm counts."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=VOCAB, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                 max_seq_len=32, init_std=0.2, tie_embeddings=False)
    model = Llama(ModelConfig(**shape | overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.3)
    return model


def token_ids(seed: int = 1, length: int = T) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=generator).tolist()


# ---------------------------------------------------------------------------------------------
# The computation


@pytest.mark.parametrize("num_kv_heads", [2, None], ids=["gqa", "mha"])
def test_attention_maps_match_transformers_eager_attention(num_kv_heads):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(num_kv_heads=num_kv_heads).eval()
    cfg = model.cfg
    theirs = transformers.LlamaForCausalLM(to_hf_config(cfg, attn_implementation="eager")).eval()
    theirs.load_state_dict(to_hf_state_dict(model.state_dict(), cfg))
    ids = token_ids()
    with torch.no_grad():
        out = theirs(torch.tensor([ids]), output_attentions=True)
    expected_LHTT = torch.stack([a[0] for a in out.attentions]).numpy()

    explanation = explain(model, ids, TOP_K)

    assert explanation.attention_LHTT.shape == (cfg.num_layers, cfg.num_heads, T, T)
    assert explanation.attention_LHTT.dtype == np.float32
    np.testing.assert_allclose(explanation.attention_LHTT, expected_LHTT, atol=1e-5, rtol=0)
    # The entropy is that of these very weights: -sum p log p over keys, mean over queries.
    p = expected_LHTT.astype(np.float64)
    entropy_LH = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1).mean(-1)
    np.testing.assert_allclose(explanation.attention_entropy_LH, entropy_LH, atol=1e-4)


def hand_residuals(model: Llama, ids: list[int]) -> list[torch.Tensor]:
    """The residual stream after the embedding and after each block, by calling the blocks
    one by one (no hooks): what the lens must read out."""
    tokens_1T = torch.tensor([ids])
    cos_TE, sin_TE = model.rope_cos[:len(ids)], model.rope_sin[:len(ids)]
    x_1TD = model.embed(tokens_1T)
    residuals = [x_1TD]
    for block in model.blocks:
        x_1TD = block(x_1TD, cos_TE, sin_TE)
        residuals.append(x_1TD)
    return residuals


def test_logit_lens_reads_each_residual_through_the_final_norm_and_head():
    model = tiny_model().eval()
    ids = token_ids()
    explanation = explain(model, ids, TOP_K)
    S = model.cfg.num_layers + 1
    assert explanation.lens_top_ids_STK.shape == (S, T, TOP_K)
    assert explanation.lens_next_prob_SN.shape == (S, T - 1)

    with torch.no_grad():
        final_TV = model(torch.tensor([ids]))[0].softmax(-1)
        by_hand_STV = torch.stack([model.lm_head(model.norm(x))[0].softmax(-1)
                                   for x in hand_residuals(model, ids)])
    torch.testing.assert_close(by_hand_STV[-1], final_TV)  # the hand forward is the forward
    for s in [0, 1, S - 1]:  # the embedding, an intermediate block, the model's output
        expected = by_hand_STV[s].topk(TOP_K, dim=-1)
        np.testing.assert_array_equal(explanation.lens_top_ids_STK[s], expected.indices.numpy())
        np.testing.assert_allclose(explanation.lens_top_probs_STK[s], expected.values.numpy(),
                                   atol=1e-6)
        next_N = by_hand_STV[s, torch.arange(T - 1), torch.tensor(ids[1:])]
        np.testing.assert_allclose(explanation.lens_next_prob_SN[s], next_N.numpy(), atol=1e-6)
    probs_STK = explanation.lens_top_probs_STK
    assert (np.diff(probs_STK, axis=-1) <= 0).all() and (probs_STK > 0).all()
    assert (probs_STK.sum(-1) <= 1 + 1e-5).all()
    # Layers differ: the lens is not the output copied into every row.
    assert not np.allclose(explanation.lens_top_probs_STK[0], explanation.lens_top_probs_STK[-1])


def test_top_k_is_clamped_to_the_vocabulary_and_must_be_positive():
    explanation = explain(tiny_model(), token_ids(length=5), top_k=VOCAB + 50)
    assert explanation.lens_top_ids_STK.shape[-1] == VOCAB
    np.testing.assert_allclose(explanation.lens_top_probs_STK.sum(-1), 1, atol=1e-5)
    with pytest.raises(HeloxError, match="top_k"):
        explain(tiny_model(), token_ids(length=5), top_k=0)


def all_forward_hooks(model: Llama) -> list:
    return [hook for module in model.modules()
            for hook in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]]


def test_hooks_are_removed_and_training_modes_restored_even_after_a_failure():
    model = tiny_model().train()
    model.blocks[1].eval()  # a mixed state: each module's own flag must come back
    modes = {name: m.training for name, m in model.named_modules()}

    explain(model, token_ids(), TOP_K)
    assert all_forward_hooks(model) == []
    assert {name: m.training for name, m in model.named_modules()} == modes

    with pytest.raises(IndexError):  # a token id outside the vocabulary fails mid-forward
        explain(model, [0, VOCAB + 3], TOP_K)
    assert all_forward_hooks(model) == []
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_a_bf16_model_is_explained_in_fp32_and_left_in_bf16():
    model = tiny_model()
    fp32 = explain(model, token_ids(), TOP_K)
    model.to(torch.bfloat16)
    half = explain(model, token_ids(), TOP_K)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert half.attention_LHTT.dtype == np.float32
    # The same bf16-rounded weights in fp32: close to the fp32 model, not equal to it.
    np.testing.assert_allclose(half.attention_LHTT, fp32.attention_LHTT, atol=0.05)


def test_visible_marks_whitespace_and_empty_text():
    assert visible(" the\n") == "␣the⏎"
    assert visible("") == "∅"
    assert visible("abcdefgh", max_chars=4) == "abc…"


# ---------------------------------------------------------------------------------------------
# A real run, through the CLI


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, workspace, tmp_path_factory):
    config = tiny_config(workspace, ["train.max_steps=4", "checkpoint.every_steps=4",
                                     "train.eval_every_steps=4"])
    run_dir = tmp_path_factory.mktemp("explain") / "run"
    train(config, run_dir, tiny_dataset, console=Console(quiet=True))
    return run_dir, config


def assert_picture(path, min_px: int = 200) -> None:
    """A PNG that opens, is not tiny and is not one flat colour."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_px, image.size
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_explain_command_writes_pictures_json_and_a_page_that_renders(trained_run, tmp_path):
    run_dir, config = trained_run
    result = CliRunner().invoke(app, ["explain", str(run_dir), "--prompt", PROMPT])
    assert result.exit_code == 0, result.output
    checkpoint = list_checkpoints(run_dir)[0]
    prompt_hash = hashlib.sha256(PROMPT.encode()).hexdigest()[:8]
    folder = run_dir / "explain" / f"{checkpoint.name}-{prompt_hash}"
    assert str(folder / "explain.html") in result.output.replace("\n", "")

    L, H = config.model.num_layers, config.model.num_heads
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    expected_ids = [tokenizer.token_to_id(config.tokenizer.eos_token),
                    *tokenizer.encode(PROMPT).ids]
    summary = json.loads((folder / "explain.json").read_text(encoding="utf-8"))
    assert summary["prompt"] == PROMPT and summary["step"] == 4
    assert summary["checkpoint"] == str(checkpoint)
    assert summary["token_ids"] == expected_ids
    assert "".join(summary["tokens"]) == config.tokenizer.eos_token + PROMPT
    entropy_LH = np.array(summary["attention_entropy_nats"])
    assert entropy_LH.shape == (L, H) == (summary["num_layers"], summary["num_heads"])
    assert (entropy_LH >= 0).all() and (entropy_LH <= math.log(len(expected_ids))).all()
    lens = summary["logit_lens"]
    assert lens["rows"] == ["embed", *(f"block {layer}" for layer in range(L))]
    assert np.array(lens["top_probs"]).shape == (L + 1, len(expected_ids), 5)
    assert np.array(lens["next_token_prob"]).shape == (L + 1, len(expected_ids) - 1)
    assert lens["top_tokens"][-1][0][0] == tokenizer.decode([lens["top_ids"][-1][0][0]],
                                                         skip_special_tokens=False)

    assert sorted(p.name for p in folder.glob("*.png")) == [
        *(f"attention_layer{layer}.png" for layer in range(L)), "logit_lens.png"]
    for png in folder.glob("*.png"):
        assert_picture(png)

    if find_chromium() is None:
        pytest.skip("no Chromium on PATH to render explain.html: `make chromium` installs it")
    rendered = render(folder / "explain.html", screenshot=tmp_path / "explain.png")
    assert rendered.errors == ""
    assert rendered.charts_rendered == rendered.charts_expected == L + 2
    assert_picture(tmp_path / "explain.png")


def test_a_checkpoint_folder_and_a_long_prompt_are_cropped_with_a_warning(trained_run, tmp_path):
    run_dir, config = trained_run
    warnings = []
    folder = explain_run(list_checkpoints(run_dir)[0], "the " * 200, tmp_path / "out",
                         top_k=2, warn=warnings.append)
    assert folder == tmp_path / "out"
    summary = json.loads((folder / "explain.json").read_text(encoding="utf-8"))
    assert len(summary["token_ids"]) == config.model.max_seq_len == 64
    assert len(warnings) == 1 and "explaining the first 64" in warnings[0]
    assert np.array(summary["logit_lens"]["top_ids"]).shape[-1] == 2
    assert_picture(folder / "attention_layer0.png")  # unlabelled axes at 64 tokens


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_an_empty_prompt_is_refused_before_loading_anything(tmp_path):
    with pytest.raises(HeloxError, match="prompt is empty") as info:
        explain_run(tmp_path / "no-such-run", "")
    assert "--prompt" in info.value.hint


def test_a_run_without_checkpoints_is_refused_with_a_hint(tmp_path):
    with pytest.raises(HeloxError, match="no valid checkpoint") as info:
        explain_run(tmp_path, PROMPT)
    assert "train" in info.value.hint
    with pytest.raises(HeloxError, match="does not exist") as info:
        explain_run(tmp_path / "missing", PROMPT)
    assert info.value.hint
