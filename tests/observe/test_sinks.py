"""Metric sinks: each test writes through `open_sinks` and reads back what the backend stored,
with the backend's own reader (TensorBoard's EventAccumulator, MlflowClient, W&B's protobuf
records, prometheus_client's parser and promtool)."""

import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from helox.errors import HeloxError
from helox.observe.sinks import (MlflowSinkConfig, PrometheusSinkConfig, Sinks, SinksConfig,
                                 TensorBoardSink, WandbSinkConfig, open_sinks, prometheus_name)

RUN_INFO = {"fingerprint": "f00d", "dataset_version": "v1", "libraries": {"torch": "2.13.0"}}
RUN_CONFIG = {"optim": {"lr": 0.003, "betas": [0.9, 0.95]}, "train": {"max_steps": 5}}


def record(step: int) -> dict:
    """A metrics.jsonl-like record: what the loop and the probes write."""
    return {"step": step, "loss": 4.0 / step, "lr": 1e-3 * step, "val_loss.web": 3.0 / step,
            "loss.lm": 3.5 / step, "attn_entropy.layer0.head1": 0.5 + step,
            "attn_entropy.layer0": 1.0, "attn_entropy": 1.5, "skipped_steps": 0,
            "skipped": "nonfinite", "checkpoint": None}


HIST_EDGES, HIST_COUNTS = [0.0, 1.0, 2.0, 4.0], [3, 5, 1]
ALERT = {"step": 2, "event": "alert", "alert": "divergence", "severity": "critical"}


# -- names and config --------------------------------------------------------------------

@pytest.mark.parametrize("key, name, labels", [
    ("loss", "helox_loss", ()),
    ("attn_entropy", "helox_attn_entropy", ()),
    ("attn_entropy.layer0", "helox_attn_entropy_by_layer", (("layer", "0"),)),
    ("attn_entropy.layer3.head12", "helox_attn_entropy_by_layer_head",
     (("layer", "3"), ("head", "12"))),
    ("val_loss.web", "helox_val_loss_by_domain", (("domain", "web"),)),
    ("ppl.code.py", "helox_ppl_by_domain", (("domain", "code.py"),)),
    ("loss.lm", "helox_loss_by_objective", (("objective", "lm"),)),
    ("loss-scale", "helox_loss_scale", ()),
])
def test_prometheus_names(key, name, labels):
    assert prometheus_name(key) == (name, labels)


def test_config_refuses_unknown_keys_and_documents_every_field():
    with pytest.raises(ValidationError, match="tensorbord"):
        SinksConfig.model_validate({"tensorbord": True})
    with pytest.raises(ValidationError, match="port"):
        SinksConfig.model_validate({"prometheus": {"port": 70000}})
    for model in (SinksConfig, MlflowSinkConfig, WandbSinkConfig, PrometheusSinkConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"


# -- TensorBoard -------------------------------------------------------------------------

def read_tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                                "tensors": 0})
    return accumulator.Reload()


def test_tensorboard_event_files_hold_scalars_histograms_and_events(tmp_path):
    sinks = open_sinks(SinksConfig(tensorboard=True), tmp_path, RUN_INFO)
    for step in (1, 2, 3):
        sinks.scalars(step, record(step))
    sinks.histogram(3, "act_norm.layer0", HIST_EDGES, HIST_COUNTS)
    sinks.event(ALERT)
    sinks.close()

    events = read_tensorboard(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == \
        [(s, pytest.approx(4.0 / s)) for s in (1, 2, 3)]
    assert [e.value for e in events.Scalars("val_loss/web")] == \
        pytest.approx([3.0, 1.5, 1.0])
    assert "skipped" not in events.Tags()["scalars"]  # strings are not scalars
    (hist,) = events.Histograms("act_norm/layer0")
    assert hist.step == 3
    assert list(hist.histogram_value.bucket_limit) == HIST_EDGES[1:]
    assert list(hist.histogram_value.bucket) == HIST_COUNTS
    assert (hist.histogram_value.min, hist.histogram_value.max, hist.histogram_value.num) == \
        (0.0, 4.0, 9)
    (text,) = events.Tensors("events/divergence/text_summary")
    assert json.loads(text.tensor_proto.string_val[0]) == ALERT


def test_tensorboard_resume_hides_the_steps_the_crashed_process_logged(tmp_path):
    first = TensorBoardSink(tmp_path)
    for step in range(1, 6):  # a checkpoint at step 3, then a crash after step 5
        first.scalars(step, {"loss": 10.0 + step})
    first.close()
    resumed = TensorBoardSink(tmp_path, start_step=3)
    for step in (4, 5):
        resumed.scalars(step, {"loss": float(step)})
    resumed.close()
    events = read_tensorboard(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == \
        [(1, 11.0), (2, 12.0), (3, 13.0), (4, 4.0), (5, 5.0)]


# -- MLflow ------------------------------------------------------------------------------

# MLflow's own sqlalchemy store uses a loader strategy SQLAlchemy 2.1 deprecates.
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_mlflow_store_holds_the_metrics_and_a_resume_continues_the_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (./mlruns)
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)  # the sink sets it; undone after
    run_dir = tmp_path / "run"
    config = SinksConfig(mlflow=MlflowSinkConfig(experiment="tiny"))
    sinks = open_sinks(config, run_dir, RUN_INFO, RUN_CONFIG)
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    for step in (1, 2, 3):
        sinks.scalars(step, record(step))
    sinks.histogram(3, "act_norm.layer0", HIST_EDGES, HIST_COUNTS)
    sinks.event(ALERT)
    sinks.close()
    run_id = sinks.info["mlflow"]["run_id"]

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003"
    assert run.data.params["optim.betas"] == "[0.9, 0.95]"
    assert run.data.tags["helox.fingerprint"] == "f00d"
    assert run.data.tags["helox.libraries.torch"] == "2.13.0"

    def history(key):
        return [(m.step, m.value) for m in
                sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    assert history("loss") == [(s, pytest.approx(4.0 / s)) for s in (1, 2, 3)]
    assert history("val_loss.web") == [(s, pytest.approx(3.0 / s)) for s in (1, 2, 3)]
    assert history("attn_entropy.layer0.head1") == [(s, 0.5 + s) for s in (1, 2, 3)]
    assert history("events.divergence") == [(2, 1.0)]

    resumed = open_sinks(config, run_dir, RUN_INFO, {**RUN_CONFIG, "new_key": 1},
                         start_step=3)
    assert resumed.info["mlflow"]["run_id"] == run_id
    for step in (4, 5):
        resumed.scalars(step, record(step))
    resumed.close(failed=True)
    assert history("loss") == [(s, pytest.approx(4.0 / s)) for s in (1, 2, 3, 4, 5)]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.params["new_key"] == "1"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# -- Weights & Biases (offline) ------------------------------------------------------------

def read_wandb_records(path: Path):
    """The protobuf records of a run-*.wandb file. Its framing is LevelDB's log format under a
    7-byte `:W&B` header (32 KiB blocks; records of a CRC, a length and a FULL/FIRST/MIDDLE/LAST
    type); wandb read it in Python (`wandb.sdk.internal.datastore`) until that moved to its Go
    core, so the framing is undone here and the records are parsed with wandb's own protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:  # a block's tail too short for a header is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            message = wandb_internal_pb2.Record()
            message.ParseFromString(pieces)
            pieces = b""
            yield message


def wandb_history(run_folder: Path) -> list[dict]:
    (path,) = run_folder.glob("run-*.wandb")
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in r.history.item}
            for r in read_wandb_records(path) if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_run_holds_the_history_and_a_resume_keeps_the_run_id(tmp_path,
                                                                          monkeypatch):
    for name in ("WANDB_MODE", "WANDB_ERROR_REPORTING"):  # the sink sets them; undone after
        monkeypatch.delenv(name, raising=False)
    config = SinksConfig(wandb=WandbSinkConfig(project="tiny"))
    sinks = open_sinks(config, tmp_path, RUN_INFO, RUN_CONFIG)
    import wandb

    assert not wandb.env.error_reporting_enabled()  # wandb-core starts with --no-observability
    for step in (1, 2):
        sinks.scalars(step, record(step))
    sinks.histogram(2, "act_norm.layer0", HIST_EDGES, HIST_COUNTS)
    sinks.close()
    run_id, folder = sinks.info["wandb"]["run_id"], Path(sinks.info["wandb"]["dir"])
    assert folder.parent == tmp_path / "wandb" and folder.name.startswith("offline-run-")

    history = settled_wandb_history(folder)
    assert [(h["_step"], h["loss"]) for h in history if "loss" in h] == [(1, 4.0), (2, 2.0)]
    assert [h["val_loss/web"] for h in history if "val_loss/web" in h] == [3.0, 1.5]
    (hist,) = [h for h in history if "act_norm/layer0/bins" in h]
    assert hist["act_norm/layer0/bins"] == HIST_EDGES
    assert hist["act_norm/layer0/values"] == HIST_COUNTS
    (run,) = [r.run for r in read_wandb_records(next(folder.glob("*.wandb")))
              if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project) == (run_id, "tiny")

    resumed = open_sinks(config, tmp_path, RUN_INFO, RUN_CONFIG, start_step=2)
    resumed.scalars(3, record(3))
    resumed.close()
    assert resumed.info["wandb"]["run_id"] == run_id
    folders = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2  # `wandb sync` merges them into one run
    assert [h["loss"] for h in settled_wandb_history(Path(resumed.info["wandb"]["dir"]))
            if "loss" in h] == [pytest.approx(4.0 / 3)]


def settled_wandb_history(folder: Path, timeout_s: float = 20.0) -> list[dict]:
    """The offline run's history once it stops growing. Under the whole suite's load it has
    read back empty right after close() (wandb-core, a separate process, was still writing
    it), never in isolation; data that never arrives still fails the test."""
    deadline, previous = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            history = wandb_history(folder)
        except Exception:  # a record still being written
            history = None
        if history and history == previous:
            return history
        previous = history
        time.sleep(0.5)
    return previous or []


# -- Prometheus --------------------------------------------------------------------------

def test_prometheus_endpoint_serves_the_latest_values_on_loopback(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    sinks = open_sinks(SinksConfig(prometheus=PrometheusSinkConfig(port=0)), tmp_path, RUN_INFO)
    url = sinks.info["prometheus"]["url"]
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/metrics")
    assert json.loads((tmp_path / "sinks.json").read_text())["prometheus"]["url"] == url
    for step in (1, 2):
        sinks.scalars(step, record(step))
    sinks.event(ALERT)
    sinks.event(ALERT)
    text = urllib.request.urlopen(url, timeout=10).read().decode()

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("helox_loss", ())] == 2.0  # the latest step's value
    assert samples[("helox_attn_entropy_by_layer_head", (("head", "1"), ("layer", "0")))] == 2.5
    assert samples[("helox_attn_entropy_by_layer", (("layer", "0"),))] == 1.0
    assert samples[("helox_val_loss_by_domain", (("domain", "web"),))] == 1.5
    assert samples[("helox_loss_by_objective", (("objective", "lm"),))] == 1.75
    assert samples[("helox_skipped_steps", ())] == 0.0
    assert samples[("helox_events_total", (("event", "divergence"),
                                           ("severity", "critical")))] == 2.0
    assert samples[("target_info", (("dataset_version", "v1"), ("fingerprint", "f00d"),
                                    ("run", tmp_path.name)))] == 1.0
    promtool = shutil.which("promtool") or shutil.which(
        "promtool", path=str(Path(sys.executable).parent))
    if promtool:  # Prometheus's own linter on the exposition text
        checked = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                                 capture_output=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    sinks.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_a_port_in_use_is_a_clear_error_at_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = SinksConfig(tensorboard=True, prometheus=PrometheusSinkConfig(port=port))
        with pytest.raises(HeloxError, match="observe.sinks.prometheus could not start") as err:
            open_sinks(config, tmp_path, RUN_INFO)
    assert "observe.sinks.prometheus.port" in err.value.hint


# -- the fan-out -------------------------------------------------------------------------

class RecordingSink:
    def __init__(self, fail_on: str | None = None):
        self.calls, self.fail_on, self.closed = [], fail_on, None

    @property
    def info(self) -> dict:
        return {}

    def _call(self, method, *args):
        if method == self.fail_on:
            raise OSError("No space left on device")
        self.calls.append((method, *args))

    def scalars(self, step, values):
        self._call("scalars", step, dict(values))

    def histogram(self, step, name, bin_edges, counts):
        self._call("histogram", step, name, list(bin_edges), list(counts))

    def event(self, record):
        self._call("event", dict(record))

    def close(self, failed=False):
        self.closed = failed


def test_a_failing_sink_is_disabled_with_one_warning_and_the_others_go_on(tmp_path):
    broken, healthy = RecordingSink(fail_on="scalars"), RecordingSink()
    tensorboard = TensorBoardSink(tmp_path)
    warnings = []
    sinks = Sinks({"broken": broken, "healthy": healthy, "tensorboard": tensorboard},
                  warnings.append)
    for step in (1, 2, 3):
        sinks.scalars(step, {"loss": float(step)})
    sinks.event(ALERT)
    sinks.close()

    assert len(warnings) == 1 and "observe.sinks.broken failed" in warnings[0]
    assert "No space left on device" in sinks.disabled["broken"]
    assert broken.closed is True and broken.calls == []  # closed once, as failed; no more calls
    assert [c[:2] for c in healthy.calls] == [("scalars", 1), ("scalars", 2), ("scalars", 3),
                                              ("event", ALERT)]
    assert healthy.closed is False
    assert [e.step for e in read_tensorboard(tmp_path / "tensorboard").Scalars("loss")] == \
        [1, 2, 3]


def test_the_fan_out_sends_numbers_only_and_refuses_tensors():
    sink = RecordingSink()
    sinks = Sinks({"sink": sink}, pytest.fail)
    sinks.scalars(7, {"step": 7, "loss": 2, "nan": math.nan, "reason": "x", "flag": True,
                      "missing": None})
    (call,) = sink.calls
    assert call[:2] == ("scalars", 7) and set(call[2]) == {"loss", "nan"}
    assert call[2]["loss"] == 2.0 and math.isnan(call[2]["nan"])
    with pytest.raises(TypeError, match="Tensor"):  # reading it would be a host sync
        sinks.scalars(8, {"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="4 bin edges for 4 counts"):
        sinks.histogram(8, "h", [0, 1, 2, 3], [1, 1, 1, 1])


def test_the_training_loop_feeds_tensorboard_and_prometheus(tiny_dataset, workspace, tmp_path):
    import urllib.request

    from rich.console import Console
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helox.testing.tiny import tiny_config
    from helox.training.loop import train

    config = tiny_config(workspace, [
        "train.max_steps=8", "observe.telemetry.sample_every_steps=4",
        "observe.sinks={tensorboard: true, prometheus: {port: 0}}"])
    train(config, tmp_path / "run", tiny_dataset, console=Console(quiet=True))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"),
                              size_guidance={"scalars": 0, "histograms": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))
    assert [e.step for e in events.Scalars("val_loss")] == [4, 8]
    assert [e.step for e in events.Histograms("act_norm/layer0")] == [4, 8]
    url = json.loads((tmp_path / "run" / "sinks.json").read_text())["prometheus"]["url"]
    assert url.startswith("http://127.0.0.1:")
    with pytest.raises(OSError):  # the endpoint lives only as long as the training
        urllib.request.urlopen(url, timeout=2)
