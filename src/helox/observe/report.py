"""`helox report RUN_DIR`: the run's dashboard as one self-contained HTML file.

Reads only what the run folder holds, so it works on a finished, a crashed or a running run:
metrics.jsonl (steps, evaluations, telemetry scalars), telemetry.jsonl (attention-entropy maps,
histograms), events.jsonl (alerts and actions), run.json (fingerprint), config.yaml, and the
dataset version's lineage.json and report.json when the dataset is still in the workspace.

Series longer than MAX_POINTS are thinned by keeping each bucket's minimum and maximum, so a
million-step run stays a few MB and a one-step spike stays visible.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helox.data.shards import DatasetVersion
from helox.data.versions import run_dataset
from helox.errors import HeloxError
from helox.observe.html import Page

MAX_POINTS = 4000
"""Points per step series in the page (min/max-preserving buckets beyond that)."""
SMOOTHING_STEPS = 20
"""Time constant of the exponential moving average drawn over the training loss."""
MAX_EVENT_MARKERS = 60
"""Vertical event markers on the loss chart (the alert table lists every event)."""
SEVERITY_COLOURS = {"critical": "#b3261e", "warning": "#d4a017", "info": "#3b6ea5"}


@dataclass
class RunRecord:
    """Everything the dashboard shows, read from a run folder."""

    run_dir: Path
    steps: list[dict] = field(default_factory=list)
    """One training step per row (metrics.jsonl lines without "event" that carry a loss)."""
    evals: list[dict] = field(default_factory=list)
    telemetry: list[dict] = field(default_factory=list)
    """Telemetry scalars per sample (metrics.jsonl "event": "telemetry")."""
    suite_evals: list[dict] = field(default_factory=list)
    """The eval suite run during training (metrics.jsonl "event": "eval")."""
    suite_results: list[dict] = field(default_factory=list)
    """results.json of every `helox eval` of this run (RUN_DIR/evals/SUITE/VERSION/)."""
    maps: list[dict] = field(default_factory=list)
    """telemetry.jsonl: attention-entropy maps and histograms per sample."""
    events: list[dict] = field(default_factory=list)
    run_info: dict = field(default_factory=dict)
    config_text: str = ""
    dataset_path: Path | None = None

    @property
    def name(self) -> str:
        return self.run_dir.resolve().name


def read_jsonl(path: Path) -> list[dict]:
    """JSON lines; a line torn by a crash (or being written now) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def load_run(run_dir: Path) -> RunRecord:
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise HeloxError(f"{run_dir}: no metrics.jsonl, so not a Helox run folder",
                         hint="pass the folder `helox train` wrote, e.g. workspace/runs/NAME")
    record = RunRecord(run_dir)
    for row in read_jsonl(metrics_path):
        if row.get("event") == "telemetry":
            record.telemetry.append(row)
        elif row.get("event") == "eval":
            record.suite_evals.append(row)
        elif "val_loss" in row:
            record.evals.append(row)
        elif "loss" in row and "event" not in row:
            record.steps.append(row)
    record.maps = read_jsonl(run_dir / "telemetry.jsonl")
    record.suite_results = [json.loads(p.read_text()) for p in
                            sorted(run_dir.glob("evals/*/*/results.json"))
                            if p.parent.parent.name != "lm-eval"]
    record.events = read_jsonl(run_dir / "events.jsonl")
    if (run_dir / "run.json").is_file():
        record.run_info = json.loads((run_dir / "run.json").read_text())
    if (run_dir / "config.yaml").is_file():
        record.config_text = (run_dir / "config.yaml").read_text()
    dataset = run_dataset(run_dir, record.run_info)
    record.dataset_path = dataset.path if dataset is not None else None
    return record


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Build the dashboard of `run_dir` and write it (default RUN_DIR/report.html)."""
    record = load_run(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(build_report(record).render(), encoding="utf-8")
    tmp.replace(path)
    return path


def build_report(record: RunRecord) -> Page:
    page = Page(f"Helox run {record.name}")
    for section in (summary_section, loss_section, preference_section, optimizer_section,
                    throughput_section,
                    attention_section, activation_section, dead_units_section, drift_section,
                    evaluation_section,
                    alerts_section, fingerprint_section, lineage_section):
        section(page, record)
    return page


# ---------------------------------------------------------------------------------------------
# Series helpers


def series(rows: list[dict], key: str) -> tuple[list[int], list[float | None]]:
    """(steps, values) of the rows holding `key`; non-finite values become gaps (None)."""
    steps, values = [], []
    for row in rows:
        if key in row:
            steps.append(row["step"])
            value = row[key]
            values.append(value if isinstance(value, (int, float)) and math.isfinite(value)
                          else None)
    return steps, values


def thin(steps: list[int], values: list[float | None], max_points: int = MAX_POINTS,
         ) -> tuple[list[int], list[float | None]]:
    """At most ~max_points points: per bucket, the minimum and the maximum in step order."""
    if len(steps) <= max_points:
        return steps, values
    finite = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    keep: list[int] = []
    for bucket in np.array_split(np.arange(len(steps)), max_points // 2):
        chunk = finite[bucket]
        if np.isnan(chunk).all():
            keep.append(int(bucket[0]))
            continue
        keep += sorted({int(bucket[np.nanargmin(chunk)]), int(bucket[np.nanargmax(chunk)])})
    return [steps[i] for i in keep], [values[i] for i in keep]


def smoothed(values: list[float | None], time_constant_steps: int) -> list[float | None]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing); gaps
    stay gaps and do not move the average."""
    decay = 1 - 1 / time_constant_steps
    average, weight, out = 0.0, 0.0, []
    for value in values:
        if value is None:
            out.append(None)
            continue
        average = decay * average + (1 - decay) * value
        weight = decay * weight + (1 - decay)
        out.append(average / weight)
    return out


def smoothed_loss(steps_rows: list[dict]) -> dict:
    """x and y of the training loss's moving average, thinned."""
    steps, values = series(steps_rows, "loss")
    steps, values = thin(steps, smoothed(values, SMOOTHING_STEPS))
    return {"x": steps, "y": values}


def layer_keys(rows: list[dict], prefix: str) -> list[str]:
    """`prefix.layer{l}` keys present in the rows, in layer order."""
    found = {k for row in rows for k in row if k.startswith(prefix + ".layer")
             and k[len(prefix) + 6:].isdigit()}
    return sorted(found, key=lambda k: int(k[len(prefix) + 6:]))


def line(fig, rows: list[dict], key: str, name: str | None = None, mode: str = "lines",
         **kwargs) -> bool:
    """Add the thinned series `key` as a line; False when no row holds it."""
    import plotly.graph_objects as go

    steps, values = series(rows, key)
    if not steps:
        return False
    steps, values = thin(steps, values)
    fig.add_trace(go.Scatter(x=steps, y=values, name=name or key, mode=mode, **kwargs))
    return True


def lines_chart(page: Page, rows: list[dict], keys, title: str, y_title: str, *,
                log_y: bool = False, label=None, mode: str = "lines+markers",
                height_px: int = 360) -> None:
    """One chart of the series `keys` (each named `label(key)`, default the key)."""
    fig = figure(title, y_title, log_y)
    for key in keys:
        line(fig, rows, key, name=label(key) if label else None, mode=mode)
    page.chart(fig, height_px)


def layer_of(key: str) -> str:
    """'dead_neuron_count.layer3' -> 'layer3'."""
    return key.split(".")[1]


def figure(title: str, y_title: str = "", log_y: bool = False):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=y_title,
                      legend=dict(orientation="h", y=-0.2), hovermode="x unified")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def final(rows: list[dict], key: str) -> float | None:
    values = [v for _, v in zip(*series(rows, key)) if v is not None]
    return values[-1] if values else None


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# ---------------------------------------------------------------------------------------------
# Sections


def summary_section(page: Page, rec: RunRecord) -> None:
    last = rec.steps[-1] if rec.steps else {}
    losses = [v for v in series(rec.steps, "loss")[1][-SMOOTHING_STEPS:] if v is not None]
    best_val = min((v for v in series(rec.evals, "val_loss")[1] if v is not None), default=None)
    severities: dict[str, int] = {}
    for event in rec.events:
        severities[event.get("severity", "info")] = severities.get(
            event.get("severity", "info"), 0) + 1
    tokens_per_s = [v for v in series(rec.steps, "tokens_per_s")[1][1:] if v is not None]
    rows = [
        ["last step", _fmt(last.get("step"))], ["tokens seen", _fmt(last.get("tokens_seen"))],
        [f"training loss (mean of the last {len(losses)} steps)",
         _fmt(sum(losses) / len(losses) if losses else None)],
        ["last validation loss", _fmt(final(rec.evals, "val_loss"))],
        ["best validation loss", _fmt(best_val)],
        ["skipped steps", _fmt(last.get("skipped_steps"))],
        ["median tokens/s", _fmt(float(np.median(tokens_per_s)) if tokens_per_s else None)],
        ["events", ", ".join(f"{n} {s}" for s, n in sorted(severities.items())) or "none"],
        ["precision, device", f"{rec.run_info.get('precision', '?')}, "
                              f"{rec.run_info.get('device', '?')}"],
        ["run fingerprint", rec.run_info.get("fingerprint", "—")],
    ]
    page.heading("Summary")
    page.table(["", "value"], rows)


def loss_section(page: Page, rec: RunRecord) -> None:
    import plotly.graph_objects as go

    page.heading("Loss", "Training loss of the accepted steps (thin line) with its moving "
                         "average, and the validation loss per domain. Skipped steps (non-finite, "
                         "spike, overflow) are red crosses, drawn at the top edge when off the "
                         "scale; dotted lines mark warnings and critical events (see Alerts).")
    accepted = [row for row in rec.steps if not row.get("skipped")]
    fig = figure("training and validation loss", "loss (nats/token)")
    line(fig, accepted, "loss", line=dict(width=1, color="rgba(31,119,180,0.35)"))
    fig.add_trace(go.Scatter(**smoothed_loss(accepted), name=f"loss (EMA {SMOOTHING_STEPS} steps)",
                             mode="lines", line=dict(width=2, color="#1f77b4")))
    for key in ["val_loss", "val_loss_ema", *sorted(
            {k for row in rec.evals for k in row if k.startswith("val_loss.")})]:
        line(fig, rec.evals, key, mode="lines+markers",
             line=dict(width=3 if key == "val_loss" else 1.5))
    y_range = _loss_axis_range(accepted, rec.evals)
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    _skipped_markers(fig, rec.steps, y_range[1] if y_range else None)
    _event_markers(fig, rec.events)
    page.chart(fig, height_px=440)


def _loss_axis_range(accepted: list[dict], evals: list[dict]) -> tuple[float, float] | None:
    """The range of the accepted training losses and every validation loss, padded 5%."""
    values = [v for v in series(accepted, "loss")[1] if v is not None]
    values += [v for row in evals for k, v in row.items()
               if k.startswith("val_loss") and isinstance(v, float) and math.isfinite(v)]
    if not values:
        return None
    pad = 0.05 * max(max(values) - min(values), 1e-3)
    return min(values) - pad, max(values) + pad


def _skipped_markers(fig, steps: list[dict], top: float | None) -> None:
    import plotly.graph_objects as go

    skipped = [row for row in steps if row.get("skipped")]
    if not skipped:
        return
    ys, labels = [], []
    for row in skipped:
        loss = row.get("loss", math.nan)
        on_scale = math.isfinite(loss) and (top is None or loss <= top)
        ys.append(loss if on_scale else top)
        labels.append(f"loss {loss:.4g} ({row['skipped']})")
    fig.add_trace(go.Scatter(x=[row["step"] for row in skipped], y=ys, mode="markers",
                             name="skipped step", text=labels, hovertemplate="%{text}",
                             marker=dict(symbol="x", size=9, color="#b3261e")))


def _event_markers(fig, events: list[dict]) -> None:
    marked = [e for e in events if e.get("severity") in ("critical", "warning")]
    for event in marked[:MAX_EVENT_MARKERS]:
        fig.add_vline(x=event["step"], line_dash="dot", line_width=1,
                      line_color=SEVERITY_COLOURS[event["severity"]])


def optimizer_section(page: Page, rec: RunRecord) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    page.heading("Optimizer", "Learning rate against the loss, and the gradient norm before and "
                              "after clipping with the clipping threshold.")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    line(fig, rec.steps, "lr", name="learning rate", line=dict(color="#ff7f0e"))
    accepted = [row for row in rec.steps if not row.get("skipped")]
    fig.add_trace(go.Scatter(**smoothed_loss(accepted), name="loss (EMA)", mode="lines",
                             line=dict(color="#1f77b4")), secondary_y=True)
    fig.update_layout(title="learning rate vs loss", hovermode="x unified",
                      legend=dict(orientation="h", y=-0.2))
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="learning rate", secondary_y=False)
    fig.update_yaxes(title_text="loss (nats/token)", secondary_y=True)

    def build() -> None:
        page.chart(fig)
        grads = figure("gradient norm", "L2 norm", log_y=True)
        for key in ("grad_norm", "grad_norm_clipped", "clip_norm"):
            line(grads, rec.steps, key, line=dict(dash="dash") if key == "clip_norm" else {})
        page.chart(grads)
        if any("loss_scale" in row for row in rec.steps):
            scale = figure("fp16 loss scale", "scale", log_y=True)
            line(scale, rec.steps, "loss_scale")
            page.chart(scale)
    page.grid(build)


def preference_section(page: Page, rec: RunRecord) -> None:
    """A DPO run's rewards and preference accuracy (TRL's names), training and held out;
    nothing for other runs."""
    if not any("rewards/margins" in row for row in rec.steps):
        return
    page.heading("Preference training (DPO)")

    def build() -> None:
        lines_chart(page, rec.steps, ["rewards/chosen", "rewards/rejected", "rewards/margins"],
                    "implicit rewards β·log(π/π_ref), training pairs", "reward", mode="lines")
        fig = figure("preference accuracy", "share of pairs with chosen reward > rejected")
        line(fig, rec.steps, "rewards/accuracies", "training")
        line(fig, rec.evals, "val_rewards/accuracies", "held out", mode="lines+markers")
        page.chart(fig, 360)
        lines_chart(page, rec.steps, ["logps/chosen", "logps/rejected", "ref_logps/chosen",
                                      "ref_logps/rejected"],
                    "log-probabilities of the responses", "nats", mode="lines")
    page.grid(build)


def throughput_section(page: Page, rec: RunRecord) -> None:
    page.heading("Throughput and memory")

    def build() -> None:
        for key, title, y_title in (
                ("tokens_per_s", "tokens per second", "tokens/s"),
                ("mfu", "model FLOPs utilisation", "fraction of the measured matmul peak"),
                ("memory_peak_mib", "peak memory", "MiB")):
            if any(key in row for row in rec.steps):
                lines_chart(page, rec.steps, [key], title, y_title, mode="lines")
    page.grid(build)


def _telemetry_off(page: Page, rec: RunRecord) -> bool:
    if rec.telemetry:
        return False
    page.note("No telemetry sample in this run (observe.telemetry.sample_every_steps is 0, or "
              "the run stopped before the first sample).")
    return True


def attention_section(page: Page, rec: RunRecord) -> None:
    import plotly.graph_objects as go

    page.heading("Attention", "Mean attention entropy (nats) of each head on the probe batch at "
                              "each telemetry sample. A head near 0 attends to one token "
                              "(collapsed); ln(context) is uniform attention.")
    if _telemetry_off(page, rec):
        return
    maps = [m for m in rec.maps if m.get("attn_entropy_LH")]
    if maps:
        entropy_SLH = np.array([m["attn_entropy_LH"] for m in maps], dtype=np.float64)
        S, L, H = entropy_SLH.shape
        rows = [f"L{layer}.H{head}" for layer in range(L) for head in range(H)]
        fig = go.Figure(go.Heatmap(
            z=entropy_SLH.reshape(S, L * H).T, x=[m["step"] for m in maps], y=rows,
            colorscale="Viridis", colorbar=dict(title="nats"),
            hovertemplate="step %{x}<br>%{y}<br>entropy %{z:.3f} nats<extra></extra>"))
        fig.update_layout(title="attention entropy per layer and head over steps",
                          xaxis_title="step", yaxis=dict(autorange="reversed"))
        page.chart(fig, height_px=max(320, 16 * L * H + 120))

    def build() -> None:
        lines_chart(page, rec.telemetry, layer_keys(rec.telemetry, "attn_entropy"),
                    "mean attention entropy per layer", "nats", label=layer_of)
        lines_chart(page, rec.telemetry, ["collapsed_heads", "dead_heads"],
                    "collapsed and dead heads", "heads")
    page.grid(build)


def activation_section(page: Page, rec: RunRecord) -> None:
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale

    page.heading("Activations", "Per-token L2 norm of each block's output on the probe batch: "
                                "its histogram at each sample (darker is earlier), and the mean "
                                "and maximum over steps.")
    if _telemetry_off(page, rec):
        return
    names = sorted({n for m in rec.maps for n in m.get("histograms", {})
                    if n.startswith("act_norm.")}, key=lambda n: int(n.split("layer")[-1]))

    def build() -> None:
        for name in names:
            samples = [m for m in rec.maps if name in m.get("histograms", {})]
            colours = sample_colorscale("Viridis", np.linspace(0, 1, len(samples)).tolist())
            fig = figure(f"{layer_of(name)}: histogram of token norms", "tokens")
            for colour, sample in zip(colours, samples):
                edges = np.array(sample["histograms"][name]["bin_edges"])
                centres = ((edges[:-1] + edges[1:]) / 2).tolist()
                fig.add_trace(go.Scatter(x=centres, y=sample["histograms"][name]["counts"],
                                         mode="lines", line=dict(shape="hvh", color=colour),
                                         name=f"step {sample['step']}"))
            fig.update_layout(xaxis_title="L2 norm", hovermode="closest")
            page.chart(fig, height_px=320)
        norms = figure("activation norm per layer", "L2 norm")
        for key in layer_keys(rec.telemetry, "act_norm_mean"):
            line(norms, rec.telemetry, key, name=f"mean {layer_of(key)}", mode="lines+markers")
        for key in layer_keys(rec.telemetry, "act_norm_max"):
            line(norms, rec.telemetry, key, name=f"max {layer_of(key)}",
                 mode="lines+markers", line=dict(dash="dot"))
        page.chart(norms, height_px=320)
    page.grid(build)


def dead_units_section(page: Page, rec: RunRecord) -> None:
    page.heading("Dead units", "SwiGLU units inactive on every probe token over the window of "
                               "samples (observe.telemetry.dead_neuron_window_samples), per layer.")
    if _telemetry_off(page, rec):
        return

    def build() -> None:
        lines_chart(page, rec.telemetry, layer_keys(rec.telemetry, "dead_neuron_count"),
                    "dead neurons per layer", "units", label=layer_of)
        lines_chart(page, rec.telemetry, ["dead_neurons"], "dead neurons, all layers",
                    "fraction of units")
    page.grid(build)


def drift_section(page: Page, rec: RunRecord) -> None:
    page.heading("Data drift and calibration", "JS divergence (nats) of the tokens trained on "
                 "since the previous sample against the dataset's unigram distribution, beside "
                 "the floor that sampling noise alone gives; rare-token mass over data share "
                 "(1 is calibrated, near 0 the rare tokens collapsed); probe loss percentiles.")
    if _telemetry_off(page, rec):
        return

    def build() -> None:
        drift = figure("token-frequency drift", "nats")
        line(drift, rec.telemetry, "token_drift_js", mode="lines+markers")
        line(drift, rec.telemetry, "token_drift_js_floor", line=dict(dash="dash"))
        page.chart(drift)
        lines_chart(page, rec.telemetry, ["rare_token_mass_ratio"],
                    "rare-token mass / data share", "ratio")
        lines_chart(page, rec.telemetry, ["loss_p10", "loss_p50", "loss_p90", "loss_p99"],
                    "probe per-token loss percentiles", "nats")
        domains = sorted({k for row in rec.telemetry for k in row if k.startswith("ppl.")})
        lines_chart(page, rec.telemetry, ["ppl", *domains], "probe perplexity per domain",
                    "perplexity", log_y=True)
    page.grid(build)


def evaluation_section(page: Page, rec: RunRecord) -> None:
    page.heading("Evaluation", "The eval suite run during training (evaluation.suite), and "
                 "every `helox eval` of this run's checkpoints with its gate.")
    if not rec.suite_evals and not rec.suite_results:
        page.note("No evaluation: neither evaluation.suite during training nor `helox eval` "
                  "on this run.")
        return
    if rec.suite_evals:
        keys = sorted({k for row in rec.suite_evals for k in row if k.startswith("eval.")})
        accuracy = [k for k in keys if ".accuracy" in k and not k.endswith(".contaminated")]
        ppl = [k for k in keys if ".ppl" in k and not k.endswith(".contaminated")]

        def build() -> None:
            if accuracy:
                lines_chart(page, rec.suite_evals, accuracy, "suite accuracies", "accuracy",
                            label=lambda k: k.removeprefix("eval."))
            if ppl:
                lines_chart(page, rec.suite_evals, ppl, "suite perplexities", "perplexity",
                            log_y=True, label=lambda k: k.removeprefix("eval."))
        page.grid(build)
    rows = []
    for result in rec.suite_results:
        for task, info in result["tasks"].items():
            for metric, est in info["metrics"].items():
                bound = info["thresholds"].get(metric)
                gate = "" if bound is None else ("pass" if bound["passed"] else "FAIL")
                rows.append([result["suite"], result["model"]["version"], task, metric,
                             _fmt(est["value"]), f"[{_fmt(est['ci_low'])}, "
                             f"{_fmt(est['ci_high'])}]", est["n"], gate])
    if rows:
        page.table(["suite", "version", "task", "metric", "value", "95% interval", "n", "gate"],
                   rows, numeric={4, 6})


def alerts_section(page: Page, rec: RunRecord) -> None:
    import plotly.graph_objects as go

    page.heading("Alerts and actions", "Every line of events.jsonl: health alerts, skipped "
                 "steps, rollbacks, stops. The runbook column names the entry in "
                 "docs/runbooks.md.")
    if not rec.events:
        page.note("No events: no alert fired and no recovery action was taken.")
        return
    fig = go.Figure()
    for severity, colour in SEVERITY_COLOURS.items():
        chosen = [e for e in rec.events if e.get("severity", "info") == severity]
        if chosen:
            fig.add_trace(go.Scatter(
                x=[e["step"] for e in chosen], y=[_event_name(e) for e in chosen],
                mode="markers", name=severity, marker=dict(color=colour, size=11),
                text=[_event_details(e) for e in chosen],
                hovertemplate="step %{x}: %{y}<br>%{text}<extra></extra>"))
    fig.update_layout(title="alerts timeline", xaxis_title="step", hovermode="closest")
    page.chart(fig, height_px=max(260, 40 * len({_event_name(e) for e in rec.events}) + 140))
    rows = [[e["step"], _event_name(e), e.get("severity", "info"), _event_details(e),
             e.get("action", ""), e.get("runbook", "")] for e in rec.events]
    page.table(["step", "event", "severity", "details", "action", "runbook"], rows, numeric={0},
               cell_classes=[f"sev-{e.get('severity', 'info')}" for e in rec.events])


EVENT_FRAME = frozenset({"step", "event", "alert", "severity", "runbook", "action", "message"})


def _event_details(event: dict) -> str:
    """The alert's message, or the event's own values (loss, z-score, checkpoint, ...)."""
    if event.get("message"):
        return event["message"]
    return ", ".join(f"{k} {_fmt(v)}" for k, v in event.items() if k not in EVENT_FRAME)


def _event_name(event: dict) -> str:
    return event.get("alert", event.get("event", "?")) if event.get("event") == "alert" \
        else event.get("event", "?")


def fingerprint_section(page: Page, rec: RunRecord) -> None:
    page.heading("Run fingerprint", "run.json: what identifies the run (config, data, code, "
                                    "libraries, hardware) and the hash over them.")
    if not rec.run_info:
        page.note("No run.json in the run folder.")
        return
    page.table(["field", "value"], [[k, v] for k, v in _flatten(rec.run_info)])
    if rec.config_text:
        page.raw(f"<details><summary>config.yaml</summary><pre>{html.escape(rec.config_text)}"
                 "</pre></details>")


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, str]]:
    items = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items += _flatten(value, name + ".")
        else:
            items.append((name, json.dumps(value) if isinstance(value, (list, dict)) else value))
    return items


def lineage_section(page: Page, rec: RunRecord) -> None:
    version = rec.run_info.get("dataset_version", "?")
    page.heading("Dataset lineage", f"Dataset version {version}: its parents, sources and what "
                                    "each pipeline step kept.")
    if rec.dataset_path is None:
        page.note(f"Dataset version {version} is not in this workspace any more, so its lineage "
                  "cannot be shown.")
        return
    dataset = DatasetVersion(rec.dataset_path)
    lineage = dataset.lineage
    page.table(["field", "value"], [
        ["version", dataset.version], ["name", dataset.name],
        ["created", lineage.get("created_at", "?")], ["by", lineage.get("principal", "?")],
        ["parents", ", ".join(lineage.get("parents") or []) or "none"],
        ["pipeline", " → ".join(s["step"] for s in lineage.get("pipeline", [])) or "none"],
        *[[f"{split} tokens / documents", f"{info['num_tokens']:,} / {info['num_documents']:,}"]
          for split, info in dataset.manifest["splits"].items()]])
    sources = [[split, s["path"], s.get("trust"), f.get("sha256", "")[:16]]
               for split, split_sources in lineage.get("sources", {}).items()
               for s in split_sources for f in s.get("files", [])]
    if sources:
        page.table(["split", "source", "trust", "sha256 (first 16)"], sources)
    ancestors = _ancestors(dataset)
    if ancestors:
        page.note("Earlier versions this one descends from (parent first):")
        page.table(["version", "name", "created", "by", "train tokens"], ancestors,
                   numeric={4})
    _pipeline_funnel(page, dataset.report.get("splits", {}))


def _ancestors(dataset, max_depth: int = 20) -> list[list]:
    """The chain of first parents that are still in the workspace, nearest first."""
    rows, parents = [], dataset.lineage.get("parents") or []
    while parents and len(rows) < max_depth:
        folder = dataset.path.parent / parents[0]
        if not (folder / "manifest.json").is_file():
            rows.append([parents[0], "(not in this workspace)", "", "", ""])
            break
        dataset = DatasetVersion(folder)
        lineage = dataset.lineage
        rows.append([dataset.version, dataset.name, lineage.get("created_at", "?"),
                     lineage.get("principal", "?"), f"{dataset.split('train')['num_tokens']:,}"])
        parents = lineage.get("parents") or []
    return rows


def _pipeline_funnel(page: Page, splits: dict[str, list[dict]]) -> None:
    import plotly.graph_objects as go

    if not splits.get("train"):
        return
    steps = splits["train"]
    fig = go.Figure(go.Funnel(y=[s["step"] for s in steps], x=[s["docs_out"] for s in steps],
                              textinfo="value+percent initial"))
    fig.update_layout(title="training documents kept after each pipeline step")
    page.chart(fig, height_px=60 + 40 * len(steps))
    rows = [[split, s["step"], s["docs_in"], s["docs_out"],
             ", ".join(f"{r} {n:,}" for r, n in sorted(s["dropped"].items(),
                                                        key=lambda kv: -kv[1]))]
            for split, split_steps in splits.items() for s in split_steps if s["dropped"]]
    if rows:
        page.table(["split", "step", "in", "kept", "dropped (reason count)"], rows,
                   numeric={2, 3})
