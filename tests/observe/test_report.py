"""`helox report`: the dashboard of a run engineered to have every kind of content, checked
against the run's own files, and opened in headless Chromium with the network cut off."""

import base64
import json
import re

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from helox.cli import app
from helox.errors import HeloxError
from helox.observe.metrics import read_metrics
from helox.observe.report import build_report, load_run, smoothed, thin, write_report
from helox.testing.browser import find_chromium, render
from helox.testing.tiny import tiny_config
from helox.training.loop import train

# Telemetry every 2 steps, an evaluation every 4, a NaN step and a spike the detector catches.
ENGINEERED = ["train.max_steps=12", "train.eval_every_steps=4", "checkpoint.every_steps=6",
              "observe.telemetry.sample_every_steps=2",
              "stability.spike={window_steps: 8, min_history: 4}",
              "faults.nan_loss_at_steps=[6]", "faults.spike_at_steps=[10]",
              "evaluation.suite=quickstart", "evaluation.every_steps=4",
              "evaluation.tasks=[domain_perplexity]"]


@pytest.fixture(scope="module")
def engineered_run(tiny_dataset, workspace, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "run"
    train(tiny_config(workspace, ENGINEERED), run_dir, tiny_dataset, console=Console(quiet=True))
    return run_dir


def figure_titled(page, title: str) -> dict:
    found = [f for f in page.figures.values() if f["layout"].get("title", {}).get("text") == title]
    assert len(found) == 1, f"{title!r}: {len(found)} figures"
    return found[0]


def decoded(array) -> np.ndarray:
    """A figure's array as JSON holds it: a list, or plotly's base64 typed array."""
    if isinstance(array, dict):
        shape = [int(n) for n in str(array.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(array["bdata"]), array["dtype"]).reshape(shape)
    return np.array(array)


def trace(fig: dict, name: str) -> dict:
    return next(t for t in fig["data"] if t.get("name") == name)


def test_charts_hold_the_runs_own_numbers(engineered_run):
    page = build_report(load_run(engineered_run))
    metrics = read_metrics(engineered_run / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m and "event" not in m]
    loss_fig = figure_titled(page, "training and validation loss")
    accepted = [m for m in steps if "skipped" not in m]
    assert [m["step"] for m in steps if "skipped" in m] == [6, 10]  # the NaN and the spike
    loss = trace(loss_fig, "loss")
    assert loss["x"] == [m["step"] for m in accepted]
    assert loss["y"] == pytest.approx([m["loss"] for m in accepted])
    # The y axis spans the accepted and validation losses; the spike is drawn at its top edge
    # and the NaN step too, each with its real loss in the hover text.
    low, high = loss_fig["layout"]["yaxis"]["range"]
    assert low < min(loss["y"]) and max(loss["y"]) < high < steps[9]["loss"]
    skipped = trace(loss_fig, "skipped step")
    assert skipped["x"] == [6, 10] and skipped["y"] == [high, high]
    assert skipped["text"] == ["loss nan (nonfinite)", f"loss {steps[9]['loss']:.4g} (loss_spike)"]
    val = trace(figure_titled(page, "training and validation loss"), "val_loss")
    assert val["x"] == [4, 8, 12]

    maps = read_metrics(engineered_run / "telemetry.jsonl")
    heatmap = figure_titled(page, "attention entropy per layer and head over steps")["data"][0]
    entropy_SLH = np.array([m["attn_entropy_LH"] for m in maps])
    assert heatmap["x"] == [m["step"] for m in maps] == [2, 4, 6, 8, 10, 12]
    assert heatmap["y"][:5] == ["L0.H0", "L0.H1", "L0.H2", "L0.H3", "L1.H0"]
    np.testing.assert_allclose(decoded(heatmap["z"]), entropy_SLH.reshape(6, -1).T)

    histogram = figure_titled(page, "layer1: histogram of token norms")
    last = maps[-1]["histograms"]["act_norm.layer1"]
    edges = np.array(last["bin_edges"])
    np.testing.assert_allclose(trace(histogram, "step 12")["x"], (edges[:-1] + edges[1:]) / 2)
    assert trace(histogram, "step 12")["y"] == last["counts"]

    drift = trace(figure_titled(page, "token-frequency drift"), "token_drift_js")
    telemetry = [m for m in metrics if m.get("event") == "telemetry"]
    assert drift["y"] == pytest.approx([m["token_drift_js"] for m in telemetry])
    assert trace(figure_titled(page, "dead neurons per layer"), "layer0")["x"] == [2, 4, 6, 8,
                                                                                   10, 12]


def test_the_suite_run_in_training_and_helox_eval_results_are_on_the_page(engineered_run):
    from helox.eval.runner import evaluate

    outcome = evaluate(engineered_run, "quickstart")
    page = build_report(load_run(engineered_run))
    evals = [m for m in read_metrics(engineered_run / "metrics.jsonl") if m.get("event") == "eval"]
    ppl = trace(figure_titled(page, "suite perplexities"), "domain_perplexity.ppl")
    assert ppl["x"] == [4, 8, 12]
    assert ppl["y"] == pytest.approx([m["eval.domain_perplexity.ppl"] for m in evals])
    html = page.render()
    assert outcome.result.model_version in html and "<td>domain_choice</td>" in html


def test_alerts_fingerprint_and_lineage_are_on_the_page(engineered_run):
    record = load_run(engineered_run)
    html = build_report(record).render()
    events = [e["event"] for e in read_metrics(engineered_run / "events.jsonl")]
    assert "nonfinite_step_skipped" in events and "loss_spike" in events
    timeline = figure_titled(build_report(record), "alerts timeline")
    marked = {y for t in timeline["data"] for y in t["y"]}
    assert {"nonfinite_step_skipped", "loss_spike"} <= marked
    for name in events:
        assert f"<td>{name}</td>" in html
    run_info = json.loads((engineered_run / "run.json").read_text())
    assert run_info["fingerprint"] in html and run_info["dataset_version"] in html
    assert "training documents kept after each pipeline step" in html  # the dataset's report
    assert "<td>pipeline</td><td>none</td>" in html  # tiny_config runs no pipeline step
    # Self-contained: no script, style sheet or image fetched from anywhere.
    assert not re.search(r"<(script|img|iframe)[^>]+src=", html)
    assert not re.search(r"<link[^>]+href=", html)


def test_html_renders_every_chart_in_headless_chromium_without_network(engineered_run,
                                                                        tmp_path):
    if find_chromium() is None:
        pytest.skip("no Chromium on PATH: `make chromium` installs Debian's (needs apt-get as "
                    "root); the dashboard's rendering is not checked")
    from PIL import Image

    path = write_report(engineered_run, tmp_path / "report.html")
    expected_charts = len(build_report(load_run(engineered_run)).figures)
    screenshot = tmp_path / "report.png"
    rendered = render(path, screenshot=screenshot, window_px=(1400, 6000))
    assert rendered.errors == ""
    assert rendered.charts_expected == expected_charts >= 18
    assert rendered.charts_rendered == expected_charts
    # Plotly drew the data: the heatmap's image and the loss line's path are in the DOM.
    assert 'class="hm"' in rendered.dom or "heatmaplayer" in rendered.dom
    assert rendered.dom.count('class="scatterlayer') >= expected_charts - 2
    with Image.open(screenshot) as image:
        assert image.size == (1400, 6000)
        lows, highs = zip(*image.convert("RGB").getextrema())
        assert max(highs) - min(lows) > 200  # not a blank page


def test_a_run_without_telemetry_or_events_says_so(tiny_dataset, workspace, tmp_path):
    run_dir = tmp_path / "plain"
    train(tiny_config(workspace, ["train.max_steps=4", "observe.telemetry.sample_every_steps=0"]),
          run_dir, tiny_dataset, console=Console(quiet=True))
    html = build_report(load_run(run_dir)).render()
    assert "No telemetry sample in this run" in html
    assert "No events: no alert fired" in html


def test_cli_writes_the_report_and_refuses_a_folder_that_is_no_run(engineered_run, tmp_path):
    out = tmp_path / "r.html"
    result = CliRunner().invoke(app, ["report", str(engineered_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1_000_000  # plotly.js is inline
    with pytest.raises(HeloxError, match="no metrics.jsonl"):
        load_run(tmp_path)


def test_a_torn_last_line_is_skipped(engineered_run, tmp_path):
    run_dir = tmp_path / "torn"
    run_dir.mkdir()
    text = (engineered_run / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(text + '{"step": 13, "loss": 2.')
    assert len(load_run(run_dir).steps) == 12


def test_thinning_keeps_a_one_step_spike_and_bounds_the_points():
    steps = list(range(1, 100_001))
    values = [1.0 + 1e-6 * i for i in range(100_000)]
    values[54_321] = 50.0
    values[7] = None
    kept_steps, kept_values = thin(steps, values, max_points=1000)
    assert len(kept_steps) <= 1000 and kept_steps == sorted(kept_steps)
    assert 50.0 in kept_values and 54_322 in kept_steps
    assert kept_values[0] == values[0] and kept_values[-1] == values[-1]
    assert thin(steps[:10], values[:10]) == (steps[:10], values[:10])


def test_smoothing_is_a_bias_corrected_ema_that_skips_gaps():
    decay = 1 - 1 / 4
    out = smoothed([2.0, None, 4.0], time_constant_steps=4)
    assert out[0] == pytest.approx(2.0) and out[1] is None
    # Two values seen: weights (1 - d) d and (1 - d), normalised.
    assert out[2] == pytest.approx((decay * 2.0 + 4.0) / (decay + 1))
