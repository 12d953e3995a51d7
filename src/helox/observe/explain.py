"""`helox explain`: what a trained model does with one prompt, layer by layer.

Two classic views, computed in one no-grad fp32 forward with hooks (the model code is untouched):
- attention maps: each head's weights over the earlier tokens, materialised by
  `Attention.attention_probs` (the forward's SDPA does not return them);
- the logit lens (nostalgebraist, 2020): the residual stream after the embedding and after each
  block, read out with the model's own final norm and head, so every layer "predicts" a
  next-token distribution; the last block's row is the model's output.

Files written to the output folder:
| file                  | content                                                          |
|-----------------------|------------------------------------------------------------------|
| attention_layer{l}.png | the layer's heads, one query x key heatmap each, mean entropy   |
| logit_lens.png        | layers x positions, the top-1 token of each cell, coloured by its |
|                       | probability (bold: it is the actual next token)                  |
| explain.html          | the same as interactive charts, plus top-k tables (self-contained) |
| explain.json          | tokens, checkpoint, attention entropy per head, the lens numbers  |

Legend for tensor suffixes: L layers, H query heads, T prompt tokens, N = T - 1 positions that
have a next token, S lens rows (L + 1: the embedding, then each block), K top-k, D d_model,
V vocabulary.
"""

from __future__ import annotations

import copy
import hashlib
import html
import json
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from helox.checkpoint import (EMA_WEIGHTS, MODEL_WEIGHTS, load_trained_model, read_format,
                              resolve_checkpoint, run_dir_of)
from helox.errors import HeloxError
from helox.model.llama import Llama
from helox.observe.html import Page

MAX_TOKENS = 128
"""Prompt tokens explained at most (fewer if the model's max_seq_len is smaller). The page holds
L * H * T^2 attention weights: ~12 MB for 12 layers of 12 heads at 128 tokens."""
LABELLED_TOKENS = 48
"""Attention heatmaps carry token labels on their axes up to this many tokens (then unreadable)."""
POSITION_TABLES_TOKENS = 16
"""The page lists the lens's top-k per layer for every position up to this many tokens."""
HEAD_COLUMNS = 4
"""Heads per row in the attention grids."""
VISIBLE = str.maketrans({" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "↵"})


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# The computation (no file IO)


@dataclass
class Explanation:
    """One prompt through one model: attention per layer and head, and the logit lens."""

    token_ids: list[int]
    attention_LHTT: np.ndarray
    """float32 attention weights: query rows, key columns; above the diagonal exactly 0."""
    attention_entropy_LH: np.ndarray
    """float32 mean over queries of -sum_k p log p, nats (0: one key; ln(t+1) at most)."""
    lens_top_ids_STK: np.ndarray
    """int64 ids of the K likeliest next tokens per lens row and position, likeliest first."""
    lens_top_probs_STK: np.ndarray
    """float32 their probabilities."""
    lens_next_prob_SN: np.ndarray
    """float32 probability each lens row gives the prompt's actual next token."""

    @property
    def num_layers(self) -> int:
        return self.attention_LHTT.shape[0]

    def lens_row_names(self) -> list[str]:
        return ["embed", *(f"block {layer}" for layer in range(self.num_layers))]

    def all_ids(self) -> set[int]:
        """Every token id a view of this explanation shows."""
        return set(self.token_ids) | set(self.lens_top_ids_STK.ravel().tolist())


@dataclass
class _Capture:
    """Forward hooks that keep the residual stream (embedding output, then each block's
    output) and each layer's attention weights; removed on exit, whatever happened."""

    model: Llama
    residuals: list[torch.Tensor] = field(default_factory=list)
    attention: list[torch.Tensor] = field(default_factory=list)
    handles: list = field(default_factory=list)

    def __enter__(self) -> _Capture:
        self.handles.append(self.model.embed.register_forward_hook(self._keep_residual))
        for block in self.model.blocks:
            self.handles.append(block.attn.register_forward_hook(self._keep_attention,
                                                                 with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._keep_residual))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _keep_residual(self, module: nn.Module, args: tuple, x_1TD: torch.Tensor) -> None:
        self.residuals.append(x_1TD)

    def _keep_attention(self, module: nn.Module, args: tuple, kwargs: dict,
                        output: torch.Tensor) -> None:
        x_1TD, cos_TE, sin_TE = args[:3]
        mask_11TT = args[3] if len(args) > 3 else kwargs.get("mask_B1TT")
        self.attention.append(module.attention_probs(x_1TD, cos_TE, sin_TE, mask_11TT)[0])


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout-like behaviour, no recompute) for the block; every module's own
    training flag is put back afterwards, so a model mid-training is left as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _fp32(model: Llama) -> Llama:
    """The model itself when its weights are fp32, else an fp32 copy: bf16 logits round
    probabilities to ~3 digits, too coarse to compare layers by."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float()


@torch.no_grad()
def explain(model: Llama, token_ids: list[int], top_k: int) -> Explanation:
    """Attention maps and logit lens of `token_ids` (one sequence, at most max_seq_len)."""
    if not token_ids:
        raise HeloxError("nothing to explain: no tokens", hint="pass at least one token id")
    if top_k < 1:
        raise HeloxError(f"top_k is {top_k}: the lens shows the top k tokens of each cell",
                         hint="pass top_k >= 1 (--top-k 5)")
    model = _fp32(model)
    device = next(model.parameters()).device
    tokens_1T = torch.tensor([token_ids], dtype=torch.long, device=device)
    with _eval_mode(model), _Capture(model) as capture:
        model(tokens_1T)
    attention_LHTT = torch.stack(capture.attention).float()
    entropy_LH = -torch.special.xlogy(attention_LHTT, attention_LHTT).sum(-1).mean(-1)
    top_ids_STK, top_probs_STK, next_prob_SN = _logit_lens(
        model, capture.residuals, tokens_1T[0], min(top_k, model.cfg.vocab_size))
    return Explanation(
        token_ids=list(token_ids), attention_LHTT=_numpy(attention_LHTT),
        attention_entropy_LH=_numpy(entropy_LH), lens_top_ids_STK=_numpy(top_ids_STK),
        lens_top_probs_STK=_numpy(top_probs_STK), lens_next_prob_SN=_numpy(next_prob_SN))


def _logit_lens(model: Llama, residuals: list[torch.Tensor], tokens_T: torch.Tensor,
                top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read each residual (1, T, D) out through the final norm and head, as the forward reads
    the last one: one row at a time, so only (T, V) probabilities are held at once."""
    top_ids, top_probs, next_probs = [], [], []
    for x_1TD in residuals:
        probs_TV = model.lm_head(model.norm(x_1TD))[0].float().softmax(dim=-1)
        top = probs_TV.topk(top_k, dim=-1)
        top_ids.append(top.indices)
        top_probs.append(top.values)
        next_probs.append(probs_TV[:-1].gather(-1, tokens_T[1:, None])[:, 0])
    return torch.stack(top_ids), torch.stack(top_probs), torch.stack(next_probs)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Tokens


def prompt_token_ids(tokenizer, prompt: str, eos_id: int, max_tokens: int,
                     warn: Callable[[str], None]) -> list[int]:
    """The prompt read as the start of a document, as `helox generate` reads it: EOS, then its
    tokens; cropped to the first `max_tokens` (the start keeps the document's positions)."""
    _check_prompt(prompt)
    token_ids = [eos_id, *tokenizer.encode(prompt, add_special_tokens=False).ids]
    if len(token_ids) > max_tokens:
        warn(f"the prompt is {len(token_ids)} tokens (with the leading end-of-document token); "
             f"explaining the first {max_tokens}")
        token_ids = token_ids[:max_tokens]
    return token_ids


def _check_prompt(prompt: str) -> None:
    if not prompt:
        raise HeloxError("the prompt is empty: there is nothing to explain",
                         hint='pass the text, e.g. --prompt "ROMEO. What light"')


def decode_ids(tokenizer, token_ids: set[int] | list[int]) -> dict[int, str]:
    """Each id's own text (special tokens included): a byte-level token that holds part of a
    UTF-8 character decodes to U+FFFD."""
    return {i: tokenizer.decode([i], skip_special_tokens=False) for i in sorted(set(token_ids))}


def visible(text: str, max_chars: int | None = None) -> str:
    """Whitespace made visible for labels (␣ space, ⏎ newline, ⇥ tab); ∅ for no text."""
    shown = text.translate(VISIBLE) or "∅"
    if max_chars is not None and len(shown) > max_chars:
        return shown[:max_chars - 1] + "…"
    return shown


def _axis_labels(explanation: Explanation, texts: dict[int, str]) -> list[str]:
    """Unique per position (plotly merges equal category labels): '3 ␣the'."""
    return [f"{t} {visible(texts[i], 16)}" for t, i in enumerate(explanation.token_ids)]


# ---------------------------------------------------------------------------------------------
# The CLI's entry point


def explain_run(run_dir: Path, prompt: str, out_dir: Path | None = None, *, top_k: int = 5,
                ema: bool = False, warn: Callable[[str], None] = _warn) -> Path:
    """Explain `prompt` with a run's newest valid checkpoint (or one checkpoint folder) and
    write the PNGs, JSON and HTML page into `out_dir`; returns that folder."""
    _check_prompt(prompt)  # before loading anything
    checkpoint = resolve_checkpoint(Path(run_dir), warn)
    trained = load_trained_model(checkpoint, ema=ema)
    model, tokenizer = trained.model, trained.tokenizer
    token_ids = prompt_token_ids(tokenizer, prompt, trained.eos_id,
                                 min(model.cfg.max_seq_len, MAX_TOKENS), warn)
    explanation = explain(model, token_ids, top_k)
    texts = decode_ids(tokenizer, explanation.all_ids())
    folder = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint, prompt, ema)
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(explanation.num_layers):
        attention_figure(explanation, texts, layer).savefig(folder / f"attention_layer{layer}.png")
    logit_lens_figure(explanation, texts).savefig(folder / "logit_lens.png")
    source = {"checkpoint": str(checkpoint), "step": _checkpoint_step(checkpoint, ema), "ema": ema}
    summary = json.dumps(summary_record(explanation, texts, prompt, source), ensure_ascii=False)
    (folder / "explain.json").write_text(summary, encoding="utf-8")
    page = explain_page(explanation, texts, prompt, source)
    (folder / "explain.html").write_text(page.render(), encoding="utf-8")
    return folder


def default_out_dir(checkpoint: Path, prompt: str, ema: bool) -> Path:
    """RUN_DIR/explain/<checkpoint>-<prompt hash>[-ema]: one folder per question, so
    explanations of other prompts and checkpoints are kept side by side."""
    run_dir = run_dir_of(checkpoint) or checkpoint.parent
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return run_dir / "explain" / f"{checkpoint.name}-{digest}{'-ema' if ema else ''}"


def _checkpoint_step(checkpoint: Path, ema: bool) -> int | None:
    """The step in the weights file's metadata, or format.json's when dcp/ holds the weights
    (a checkpoint folder may have been renamed)."""
    file = checkpoint / (EMA_WEIGHTS if ema else MODEL_WEIGHTS)
    if not file.is_file():
        step = read_format(checkpoint).get("step")
        return int(step) if step is not None else None
    with safe_open(str(file), "pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


def summary_record(explanation: Explanation, texts: dict[int, str], prompt: str,
                   source: dict) -> dict:
    """explain.json: everything but the attention weights themselves (the PNGs and the page
    hold those), with the token texts beside their ids."""
    top_ids_STK = explanation.lens_top_ids_STK
    return {
        "prompt": prompt, **source,
        "token_ids": explanation.token_ids,
        "tokens": [texts[i] for i in explanation.token_ids],
        "num_layers": explanation.num_layers,
        "num_heads": explanation.attention_LHTT.shape[1],
        "attention_entropy_nats": _rounded(explanation.attention_entropy_LH),
        "logit_lens": {
            "rows": explanation.lens_row_names(),
            "top_ids": top_ids_STK.tolist(),
            "top_tokens": [[[texts[i] for i in ids_K] for ids_K in ids_TK]
                           for ids_TK in top_ids_STK.tolist()],
            "top_probs": _rounded(explanation.lens_top_probs_STK),
            "next_token_prob": _rounded(explanation.lens_next_prob_SN),
        },
    }


def _rounded(values: np.ndarray, digits: int = 6) -> list:
    return np.round(values.astype(np.float64), digits).tolist()


# ---------------------------------------------------------------------------------------------
# PNGs (matplotlib's object-oriented API on the Agg canvas: no global pyplot state)


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def attention_figure(explanation: Explanation, texts: dict[int, str], layer: int):
    """The layer's heads in a grid, each a query x key heatmap on one 0..1 colour scale;
    the masked future (above the diagonal) is left blank."""
    import matplotlib as mpl

    attention_HTT = explanation.attention_LHTT[layer]
    num_heads, T = attention_HTT.shape[:2]
    cols = min(num_heads, HEAD_COLUMNS)
    rows = math.ceil(num_heads / cols)
    labelled = T <= LABELLED_TOKENS
    panel_in = max(3.0, 0.16 * T + 1.4) if labelled else 3.0
    fig = _figure(cols * panel_in + 1.0, rows * panel_in + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = mpl.colormaps["viridis"].with_extremes(bad="white")
    future_TT = np.triu(np.ones((T, T), dtype=bool), k=1)
    labels = [visible(texts[i], 10) for i in explanation.token_ids]
    for head, ax in enumerate(axes.flat):
        if head >= num_heads:
            ax.set_axis_off()
            continue
        image = ax.imshow(np.ma.masked_array(attention_HTT[head], future_TT), cmap=cmap,
                          vmin=0, vmax=1, interpolation="nearest")
        entropy = explanation.attention_entropy_LH[layer, head]
        ax.set_title(f"layer {layer} head {head} · entropy {entropy:.2f} nats", fontsize=9)
        _token_ticks(ax, labels if labelled else None, T)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    return fig


def _token_ticks(ax, labels: list[str] | None, T: int) -> None:
    if labels is None:
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
        ax.tick_params(labelsize=7)
        return
    size = 7 if T <= 24 else 6
    ax.set_xticks(range(T), labels, rotation=90, fontsize=size)
    ax.set_yticks(range(T), labels, fontsize=size)
    ax.set_xlabel("key", fontsize=8)
    ax.set_ylabel("query", fontsize=8)


def logit_lens_figure(explanation: Explanation, texts: dict[int, str]):
    """Rows: the embedding, then each block; columns: positions (input token below, actual
    next token above); each cell names the top-1 token, coloured by its probability."""
    top_ids_ST = explanation.lens_top_ids_STK[:, :, 0]
    top_probs_ST = explanation.lens_top_probs_STK[:, :, 0]
    S, T = top_ids_ST.shape
    fig = _figure(2.0 + 0.62 * T, 1.6 + 0.36 * S)
    ax = fig.subplots()
    image = ax.imshow(top_probs_ST, cmap="viridis", vmin=0, vmax=1, aspect="auto",
                      interpolation="nearest")
    next_ids = [*explanation.token_ids[1:], None]
    for s in range(S):
        for t in range(T):
            ax.text(t, s, visible(texts[int(top_ids_ST[s, t])], 7), ha="center", va="center",
                    fontsize=7, color="black" if top_probs_ST[s, t] > 0.55 else "white",
                    fontweight="bold" if top_ids_ST[s, t] == next_ids[t] else "normal")
    ax.set_xticks(range(T), [visible(texts[i], 8) for i in explanation.token_ids],
                  rotation=90, fontsize=7)
    ax.set_yticks(range(S), explanation.lens_row_names(), fontsize=8)
    ax.set_xlabel("input token")
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(T), ["" if i is None else visible(texts[i], 8) for i in next_ids],
                   rotation=90, fontsize=7)
    top.set_xlabel("actual next token (bold cell: the top-1 is right)")
    fig.colorbar(image, ax=ax, label="top-1 probability", shrink=0.8)
    return fig


# ---------------------------------------------------------------------------------------------
# The HTML page (plotly, one self-contained file)


def explain_page(explanation: Explanation, texts: dict[int, str], prompt: str,
                 source: dict) -> Page:
    """Prompt, logit lens (charts and top-k tables), attention per layer, then the token table."""
    page = Page(f"helox explain: {prompt if len(prompt) <= 60 else prompt[:59] + '…'}")
    step = "?" if source["step"] is None else source["step"]
    page.note(f"checkpoint {source['checkpoint']} (step {step}"
              f"{', EMA weights' if source['ema'] else ''})")
    page.raw(f"<pre>{html.escape(prompt)}</pre>")
    page.note(f"{len(explanation.token_ids)} tokens, read as the start of a document (the "
              "end-of-document token first). In labels ␣ is a space, ⏎ a newline.")
    _lens_section(page, explanation, texts)
    _attention_section(page, explanation, texts)
    _tokens_table(page, explanation, texts)
    return page


def _tokens_table(page: Page, explanation: Explanation, texts: dict[int, str]) -> None:
    page.heading("Tokens")
    final_next_N = explanation.lens_next_prob_SN[-1]
    rows = [[t, i, visible(texts[i]), "" if t >= len(final_next_N) else f"{final_next_N[t]:.4f}"]
            for t, i in enumerate(explanation.token_ids)]
    page.table(["position", "id", "token", "model's probability of the next token"], rows,
               numeric={0, 1, 3})


def _lens_section(page: Page, explanation: Explanation, texts: dict[int, str]) -> None:
    import plotly.graph_objects as go

    labels, rows = _axis_labels(explanation, texts), explanation.lens_row_names()
    top_ids_STK, top_probs_STK = explanation.lens_top_ids_STK, explanation.lens_top_probs_STK
    height = 120 + 34 * len(rows)
    page.heading("Logit lens", note="Each layer's residual stream read out through the final "
                                    "norm and head: the token it would predict next, coloured "
                                    "by its probability. The last row is the model's output.")
    hover = [[_top_k_text(ids_K, probs_K, texts, "<br>") for ids_K, probs_K in zip(ids_TK, p_TK)]
             for ids_TK, p_TK in zip(top_ids_STK.tolist(), top_probs_STK.tolist())]
    page.chart(go.Figure(go.Heatmap(
        z=top_probs_STK[:, :, 0], x=labels, y=rows, zmin=0, zmax=1, colorscale="Viridis",
        text=[[visible(texts[i], 8) for i in ids_T] for ids_T in top_ids_STK[:, :, 0].tolist()],
        texttemplate="%{text}", customdata=hover, colorbar=dict(title="top-1 p"),
        hovertemplate="%{y}, after %{x}<br>%{customdata}<extra></extra>"),
        layout=dict(yaxis_autorange="reversed")), height)
    page.heading("Probability of the actual next token",
                 note="The classic logit-lens view: how early each layer knows what comes next.")
    page.chart(go.Figure(go.Heatmap(
        z=explanation.lens_next_prob_SN, x=labels[:-1], y=rows, zmin=0, zmax=1,
        colorscale="Viridis", colorbar=dict(title="p(next)"),
        customdata=[[visible(texts[i]) for i in explanation.token_ids[1:]]] * len(rows),
        hovertemplate="%{y}, after %{x}<br>p(%{customdata}) = %{z:.4f}<extra></extra>"),
        layout=dict(yaxis_autorange="reversed")), height)
    _lens_tables(page, explanation, texts)


def _top_k_text(ids_K: list[int], probs_K: list[float], texts: dict[int, str], sep: str) -> str:
    return sep.join(f"{visible(texts[i], 16)} {p:.3f}" for i, p in zip(ids_K, probs_K))


def _lens_tables(page: Page, explanation: Explanation, texts: dict[int, str]) -> None:
    """Top-k per layer at the last position, and at every position of a short prompt."""
    T = len(explanation.token_ids)
    K = explanation.lens_top_ids_STK.shape[2]
    page.heading(f"Top {K} next tokens per layer",
                 note="The last position first" + (", then every position." if
                                                   T <= POSITION_TABLES_TOKENS else "."))
    positions = range(T) if T <= POSITION_TABLES_TOKENS else [T - 1]
    for t in reversed(positions):
        page.note(f"after position {t} ({visible(texts[explanation.token_ids[t]])})")
        rows = [[name, *(f"{visible(texts[i], 16)} ({p:.3f})" for i, p in zip(
                    explanation.lens_top_ids_STK[s, t].tolist(),
                    explanation.lens_top_probs_STK[s, t].tolist()))]
                for s, name in enumerate(explanation.lens_row_names())]
        page.table(["layer", *(f"#{k + 1}" for k in range(K))], rows)


def _attention_section(page: Page, explanation: Explanation, texts: dict[int, str]) -> None:
    page.heading("Attention", note="One chart per layer, one heatmap per head: row = query "
                                   "token, column = the key it attends to; weights sum to 1 "
                                   "along a row. Entropy in nats (0: one key).")
    labels = _axis_labels(explanation, texts)
    for layer in range(explanation.num_layers):
        figure, height = _attention_chart(explanation, labels, layer)
        page.chart(figure, height)


def _attention_chart(explanation: Explanation, labels: list[str], layer: int):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    attention_HTT = explanation.attention_LHTT[layer]
    num_heads, T = attention_HTT.shape[:2]
    cols = min(num_heads, HEAD_COLUMNS)
    rows = math.ceil(num_heads / cols)
    titles = [f"head {h} · {explanation.attention_entropy_LH[layer, h]:.2f} nats"
              for h in range(num_heads)]
    fig = make_subplots(rows, cols, subplot_titles=titles, horizontal_spacing=0.06,
                        vertical_spacing=0.5 / rows)
    future_TT = np.triu(np.ones((T, T), dtype=bool), k=1)
    for head in range(num_heads):
        fig.add_trace(go.Heatmap(
            z=np.where(future_TT, np.float32("nan"), attention_HTT[head]), x=labels, y=labels,
            coloraxis="coloraxis", name=f"head {head}",
            hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.4f}<extra>%{fullData.name}"
                          "</extra>"), row=head // cols + 1, col=head % cols + 1)
    fig.update_layout(title=dict(text=f"layer {layer}", x=0, font_size=14),
                      coloraxis=dict(cmin=0, cmax=1, colorscale="Viridis",
                                     colorbar=dict(title="weight")))
    labelled = T <= LABELLED_TOKENS
    fig.update_yaxes(autorange="reversed", showticklabels=labelled, tickfont_size=9,
                     automargin=True)
    fig.update_xaxes(showticklabels=labelled, tickfont_size=9, automargin=True)
    return fig, 90 + rows * (360 if T <= LABELLED_TOKENS else 300)
