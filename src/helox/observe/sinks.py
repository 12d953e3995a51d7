"""Where a run's metrics go besides RUN_DIR/metrics.jsonl: TensorBoard, MLflow, Weights & Biases
(offline) and a Prometheus `/metrics` endpoint, behind one fan-out object.

JSONL is always on: the loop writes RUN_DIR/metrics.jsonl and events.jsonl itself
(`helox.observe.metrics.MetricsLog`); these sinks are the optional extra destinations, chosen by
`observe.sinks` (`SinksConfig`) and opened with `open_sinks`.

Keys. A scalar key is the metrics.jsonl key: dot-separated, the first part names the family.
Prometheus wants one name per set of labels, so a key's other parts become labels and the name
says which (an aggregate and its parts never share a name):
- `loss`, `attn_entropy`: a plain series, `helox_loss`, `helox_attn_entropy`.
- `attn_entropy.layer0.head1`: index parts (`layer`, `head`, `expert` + a number,
  `INDEX_LABELS`) → `helox_attn_entropy_by_layer_head{layer="0",head="1"}`;
  `attn_entropy.layer0` → `helox_attn_entropy_by_layer{layer="0"}`.
- `val_loss.web`, `loss.lm`: other parts are the loop's breakdowns of a total, labelled
  `objective` for `loss`/`weight` and `domain` for every other family (`BREAKDOWN_LABELS`):
  `helox_val_loss_by_domain{domain="web"}`, `helox_loss_by_objective{objective="lm"}`.
TensorBoard and W&B show `.` as `/` (their section separator); MLflow keeps the key, with any
character MLflow refuses replaced by `_`. An event is counted under its `alert` (health
monitors' events) or else its `event` name.

Failures. A sink that cannot start raises a HeloxError naming `observe.sinks.<name>` with a hint
(no training starts). A sink that fails later — disk full, store locked, a library bug — is
closed and disabled for the rest of the run with a one-time warning, and the other sinks and
metrics.jsonl go on: telemetry never stops training, and never fails silently.

Cost. Values arrive as Python floats (no host syncs here; a tensor is refused). TensorBoard
writes from its own thread; MLflow's values are buffered and written by `log_batch` on one
background thread (MLflow's sqlite store costs ~0.15 ms per value, ~6 s to create a new store,
~2 s to import, so it is imported only when configured); W&B hands records to its own service
process; Prometheus only keeps the latest value per series until a scrape.
"""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field

from helox.configbase import StrictModel
from helox.errors import HeloxError

STATE_FILE = "sinks.json"
"""RUN_DIR/sinks.json: where each sink writes (MLflow and W&B run ids, the /metrics URL), read
back on resume so a run folder keeps one MLflow run and one W&B run id."""

INDEX_LABELS = ("layer", "head", "expert")
"""Key parts `<label><number>` (`layer0`) that become Prometheus labels (`layer="0"`)."""
BREAKDOWN_LABELS = {"loss": "objective", "weight": "objective"}
"""Prometheus label of a key's other parts (`loss.lm`, `val_loss.web`); by default `domain`."""


# -- config ---------------------------------------------------------------------------------

class MlflowSinkConfig(StrictModel):
    """MLflow: one MLflow run per training run (a resumed run folder continues it)."""

    tracking_uri: str | None = None
    """MLflow tracking URI; null keeps a sqlite store in the run folder (sqlite:///RUN_DIR/mlflow.db)."""
    experiment: str = Field(default="helox", min_length=1)
    """MLflow experiment the run is filed under; created when missing."""
    run_name: str | None = None
    """Display name of the MLflow run; null uses the run folder's name."""
    flush_every_seconds: float = Field(default=10.0, gt=0)
    """Buffered values are written at least this often (and at 1000 values, and at close)."""


class WandbSinkConfig(StrictModel):
    """Weights & Biases in offline mode: files under RUN_DIR/wandb, no network and no login;
    `wandb sync RUN_DIR/wandb/offline-run-*` uploads them later from a connected machine."""

    project: str = Field(default="helox", min_length=1)
    """W&B project the offline run is recorded under (used when it is synced)."""
    run_name: str | None = None
    """Display name of the W&B run; null uses the run folder's name."""


class PrometheusSinkConfig(StrictModel):
    """An HTTP `/metrics` endpoint served from the trainer process while it runs."""

    host: str = "127.0.0.1"
    """Address /metrics binds to; loopback by default, so only this machine can scrape it (it has
    no authentication)."""
    port: int = Field(default=0, ge=0, le=65535)
    """TCP port of /metrics; 0 picks a free one, printed at start and kept in RUN_DIR/sinks.json."""


class SinksConfig(StrictModel):
    """Metric destinations besides metrics.jsonl (always written); each is off unless set."""

    tensorboard: bool = False
    """Write TensorBoard event files (scalars, histograms, events) to RUN_DIR/tensorboard."""
    mlflow: MlflowSinkConfig | None = None
    """Log to MLflow (sqlite store in the run folder by default, telemetry off)."""
    wandb: WandbSinkConfig | None = None
    """Log to Weights & Biases in offline mode under RUN_DIR/wandb."""
    prometheus: PrometheusSinkConfig | None = None
    """Serve the latest values at an HTTP /metrics endpoint for Prometheus to scrape."""


# -- the sinks ------------------------------------------------------------------------------

class Sink(Protocol):
    """What every destination does. Values are Python floats; `bin_edges` has one more entry
    than `counts`; an event record is an events.jsonl line (`event`, `severity`, `step`, …).
    `info` says where the sink writes (kept in RUN_DIR/sinks.json)."""

    @property
    def info(self) -> dict: ...

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def histogram(self, step: int, name: str, bin_edges: Sequence[float],
                  counts: Sequence[float]) -> None: ...

    def event(self, record: Mapping[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class TensorBoardSink:
    """`torch.utils.tensorboard.SummaryWriter` on RUN_DIR/tensorboard. On resume from step T,
    events logged after T by the interrupted process are purged from view (`purge_step`)."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / "tensorboard"
        self._writer = SummaryWriter(str(self.log_dir),
                                     purge_step=start_step + 1 if start_step else None)

    @property
    def info(self) -> dict:
        return {"dir": str(self.log_dir)}

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(section_key(key), value, step)

    def histogram(self, step: int, name: str, bin_edges: Sequence[float],
                  counts: Sequence[float]) -> None:
        # The raw values are gone; the moments TensorBoard shows are estimated at bin midpoints.
        mids = [(lo + hi) / 2 for lo, hi in zip(bin_edges[:-1], bin_edges[1:])]
        self._writer.add_histogram_raw(
            section_key(name), min=bin_edges[0], max=bin_edges[-1], num=sum(counts),
            sum=sum(m * c for m, c in zip(mids, counts)),
            sum_squares=sum(m * m * c for m, c in zip(mids, counts)),
            bucket_limits=list(bin_edges[1:]), bucket_counts=list(counts), global_step=step)

    def event(self, record: Mapping[str, Any]) -> None:
        self._writer.add_text(f"events/{event_name(record)}",
                              json.dumps(record, default=str), record.get("step"))

    def close(self, failed: bool = False) -> None:
        self._writer.close()


class MlflowSink:
    """One MLflow run per run folder: params are the flattened run config, tags the run's
    fingerprint (`helox.*`). Values are buffered and written with `MlflowClient.log_batch` on a
    single background thread (MLflow's own async logging is experimental and writes from up to
    10 threads, which a sqlite store answers with lock errors); a write error surfaces at the
    next call. MLflow has no histogram type, so histograms are not sent here; an event is a
    value 1 of `events.<name>` at its step. Resuming continues the stored run id; values the
    interrupted process logged after the checkpoint stay in MLflow beside the redone ones."""

    MAX_BATCH_VALUES = 1000  # MLflow's limit per log_batch call
    MAX_BATCH_PARAMS = 100
    MAX_BATCHES_QUEUED = 8   # beyond this the trainer waits: back-pressure, not unbounded memory

    def __init__(self, config: MlflowSinkConfig, run_dir: Path, run_info: Mapping[str, Any],
                 run_config: Mapping[str, Any], state: Mapping[str, Any]):
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # read by mlflow.telemetry; set first
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

        self._Metric = Metric
        self.tracking_uri = config.tracking_uri or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        self.flush_every_seconds = config.flush_every_seconds
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        run = None
        if state.get("run_id") and state.get("tracking_uri") == self.tracking_uri:
            try:
                run = self._client.get_run(state["run_id"])
            except MlflowException:  # the store was replaced: start a new MLflow run
                run = None
        if run is None:
            run = self._client.create_run(self._experiment_id(config, run_dir),
                                          run_name=config.run_name or run_dir.name)
        else:
            self._client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        # Params are immutable in MLflow: a resumed run adds new keys only.
        params = [Param(mlflow_key(k), str(v)[:MAX_PARAM_VAL_LENGTH])
                  for k, v in flatten(run_config).items() if mlflow_key(k) not in run.data.params]
        tags = [RunTag(f"helox.{k}", str(v)[:MAX_TAG_VAL_LENGTH])
                for k, v in flatten(run_info).items()]
        self._client.log_batch(self.run_id, params=params[:self.MAX_BATCH_PARAMS], tags=tags)
        for i in range(self.MAX_BATCH_PARAMS, len(params), self.MAX_BATCH_PARAMS):
            self._client.log_batch(self.run_id, params=params[i:i + self.MAX_BATCH_PARAMS])
        self._pending: list = []
        self._queued: list[Future] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="helox-mlflow")
        self._last_flush = time.monotonic()

    def _experiment_id(self, config: MlflowSinkConfig, run_dir: Path) -> str:
        experiment = self._client.get_experiment_by_name(config.experiment)
        if experiment is not None:
            return experiment.experiment_id
        # The default store keeps artifacts beside it, not in ./mlruns of the working directory.
        location = None if config.tracking_uri else \
            (run_dir.resolve() / "mlflow-artifacts").as_uri()
        return self._client.create_experiment(config.experiment, artifact_location=location)

    @property
    def info(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        now_ms = int(time.time() * 1000)
        self._pending.extend(self._Metric(mlflow_key(k), v, now_ms, step)
                             for k, v in values.items())
        if len(self._pending) >= self.MAX_BATCH_VALUES or \
                time.monotonic() - self._last_flush >= self.flush_every_seconds:
            self.flush()

    def histogram(self, step: int, name: str, bin_edges: Sequence[float],
                  counts: Sequence[float]) -> None:
        return None  # MLflow has no histogram type (see the class docstring)

    def event(self, record: Mapping[str, Any]) -> None:
        self._pending.append(self._Metric(mlflow_key(f"events.{event_name(record)}"),
                                          1.0, int(time.time() * 1000), record.get("step", 0)))

    def flush(self) -> None:
        """Queue the buffered values for writing; raise a write error of an earlier batch."""
        self._collect(wait=len(self._queued) >= self.MAX_BATCHES_QUEUED)
        while self._pending:
            batch = self._pending[:self.MAX_BATCH_VALUES]
            del self._pending[:self.MAX_BATCH_VALUES]
            self._queued.append(self._writer.submit(self._client.log_batch, self.run_id,
                                                    metrics=batch))
        self._last_flush = time.monotonic()

    def _collect(self, wait: bool) -> None:
        if wait and self._queued:
            self._queued[0].result()
        done = [f for f in self._queued if f.done()]
        self._queued = [f for f in self._queued if not f.done()]
        for future in done:
            future.result()  # re-raises the worker's exception here, in the trainer

    def close(self, failed: bool = False) -> None:
        error = None
        try:
            self.flush()
            self._writer.shutdown(wait=True)
            self._collect(wait=False)
        except Exception as exc:  # still end the MLflow run, then report
            error = exc
            self._writer.shutdown(wait=True)
        self._client.set_terminated(self.run_id,
                                    status="FAILED" if failed or error else "FINISHED")
        if error is not None:
            raise error


class WandbSink:
    """Weights & Biases in offline mode under RUN_DIR/wandb: no network, no login, no console
    capture, code, git or system-stats collection, and error reporting off. The run id is
    stored in the run folder; a resumed run writes a new offline-run folder with the same id,
    which `wandb sync` merges into one run. An event is a value 1 of `events/<name>`. W&B keeps
    at most 512 histogram bins and drops values logged at a step below one already logged."""

    def __init__(self, config: WandbSinkConfig, run_dir: Path, run_info: Mapping[str, Any],
                 run_config: Mapping[str, Any], state: Mapping[str, Any]):
        # Read when wandb is imported and when it starts its service process: set them first.
        os.environ["WANDB_ERROR_REPORTING"] = "false"  # wandb's Sentry/OpenTelemetry reporting
        os.environ["WANDB_MODE"] = "offline"
        import wandb

        self._wandb = wandb
        run_dir = run_dir.resolve()
        settings = wandb.Settings(mode="offline", console="off", silent=True, save_code=False,
                                  disable_git=True, x_disable_stats=True, x_disable_meta=True,
                                  x_disable_machine_info=True)
        self._run = wandb.init(project=config.project, name=config.run_name or run_dir.name,
                               id=state.get("run_id"),
                               resume="allow", dir=str(run_dir),
                               config={**run_config, "run_info": dict(run_info)},
                               settings=settings, reinit="create_new")
        self.run_id, self.dir = self._run.id, Path(self._run.dir).parent

    @property
    def info(self) -> dict:
        return {"run_id": self.run_id, "dir": str(self.dir)}

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log({section_key(k): v for k, v in values.items()}, step=step)

    def histogram(self, step: int, name: str, bin_edges: Sequence[float],
                  counts: Sequence[float]) -> None:
        self._run.log({section_key(name): self._wandb.Histogram(
            np_histogram=(list(counts), list(bin_edges)))}, step=step)

    def event(self, record: Mapping[str, Any]) -> None:
        self._run.log({f"events/{event_name(record)}": 1.0},
                      step=record.get("step"))

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)


class PrometheusSink:
    """The latest value of every scalar as a gauge (names per the module docstring), plus
    `helox_events_total{event,severity}`, served at http://HOST:PORT/metrics by
    `prometheus_client.start_http_server` on a daemon thread of the trainer. `target_info`
    carries the run folder and fingerprint. Histograms are not exported: a Prometheus histogram
    counts observations over time, which a per-step distribution snapshot is not."""

    def __init__(self, config: PrometheusSinkConfig, run_dir: Path,
                 run_info: Mapping[str, Any]):
        from prometheus_client import CollectorRegistry, Counter, start_http_server

        info = {"run": run_dir.name, **{k: str(v) for k, v in run_info.items()
                                        if isinstance(v, (str, int)) and not isinstance(v, bool)}}
        self._registry = CollectorRegistry(target_info=info)
        self._latest: dict[str, float] = {}
        self._names: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {}
        self._lock = threading.Lock()
        self._registry.register(self)
        self._events = Counter("helox_events", "Health-monitor events by name and severity",
                               ["event", "severity"], registry=self._registry)
        self._server, self._thread = start_http_server(config.port, addr=config.host,
                                                       registry=self._registry)
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.url = f"http://{host}:{self._server.server_port}/metrics"

    @property
    def info(self) -> dict:
        return {"url": self.url}

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        with self._lock:
            self._latest.update(values)

    def histogram(self, step: int, name: str, bin_edges: Sequence[float],
                  counts: Sequence[float]) -> None:
        return None  # not exported (see the class docstring)

    def event(self, record: Mapping[str, Any]) -> None:
        self._events.labels(event_name(record),
                            str(record.get("severity", "info"))).inc()

    def collect(self) -> Iterable:
        """Called by prometheus_client on each scrape (its server thread)."""
        from prometheus_client.core import GaugeMetricFamily

        with self._lock:
            latest = list(self._latest.items())
        families: dict[str, GaugeMetricFamily] = {}
        for key, value in latest:
            if key not in self._names:
                self._names[key] = prometheus_name(key)
            name, labels = self._names[key]
            if name not in families:
                families[name] = GaugeMetricFamily(
                    name, f"Helox scalar {key.split('.')[0]} (latest value)",
                    labels=[label for label, _ in labels])
            families[name].add_metric([v for _, v in labels], value)
        return families.values()

    def close(self, failed: bool = False) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# -- names ----------------------------------------------------------------------------------

def event_name(record: Mapping[str, Any]) -> str:
    """A health alert's monitor (`divergence`), else the event (`loss_spike`)."""
    return str(record.get("alert") or record.get("event") or "event")


def section_key(key: str) -> str:
    """`val_loss.web` → `val_loss/web`: TensorBoard and W&B group charts by the `/` prefix."""
    return key.replace(".", "/")


def mlflow_key(key: str) -> str:
    """The key with the characters MLflow's names refuse replaced by `_`."""
    return re.sub(r"[^\w./\- ]", "_", key)


def prometheus_name(key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(metric name, ((label, value), …)) of a scalar key, per the module docstring."""
    family, *parts = key.split(".")
    labels, rest = [], []
    for part in parts:
        index = _INDEX_PART.match(part)
        if index:
            labels.append(index.groups())
        else:
            rest.append(part)
    if rest:
        labels.append((BREAKDOWN_LABELS.get(family, "domain"), ".".join(rest)))
    name = "helox_" + re.sub(r"[^a-zA-Z0-9_]", "_", family)
    if labels:
        name += "_by_" + "_".join(label for label, _ in labels)
    return name, tuple(labels)


_INDEX_PART = re.compile(rf"^({'|'.join(INDEX_LABELS)})(\d+)$")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (`{"optim": {"lr": 1}}` → `{"optim.lr": 1}`)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# -- the fan-out ----------------------------------------------------------------------------

class Sinks:
    """Every configured sink behind the `Sink` methods. A sink that raises is closed, disabled
    for the rest of the run and reported once through `warn` (its reason kept in `disabled`);
    the others keep receiving. `info` says where each sink writes (also in RUN_DIR/sinks.json)."""

    def __init__(self, sinks: Mapping[str, Sink], warn: Callable[[str], None]):
        self._active = dict(sinks)
        self._warn = warn
        self.info = {name: sink.info for name, sink in self._active.items()}
        self.disabled: dict[str, str] = {}

    def scalars(self, step: int, values: Mapping[str, object]) -> None:
        """Send the numeric values of a record (a metrics.jsonl line may be passed whole:
        `step`, strings, None and booleans are left out). A tensor is refused: reading it would
        cost a host sync, so pass `.item()` values taken where the loop already syncs."""
        if not self._active:
            return
        numeric = {}
        for key, value in values.items():
            if key == "step" or value is None or isinstance(value, (str, bool)):
                continue
            if not isinstance(value, numbers.Real):
                raise TypeError(f"sink value {key!r} is a {type(value).__name__}, not a float")
            numeric[key] = float(value)
        if numeric:
            self._each(lambda sink: sink.scalars(step, numeric))

    def histogram(self, step: int, name: str, bin_edges: Sequence[float],
                  counts: Sequence[float]) -> None:
        if len(bin_edges) != len(counts) + 1 or len(counts) == 0:
            raise ValueError(f"histogram {name!r}: {len(bin_edges)} bin edges for "
                             f"{len(counts)} counts (need counts + 1, at least one bin)")
        edges, values = [float(e) for e in bin_edges], [float(c) for c in counts]
        if not all(math.isfinite(e) for e in edges):
            raise ValueError(f"histogram {name!r}: bin edges must be finite")
        self._each(lambda sink: sink.histogram(step, name, edges, values))

    def event(self, record: Mapping[str, Any]) -> None:
        self._each(lambda sink: sink.event(record))

    def close(self, failed: bool = False) -> None:
        """Flush and close every sink; `failed` marks the MLflow/W&B run as failed."""
        self._each(lambda sink: sink.close(failed), closing=True)
        self._active.clear()

    def _each(self, call: Callable[[Sink], None], closing: bool = False) -> None:
        for name, sink in list(self._active.items()):
            try:
                call(sink)
            except Exception as exc:  # any library error: telemetry must not stop training
                del self._active[name]
                self.disabled[name] = f"{type(exc).__name__}: {exc}"
                self._warn(f"observe.sinks.{name} failed ({self.disabled[name]}); "
                           + ("its last values may be lost" if closing else
                              "disabled for the rest of the run, the other sinks and "
                              "metrics.jsonl go on"))
                if not closing:
                    try:
                        sink.close(failed=True)
                    except Exception:  # already failing; the warning above says so
                        pass


def open_sinks(config: SinksConfig, run_dir: Path, run_info: Mapping[str, Any],
               run_config: Mapping[str, Any] | None = None, start_step: int = 0,
               warn: Callable[[str], None] | None = None) -> Sinks:
    """Start the configured sinks for the run in `run_dir`.

    `run_info` is the run's fingerprint (run.json), `run_config` the run config as plain data
    (`config.model_dump(mode="json")`: MLflow params, W&B config), `start_step` the step a
    resumed run restarts from (0 for a new run). A sink that cannot start raises a HeloxError
    naming it, after closing the ones already started. `warn` reports a sink disabled at
    runtime (default: a RuntimeWarning)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    run_config = run_config or {}
    openers: dict[str, Callable[[], Any]] = {}
    if config.tensorboard:
        openers["tensorboard"] = lambda: TensorBoardSink(run_dir, start_step)
    if config.mlflow is not None:
        openers["mlflow"] = lambda: MlflowSink(config.mlflow, run_dir, run_info, run_config,
                                               state.get("mlflow", {}))
    if config.wandb is not None:
        openers["wandb"] = lambda: WandbSink(config.wandb, run_dir, run_info, run_config,
                                             state.get("wandb", {}))
    if config.prometheus is not None:
        openers["prometheus"] = lambda: PrometheusSink(config.prometheus, run_dir, run_info)
    sinks: dict[str, Any] = {}
    for name, opener in openers.items():
        try:
            sinks[name] = opener()
        except Exception as exc:
            for started in sinks.values():
                started.close(failed=True)
            raise HeloxError(f"observe.sinks.{name} could not start: "
                             f"{type(exc).__name__}: {exc}", hint=_start_hint(name, exc)) from exc
    opened = Sinks(sinks, warn or _warn)
    if opened.info:
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**state, **opened.info}, indent=1))
        os.replace(tmp, state_path)
    return opened


def _start_hint(name: str, exc: Exception) -> str:
    if isinstance(exc, ImportError):
        return "install the observe extra: pip install -e '.[observe]' (make install-test has it)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"set observe.sinks.{name}.port to a free port, or 0 to pick one"
    return f"fix the cause above, or set observe.sinks.{name} to null to train without it"


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
