"""LoRA against PEFT: an adapter Helox saves loads with `PeftModel.from_pretrained` on the
transformers form of the same base and gives the same logits, and one PEFT trained loads into
Helox with the same logits (fp32, 1e-5); stacked adapters add as PEFT's do; merging keeps the
function; the base stays frozen."""

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import LlamaForCausalLM

import pytest

from helox.errors import HeloxError
from helox.finetune.lora import (LoraConfig, apply_lora, load_adapter, lora_layers, merge_lora,
                                 only_active, per_row_adapters, remove_adapter, save_adapter,
                                 set_active, set_trainable)
from helox.model.config import ModelConfig
from helox.model.hf import to_hf_config, to_hf_state_dict
from helox.model.llama import Llama

CFG = ModelConfig(vocab_size=96, d_model=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_seq_len=32, tie_embeddings=False)
TOKENS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
LORA = LoraConfig(rank=4, alpha=8, target_modules=["down_proj", "q_proj", "v_proj"])


def base_model() -> Llama:
    torch.manual_seed(0)
    return Llama(CFG).eval()


def transformers_base(model: Llama) -> LlamaForCausalLM:
    """The transformers LlamaForCausalLM with the base weights of `model` (adapters left
    out)."""
    state = {name.replace(".base_layer.", "."): tensor for name, tensor in
             model.state_dict().items() if ".lora_" not in name}
    hf = LlamaForCausalLM(to_hf_config(CFG))
    hf.load_state_dict(to_hf_state_dict(state, CFG))
    return hf.eval()


def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """A fresh adapter's B is zero (no effect): give every adapter weight random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_an_adapter_helox_saves_gives_peft_the_same_logits(tmp_path):
    model = base_model()
    hf = transformers_base(model)
    adapted = apply_lora(model, LORA)
    assert len(adapted) == 3 * CFG.num_layers
    randomize_adapters(model, 1)
    save_adapter(model, tmp_path / "adapter", LORA, base_model="tiny")
    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(TOKENS), peft(TOKENS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, transformers_base(model)(TOKENS).logits, atol=1e-3)


def test_an_adapter_peft_saves_gives_helox_the_same_logits(tmp_path):
    model = base_model()
    peft = get_peft_model(transformers_base(model), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0))
    randomize_adapters(peft, 2)
    peft.save_pretrained(tmp_path / "adapter")
    config = load_adapter(model, tmp_path / "adapter")
    assert config == LORA
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), peft.eval()(TOKENS).logits, rtol=1e-5,
                                   atol=1e-5)


def test_stacked_adapters_add_as_peft_combines_them(tmp_path):
    model = base_model()
    hf = transformers_base(model)
    second = LoraConfig(rank=2, alpha=2, target_modules=["q_proj", "up_proj"])
    apply_lora(model, LORA, "first")
    apply_lora(model, second, "second")
    randomize_adapters(model, 3)
    save_adapter(model, tmp_path / "first", LORA, "first")
    save_adapter(model, tmp_path / "second", second, "second")
    peft = PeftModel.from_pretrained(hf, tmp_path / "first", adapter_name="first")
    peft.load_adapter(tmp_path / "second", adapter_name="second")
    peft.base_model.set_adapter(["first", "second"])
    set_active(model, ["first", "second"])
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), peft.eval()(TOKENS).logits, rtol=1e-5,
                                   atol=1e-5)
        set_active(model, ["first"])
        alone = model(TOKENS)
        set_active(model, ["first", "second"])
        assert not torch.allclose(alone, model(TOKENS), atol=1e-4)


def test_one_adapter_trains_while_the_other_and_the_base_stay_frozen():
    model = base_model().train()
    apply_lora(model, LORA, "old")
    apply_lora(model, LORA, "new")
    randomize_adapters(model, 4)
    set_trainable(model, ["new"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".new" not in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(TOKENS).flatten(0, 1),
                                                 TOKENS.roll(-1, 1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A.new." in n or ".lora_B.new." in n for n in trained)


def test_merging_keeps_the_function_and_leaves_a_plain_model():
    model = base_model()
    apply_lora(model, LORA)
    randomize_adapters(model, 5)
    with torch.no_grad():
        before = model(TOKENS)
        merge_lora(model)
        torch.testing.assert_close(model(TOKENS), before, rtol=1e-5, atol=1e-5)
    assert not lora_layers(model)
    assert set(model.state_dict()) == set(Llama(CFG).state_dict())


def test_refusals_name_what_is_wrong(tmp_path):
    with pytest.raises(HeloxError, match="match no linear layer"):
        apply_lora(base_model(), LoraConfig(target_modules=["qkv"]))
    model = base_model()
    apply_lora(model, LORA)
    save_adapter(model, tmp_path / "adapter", LORA)
    wider = Llama(CFG.model_copy(update={"d_model": 64})).eval()
    with pytest.raises(HeloxError, match="has shape .* the model's layer wants"):
        load_adapter(wider, tmp_path / "adapter")


def test_per_row_adapters_give_each_row_its_own_adapters_output():
    """One batch whose rows use the base, adapter a, adapter b (which targets other layers)
    and a again: each row's logits are what the model gives that row alone with only its
    adapter active, whatever `active` says meanwhile."""
    model = base_model()
    apply_lora(model, LORA, "a")
    apply_lora(model, LoraConfig(rank=2, alpha=4, target_modules=["k_proj", "up_proj"]), "b")
    randomize_adapters(model, 6)
    rows = [None, "a", "b", "a"]
    tokens = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with per_row_adapters(model, rows):
            mixed = model(tokens)
        for row, name in enumerate(rows):
            with only_active(model, [] if name is None else [name]):
                torch.testing.assert_close(mixed[row], model(tokens[row:row + 1])[0],
                                           rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[0], mixed[1], atol=1e-4)
    assert all(layer.row_adapters is None for layer in lora_layers(model).values())
    with pytest.raises(HeloxError, match="no adapter named 'c'"):
        with per_row_adapters(model, ["c"]):
            pass


def test_removing_every_adapter_gives_back_the_plain_base():
    model = base_model()
    with torch.no_grad():
        before = model(TOKENS)
    apply_lora(model, LORA, "a")
    apply_lora(model, LORA, "b")
    randomize_adapters(model, 7)
    remove_adapter(model, "a")
    assert all(list(layer.lora_A) == ["b"] for layer in lora_layers(model).values())
    remove_adapter(model, "b")
    assert not lora_layers(model)
    assert set(model.state_dict()) == set(Llama(CFG).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), before, rtol=0, atol=0)
    with pytest.raises(HeloxError, match="no adapter named 'a'"):
        remove_adapter(model, "a")
