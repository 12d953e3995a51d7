import pytest
import torch

from helox.errors import HeloxError
from helox.model.config import ModelConfig
from helox.model.generate import generate
from helox.model.llama import KVCache, Llama


def tiny_model(**overrides) -> Llama:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=24, **overrides)
    return Llama(cfg).eval()


def test_logits_shape_and_causality():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 97)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_tied_head_shares_the_embedding_and_is_counted_once():
    tied, untied = tiny_model(tie_embeddings=True), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.num_params() - tied.num_params() == 97 * 32


def test_gqa_matches_multi_head_with_repeated_kv_weights():
    gqa = tiny_model()
    mha = Llama(gqa.cfg.model_copy(update={"num_kv_heads": 4})).eval()
    state = gqa.state_dict()
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = state[name].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(mha(tokens), gqa(tokens))


def test_greedy_generation_is_deterministic_and_stops_at_stop_id():
    model = tiny_model()
    first = generate(model, [1, 2, 3], 30, temperature=0, top_k=None)
    assert first == generate(model, [1, 2, 3], 30, temperature=0, top_k=None)
    assert len(first) == 30  # longer than max_seq_len - 3: the context is cropped
    stop = first[4]
    assert generate(model, [1, 2, 3], 30, 0, None, stop_id=stop) == first[:first.index(stop)]


def test_sampling_respects_top_k_and_seed():
    model = tiny_model()

    def gen(seed):
        return generate(model, [5], 10, 1.0, 1, generator=torch.Generator().manual_seed(seed))

    assert gen(0) == gen(1) == generate(model, [5], 10, 0, None)  # top-1 sampling is greedy


def test_the_kv_cache_gives_the_full_forward_logits():
    """A prompt in one forward, then one token at a time and a chunk of three, through the
    cache: each position's logits are the full forward's."""
    from helox.model.llama import KVCache

    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 20))
    full = model(tokens)
    cache = KVCache(model.cfg, 2, 24, torch.device("cpu"), torch.float32)
    pieces = [model(tokens[:, :12], cache=cache)]
    pieces += [model(tokens[:, t:t + 1], cache=cache) for t in range(12, 17)]
    pieces.append(model(tokens[:, 17:20], cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_cached_greedy_decoding_is_the_recomputed_one():
    """What generate() returned before it had a cache: the argmax of the full forward over the
    (cropped) context, token by token."""
    model = tiny_model()
    context, expected = [1, 2, 3], []
    for _ in range(8):
        next_id = int(model(torch.tensor([context]))[0, -1].argmax())
        expected.append(next_id)
        context.append(next_id)
    assert generate(model, [1, 2, 3], 8, temperature=0, top_k=None) == expected


def test_batched_decoding_gives_each_rows_unbatched_cached_logits():
    """Prompts of different lengths prefilled into rows of one BatchKVCache, then decoded one
    token per row per forward, each at its own position: every row's logits are what the
    single-sequence cached forward gives (fp32, 1e-5). A row that finishes is replaced by
    the last row (compaction) and a new prompt joins mid-flight; the others do not notice."""
    from helox.model.llama import BatchKVCache, KVCache

    model = tiny_model()
    generator = torch.Generator().manual_seed(3)
    streams = [torch.randint(0, 97, (1, n), generator=generator) for n in (14, 5, 9, 20, 7)]
    prompt_lengths = [6, 2, 4, 11, 3]
    expected = []
    for tokens, prompt in zip(streams, prompt_lengths):
        cache = KVCache(model.cfg, 1, 24, torch.device("cpu"), torch.float32)
        first = model(tokens[:, :prompt], cache=cache)[:, -1:]
        rest = [model(tokens[:, t:t + 1], cache=cache) for t in range(prompt, tokens.shape[1])]
        expected.append(torch.cat([first, *rest], dim=1)[0])
    batch = BatchKVCache(model.cfg, 4, 24, torch.device("cpu"), torch.float32)
    rows, got = [], {i: [] for i in range(5)}

    def admit(stream):
        row = len(rows)
        prompt = prompt_lengths[stream]
        logits = model(streams[stream][:, :prompt], cache=batch.rows(row, 1))
        batch.set_length(row, prompt)
        rows.append(stream)
        got[stream].append(logits[0, -1])

    for stream in range(4):
        admit(stream)
    while rows:
        tokens_B1 = torch.tensor([[streams[s][0, batch.lengths[r]].item()]
                                  for r, s in enumerate(rows)])
        logits_B1V = model.decode(tokens_B1, batch)
        for row, stream in enumerate(rows):
            got[stream].append(logits_B1V[row, 0])
        for row in reversed(range(len(rows))):  # finished rows leave; the last moves in
            if batch.lengths[row] == streams[rows[row]].shape[1]:
                batch.move_row(len(rows) - 1, row)
                rows[row] = rows[-1]
                rows.pop()
        if not got[4] and len(rows) < 4:  # joins once the shortest has left
            admit(4)
    for stream in range(5):
        torch.testing.assert_close(torch.stack(got[stream]), expected[stream], atol=1e-5,
                                   rtol=0)


def _both_kernels(run) -> tuple:
    """`run(model)` with SDPA and with math attention, on the same weights."""
    results = []
    for kernel in ("sdpa", "math"):
        model = tiny_model()
        model.set_attention(kernel)
        results.append(run(model))
    return tuple(results)


def test_math_attention_computes_what_sdpa_computes_with_its_gradients():
    tokens = torch.randint(0, 97, (3, 20))
    doc_ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 20, [0] * 5 + [1] * 5 + [2] * 10])
    positions = torch.cat([torch.arange(8), torch.arange(12)]).expand(3, 20)

    def forward_and_grads(model):
        model.train()
        causal = model(tokens)
        packed = model(tokens, positions, doc_ids)
        (causal.square().mean() + packed.square().mean()).backward()
        return causal.detach(), packed.detach(), {n: p.grad for n, p in model.named_parameters()}

    (sdpa_causal, sdpa_packed, sdpa_grads), (math_causal, math_packed, math_grads) = \
        _both_kernels(forward_and_grads)
    torch.testing.assert_close(math_causal, sdpa_causal, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(math_packed, sdpa_packed, rtol=1e-5, atol=1e-5)
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(math_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_math_attention_decodes_with_the_cache_as_sdpa_does():
    prompt = torch.randint(0, 97, (1, 9))

    def cached(model):
        cache = KVCache(model.cfg, 1, 24, torch.device("cpu"), torch.float32)
        first = model(prompt[:, :6], cache=cache)
        rest = model(prompt[:, 6:], cache=cache)  # several new tokens after cached ones
        step = model(prompt[:, :1], cache=cache)  # one token
        return torch.cat([first, rest, step], dim=1)

    sdpa, math = _both_kernels(cached)
    torch.testing.assert_close(math, sdpa, rtol=1e-5, atol=1e-5)


def test_math_attention_under_bf16_autocast_stays_within_bf16_rounding():
    tokens = torch.randint(0, 97, (2, 16))

    def autocast(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(tokens).float()

    sdpa, math = _both_kernels(autocast)
    reference = tiny_model()(tokens)
    assert (math - reference).abs().max() < 0.05 and (sdpa - reference).abs().max() < 0.05


def test_an_unknown_attention_kernel_is_refused():
    with pytest.raises(HeloxError, match="unknown attention kernel 'flash3'"):
        tiny_model().set_attention("flash3")
