"""Sampled telemetry, each metric against an independent computation on a tiny model."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helox.model.config import ModelConfig
from helox.data.loader import MicroBatch
from helox.data.shards import DatasetVersion, ShardWriter, build_manifest, unigram_entropy_nats
from helox.model.llama import Attention, Llama, additive_mask, apply_rope, document_mask
from helox.observe.probes import (Telemetry, TelemetryConfig, js_divergence_nats, probe_batches,
                                  rare_token_ids, unigram_counts)

VOCAB, T = 64, 16


def tiny_model(seed: int = 0, **overrides) -> Llama:
    torch.manual_seed(seed)
    shape = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_seq_len=T)
    cfg = ModelConfig(**shape | overrides)
    return Llama(cfg).train()


def probe(seed: int = 1, rows: int = 4, low: int = 0) -> MicroBatch:
    tokens = torch.randint(low, VOCAB, (rows, T + 1), generator=torch.Generator().manual_seed(seed))
    return MicroBatch(tokens[:, :-1], tokens[:, 1:])


def telemetry(model: Llama, counts: np.ndarray | None = None, **config) -> Telemetry:
    counts = np.arange(VOCAB) + 1 if counts is None else counts
    return Telemetry(TelemetryConfig(**config), model.cfg, counts)


def packed_probe(rows: int = 2) -> MicroBatch:
    """Two documents per row, of 5 and 11 tokens: positions restart, attention stays inside."""
    base = probe(rows=rows)
    doc_ids = torch.tensor([0] * 5 + [1] * 11).expand(rows, T)
    positions = torch.cat([torch.arange(5), torch.arange(11)]).expand(rows, T)
    return MicroBatch(base.inputs, base.targets, positions, doc_ids)


# ---------------------------------------------------------------------------------------------
# The Llama refactor and the materialised attention


def reference_attention_forward(self, x_BTD, cos_TE, sin_TE, mask_B1TT=None, cache=None):
    """Attention.forward as it was before `heads` and `attention_probs` were factored out (and
    the KV cache added: the uncached forward is compared, so `cache` is always None here)."""
    assert cache is None
    B, T, _ = x_BTD.shape
    q_BHTE = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
    k_BKTE = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    v_BKTE = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
    q_BHTE, k_BKTE = apply_rope(q_BHTE, cos_TE, sin_TE), apply_rope(k_BKTE, cos_TE, sin_TE)
    if self.num_kv_heads != self.num_heads:
        repeats = self.num_heads // self.num_kv_heads
        k_BKTE = k_BKTE.repeat_interleave(repeats, dim=1)
        v_BKTE = v_BKTE.repeat_interleave(repeats, dim=1)
    y_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BKTE, v_BKTE, attn_mask=mask_B1TT,
                                            is_causal=mask_B1TT is None)
    return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("num_kv_heads", [2, 4])
def test_forward_is_bitwise_the_forward_before_the_refactor(num_kv_heads, monkeypatch):
    model, packed = tiny_model(num_kv_heads=num_kv_heads), packed_probe()

    def logits_and_grad():
        model.zero_grad()
        causal = model(packed.inputs)
        masked = model(packed.inputs, packed.position_ids, packed.doc_ids)
        (causal.square().mean() + masked.square().mean()).backward()
        return causal.detach(), masked.detach(), model.blocks[0].attn.q_proj.weight.grad.clone()

    now = logits_and_grad()
    monkeypatch.setattr(Attention, "forward", reference_attention_forward)
    before = logits_and_grad()
    assert all(torch.equal(a, b) for a, b in zip(now, before))


def test_attention_probs_are_the_masked_softmax_that_sdpa_applies():
    model, packed = tiny_model(), packed_probe()
    attn, E = model.blocks[0].attn, model.cfg.head_dim
    cos_BTE, sin_BTE = model.rope_cos[packed.position_ids], model.rope_sin[packed.position_ids]
    x_BTD = model.blocks[0].attn_norm(model.embed(packed.inputs))
    B = x_BTD.shape[0]

    def heads(proj, n):  # (B, n, T, E), repeated to 4 heads
        return proj(x_BTD).view(B, T, n, E).transpose(1, 2).repeat_interleave(4 // n, dim=1)

    rope = dict(cos_TE=cos_BTE[:, None], sin_TE=sin_BTE[:, None])
    q_BHTE, k_BHTE = apply_rope(heads(attn.q_proj, 4), **rope), apply_rope(heads(attn.k_proj, 2),
                                                                           **rope)
    allowed_TT = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):  # the same document and not in the future
        first = 0 if i < 5 else 5
        allowed_TT[i, first:i + 1] = True
    scores_BHTT = torch.einsum("bhie,bhje->bhij", q_BHTE, k_BHTE) / math.sqrt(E)
    expected_BHTT = scores_BHTT.masked_fill(~allowed_TT, -math.inf).softmax(-1)

    with torch.no_grad():
        mask_B1TT = document_mask(packed.doc_ids)
        probs_BHTT = attn.attention_probs(x_BTD, cos_BTE[:, None], sin_BTE[:, None], mask_B1TT)
        torch.testing.assert_close(probs_BHTT, expected_BHTT)
        assert (probs_BHTT[..., ~allowed_TT] == 0).all()
        y_BTC = (probs_BHTT @ heads(attn.v_proj, 2)).transpose(1, 2).reshape(B, T, -1)
        torch.testing.assert_close(attn.o_proj(y_BTC),
                                   attn(x_BTD, cos_BTE[:, None], sin_BTE[:, None], mask_B1TT))
        additive_BHTT = attn.attention_probs(x_BTD, cos_BTE[:, None], sin_BTE[:, None],
                                             additive_mask(mask_B1TT, T, T, x_BTD.device))
        torch.testing.assert_close(additive_BHTT, probs_BHTT)
        assert (additive_BHTT[..., ~allowed_TT] == 0).all()
        causal_BHTT = attn.attention_probs(x_BTD, model.rope_cos[:T], model.rope_sin[:T])
        assert (causal_BHTT.triu(1) == 0).all()
        torch.testing.assert_close(causal_BHTT.sum(-1), torch.ones(B, 4, T))


@pytest.mark.parametrize("packed", [False, True])
def test_a_math_attention_model_is_sampled_as_an_sdpa_one(packed):
    """Math attention hands its blocks the mask in additive form; the probes read it too."""
    batch = packed_probe() if packed else probe()
    entropies = {}
    for kernel in ("sdpa", "math"):
        model = tiny_model()
        model.set_attention(kernel)
        sample = telemetry(model).sample(0, model, batch, batch.inputs)
        entropies[kernel] = torch.from_numpy(np.asarray(sample.attention_entropy_LH))
    torch.testing.assert_close(entropies["math"], entropies["sdpa"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Heads


def test_uniform_attention_has_the_entropy_of_its_prefix_length():
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight.zero_()  # equal scores: uniform over what is visible
    causal = telemetry(model).sample(0, model, probe())
    expected = float(np.mean(np.log(np.arange(1, T + 1))))  # query i sees i + 1 tokens
    for head in range(4):
        assert causal.scalars[f"attn_entropy.layer0.head{head}"] == pytest.approx(expected, 1e-5)
    assert causal.scalars["attn_entropy.layer0"] == pytest.approx(expected, 1e-5)
    assert causal.scalars["collapsed_heads.layer0"] == 0

    packed = telemetry(model).sample(0, model, packed_probe())
    in_document = np.concatenate([np.arange(1, 6), np.arange(1, 12)])
    expected_packed = float(np.mean(np.log(in_document)))
    np.testing.assert_allclose(packed.attention_entropy_LH[0], expected_packed, rtol=1e-5)


def test_head_attending_to_one_token_is_collapsed_and_a_silent_head_is_dead():
    model, E, head = tiny_model(), 8, 3
    with torch.no_grad():
        # Every token has feature 0, only the sink token (id 0) feature 1. Head 3's query reads
        # feature 0 and its key feature 1, in the slowest RoPE pair (rotates < 0.02 rad over 16
        # positions): every query puts ~all its weight on the sink at position 0.
        model.embed.weight[:, :2] = torch.tensor([1.0, 0.0])
        model.embed.weight[0, 1] = 1.0
        attn, slow, group = model.blocks[0].attn, E // 2 - 1, head // 2
        attn.q_proj.weight[head * E:(head + 1) * E] = 0
        attn.q_proj.weight[head * E + slow, 0] = 3.0
        attn.k_proj.weight[group * E:(group + 1) * E] = 0
        attn.k_proj.weight[group * E + slow, 1] = 3.0
        model.blocks[1].attn.o_proj.weight[:, 2 * E:3 * E] = 0  # layer 1, head 2 writes nothing
    batch = probe(low=1)
    batch.inputs[:, 0] = 0
    sample = telemetry(model).sample(0, model, batch)
    assert sample.scalars[f"attn_entropy.layer0.head{head}"] < 1e-6
    assert min(sample.attention_entropy_LH[0, :head]) > 1.0
    assert sample.scalars["collapsed_heads.layer0"] == 1
    assert sample.scalars["collapsed_heads.layer1"] == 0
    assert sample.scalars["dead_heads.layer1"] == 1 and sample.scalars["dead_heads.layer0"] == 0
    assert sample.scalars["collapsed_heads"] == 1 and sample.scalars["dead_heads"] == 1


# ---------------------------------------------------------------------------------------------
# Neurons


def test_a_neuron_forced_dead_is_reported_after_the_window_and_revives():
    model, window, dead_units = tiny_model(), 3, [5, 17, 40]
    mlp = model.blocks[0].mlp
    saved = mlp.gate_proj.weight[dead_units].clone(), mlp.up_proj.weight[dead_units].clone()
    with torch.no_grad():
        mlp.gate_proj.weight[dead_units] = 0  # silu(0) * 0: exactly 0 on every token
        mlp.up_proj.weight[dead_units] = 0
    tel = telemetry(model, dead_neuron_window_samples=window)
    ffn = model.cfg.ffn_dim
    for _ in range(window - 1):
        assert tel.sample(0, model, probe()).scalars["dead_neuron_count.layer0"] == 0
    resumed = telemetry(model, dead_neuron_window_samples=window)
    resumed.load_state_dict(tel.state_dict())
    for t in (tel, resumed):
        scalars = t.sample(0, model, probe()).scalars
        assert scalars["dead_neuron_count.layer0"] == len(dead_units)
        assert scalars["dead_neurons.layer0"] == pytest.approx(len(dead_units) / ffn)
        assert scalars["dead_neuron_count.layer1"] == 0
        assert scalars["dead_neurons"] == pytest.approx(len(dead_units) / (2 * ffn))
    with torch.no_grad():
        mlp.gate_proj.weight[dead_units], mlp.up_proj.weight[dead_units] = saved
    assert tel.sample(0, model, probe()).scalars["dead_neuron_count.layer0"] == 0


# ---------------------------------------------------------------------------------------------
# Tokens


def test_js_divergence_against_hand_computed_values():
    # M = (1/4, 1/2, 1/4, 0): KL(P||M) = KL(Q||M) = 1/2 ln 2 + 1/2 ln 1
    assert js_divergence_nats([1, 1, 0, 0], [0, 1, 1, 0]) == pytest.approx(0.5 * math.log(2))
    assert js_divergence_nats([3, 0], [0, 5]) == pytest.approx(math.log(2))  # disjoint: ln 2
    assert js_divergence_nats([2, 4, 6], [1, 2, 3]) == pytest.approx(0.0, abs=1e-12)


def test_drift_is_measured_over_the_tokens_counted_since_the_last_sample():
    model = tiny_model()
    baseline = np.zeros(VOCAB, dtype=np.int64)
    baseline[[0, 1]] = 7
    tel = telemetry(model, baseline)
    tel.count_tokens(torch.tensor([1, 2, 1]))
    scalars = tel.sample(0, model, probe(), train_tokens=torch.tensor([[2]])).scalars
    # counted (0, 1/2, 1/2) against the baseline (1/2, 1/2, 0)
    assert scalars["token_drift_js"] == pytest.approx(0.5 * math.log(2))
    assert scalars["token_drift_tokens"] == 4
    assert "token_drift_js" not in tel.sample(1, model, probe()).scalars  # a new, empty window


def test_a_drifted_batch_raises_drift_well_above_an_in_distribution_one():
    model, rng = tiny_model(), np.random.default_rng(0)
    zipf_V = 1 / np.arange(1, VOCAB + 1)
    baseline = rng.multinomial(100_000, zipf_V / zipf_V.sum())
    tel = telemetry(model, baseline)

    def drift(tokens: np.ndarray) -> dict:
        return tel.sample(0, model, probe(), torch.from_numpy(tokens)).scalars

    in_distribution = drift(rng.choice(VOCAB, 2048, p=baseline / baseline.sum()))
    drifted = drift(rng.integers(VOCAB // 2, VOCAB, 2048))  # the rare half, uniformly
    assert in_distribution["token_drift_js"] < 3 * in_distribution["token_drift_js_floor"]
    assert drifted["token_drift_js"] > 10 * in_distribution["token_drift_js"]
    assert drifted["token_drift_js"] > 0.2


def test_rare_tokens_are_the_least_frequent_that_occur_ties_by_id():
    counts = np.array([0, 5, 3, 3, 3, 9])  # 5 tokens occur: ceil(0.4 * 5) = 2 rare ones
    assert rare_token_ids(counts, 0.4).tolist() == [2, 3]
    assert rare_token_ids(counts, 1.0).tolist() == [1, 2, 3, 4, 5]


def test_rare_token_mass_against_the_softmax_of_the_logits():
    model, batch = tiny_model(), probe()
    counts = np.where(np.arange(VOCAB) < 40, np.arange(VOCAB) + 1, 0)  # ids 0-39 occur
    scalars = telemetry(model, counts, rare_token_quantile=0.1).sample(0, model, batch).scalars
    with torch.no_grad():
        probs_BTV = model.eval()(batch.inputs).softmax(-1)
    mass = probs_BTV[..., :4].sum(-1).mean().item()  # ceil(0.1 * 40) = ids 0..3
    share = (1 + 2 + 3 + 4) / sum(range(1, 41))
    assert scalars["rare_token_mass"] == pytest.approx(mass, rel=1e-5)
    assert scalars["rare_token_data_share"] == pytest.approx(share)
    assert scalars["rare_token_mass_ratio"] == pytest.approx(mass / share, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Losses, activations, hooks


def test_loss_percentiles_domain_perplexity_and_histograms():
    model, bins = tiny_model(), 8
    domains = {"code": probe(seed=2, rows=1), "prose": probe(seed=3, rows=3)}
    sample = telemetry(model, histogram_bins=bins).sample(0, model, domains)
    with torch.no_grad():
        model.eval()
        losses = {d: F.cross_entropy(model(b.inputs).transpose(1, 2), b.targets, reduction="none")
                  for d, b in domains.items()}
        x_BTD = model.embed(torch.cat([b.inputs for b in domains.values()]))
        norms = []
        for block in model.blocks:
            x_BTD = block(x_BTD, model.rope_cos[:T], model.rope_sin[:T])
            norms.append(x_BTD.norm(dim=-1).flatten().double().numpy())
    all_losses = torch.cat([loss.flatten() for loss in losses.values()]).double()
    quantiles = torch.quantile(all_losses, torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.double))
    for q, value in zip((10, 50, 90, 99), quantiles.tolist()):
        assert sample.scalars[f"loss_p{q}"] == pytest.approx(value, rel=1e-5)
    for domain, loss in losses.items():
        assert sample.scalars[f"ppl.{domain}"] == pytest.approx(loss.double().mean().exp().item(),
                                                                rel=1e-5)
    assert sample.scalars["ppl"] == pytest.approx(all_losses.mean().exp().item(), rel=1e-5)
    assert sample.histograms["token_loss"].counts.sum() == 4 * T
    for layer, norms_N in enumerate(norms):
        histogram = sample.histograms[f"act_norm.layer{layer}"]
        assert histogram.counts.sum() == 4 * T and len(histogram.bin_edges) == bins + 1
        np.testing.assert_allclose(histogram.bin_edges[[0, -1]], [norms_N.min(), norms_N.max()],
                                   rtol=1e-5)
        assert sample.scalars[f"act_norm_mean.layer{layer}"] == pytest.approx(norms_N.mean(),
                                                                              rel=1e-5)
        assert sample.scalars[f"act_norm_max.layer{layer}"] == pytest.approx(norms_N.max(),
                                                                             rel=1e-5)
    raw = sample.histograms["token_loss"].tensorboard_raw()
    assert raw["num"] == 4 * T and len(raw["bucket_limits"]) == len(raw["bucket_counts"]) == bins


def no_hooks(model: Llama) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs
                   for m in model.modules())


def test_sampling_leaves_no_hooks_restores_modes_and_changes_no_output():
    model, batch = tiny_model(), probe()
    model.blocks[1].mlp.eval()  # a module in its own mode stays in it
    modes = [m.training for m in model.modules()]
    before = model(batch.inputs)
    telemetry(model).sample(0, model, batch, batch.inputs)
    assert no_hooks(model) and [m.training for m in model.modules()] == modes
    assert torch.is_grad_enabled() and torch.equal(model(batch.inputs), before)

    too_long = MicroBatch(torch.zeros(1, T + 1, dtype=torch.long),
                          torch.zeros(1, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        telemetry(model).sample(0, model, too_long)
    assert no_hooks(model) and [m.training for m in model.modules()] == modes


# ---------------------------------------------------------------------------------------------
# The dataset side


@pytest.fixture
def small_dataset(tmp_path) -> tuple[DatasetVersion, dict[str, list[list[int]]]]:
    """A dataset folder written by the real ShardWriter: train in 2 domains (3 shards), val in
    2 domains; token ids 0..30 of a 32-token vocabulary, eos 31."""
    rng = np.random.default_rng(0)
    splits, documents, counts = {}, {}, None
    for split, domains in (("train", ("a", "b")), ("val", ("a", "b"))):
        writer = ShardWriter(tmp_path, split, 32, shard_size_tokens=120)
        documents[split] = []
        for i in range(24):
            doc = rng.integers(0, 16 if i % 2 else 31, rng.integers(5, 30)).tolist() + [31]
            writer.add(doc, domains[i % 2])
            documents[split].append((domains[i % 2], doc))
        writer.flush()
        splits[split] = writer.summary()
        counts = writer.token_counts if split == "train" else counts
    tokenizer = {"sha256": "0", "vocab_size": 32, "eos_token": "<eos>", "eos_id": 31}
    manifest = build_manifest(tokenizer, np.dtype("<u2"), splits, counts)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return DatasetVersion(tmp_path), documents


def test_unigram_counts_stream_the_training_shards(small_dataset):
    dataset, documents = small_dataset
    expected = Counter(t for _, doc in documents["train"] for t in doc)
    counts = unigram_counts(dataset, chunk_tokens=7)  # chunks cut through shards
    assert len(dataset.shard_paths("train")) > 2
    assert counts.tolist() == [expected[t] for t in range(32)]
    assert unigram_entropy_nats(counts) == pytest.approx(
        dataset.manifest["stats"]["unigram_entropy_nats"], abs=1e-6)


def test_probe_batches_share_the_probe_sequences_among_validation_domains(small_dataset):
    dataset, documents = small_dataset
    batches = probe_batches(dataset, TelemetryConfig(probe_sequences=3), 8, False)
    assert {d: b.inputs.shape for d, b in batches.items()} == {"a": (2, 8), "b": (1, 8)}
    stream_a = [t for domain, doc in documents["val"] if domain == "a" for t in doc]
    assert batches["a"].inputs[0].tolist() == stream_a[:8]
    assert batches["a"].targets[0].tolist() == stream_a[1:9]
