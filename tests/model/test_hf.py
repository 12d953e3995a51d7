"""Parity with transformers' LlamaForCausalLM in fp32, both directions (STYLE rule 7)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helox.model.config import ModelConfig  # noqa: E402
from helox.model.hf import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict  # noqa: E402
from helox.model.llama import Llama  # noqa: E402

CONFIGS = {
    "gqa-tied": dict(num_heads=4, num_kv_heads=2, tie_embeddings=True),
    "mha-untied": dict(num_heads=4, num_kv_heads=None, tie_embeddings=False),
}


def helox_config(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=101, d_model=64, num_layers=2, d_ffn=96, max_seq_len=64,
                       rope_theta=500.0, norm_eps=1e-6, **kw)


def hf_model(cfg: ModelConfig):
    return transformers.LlamaForCausalLM(to_hf_config(cfg, attn_implementation="eager")).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_helox_to_hf_logits_match(name):
    torch.manual_seed(0)
    cfg = helox_config(**CONFIGS[name])
    ours = Llama(cfg).eval()
    theirs = hf_model(cfg)
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg),
                                                 strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)  # only a tied head
    tokens = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_to_helox_logits_match(name):
    torch.manual_seed(1)
    theirs = hf_model(helox_config(**CONFIGS[name]))
    for param in theirs.parameters():  # HF inits norms to 1; perturb them so they are tested
        param.data.add_(torch.randn_like(param) * 0.02)
    cfg = from_hf_config(theirs.config)
    ours = Llama(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), cfg))
    tokens = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-5, atol=1e-5)


def test_config_round_trip():
    cfg = helox_config(num_heads=4, num_kv_heads=2)
    assert from_hf_config(to_hf_config(cfg)) == cfg
