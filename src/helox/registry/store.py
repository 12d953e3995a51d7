"""The model registry: MLflow's, with aliases (`dev`, `staging`, `prod`; MLflow deprecated
stages), lineage in version tags, gated promotion, rollback, the audit log and events.

The store is WORKSPACE/registry/mlflow.db (SQLite, created on first use) with artifacts in
WORKSPACE/registry/artifacts, unless `registry.tracking_uri` (WORKSPACE/platform.yaml or
HELOX_REGISTRY_URI) names another store or an MLflow tracking server (`http://host:port`,
whose artifact proxy then keeps the files).

Each registration is an MLflow run of the experiment `helox-registry` holding the version's
artifacts (see `helox.registry.lineage`), and a model version whose source is that run's
artifact folder. Which versions held an alias, in order, is the registered model's tag
`helox.alias.<alias>.history` (a JSON list): rollback moves the alias back along it.

Every change (register, promote, a refused promotion, rollback) is appended to the
workspace's hash-chained audit log (`helox.data.access.AuditLog`, the one dataset access
uses) under the subject `models/<name>`, with the principal, before its event is published.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

from helox.data.access import AuditLog, governance_dir, resolve_principal
from helox.errors import HeloxError
from helox.events import EventsConfig, Publisher, model_event, open_publisher
from helox.platform import RegistryConfig, load_platform
from helox.registry.gates import (Check, GateReport, adapter_base_check, eval_checks,
                                  parity_check)
from helox.registry.lineage import (EVALS_ARTIFACT, MODEL_ARTIFACT, PARITY_FILE, TAG_PREFIX,
                                    Candidate, stage_artifacts)

ALIASES = ("dev", "staging", "prod")
GATED_ALIASES = ("staging", "prod")
EXPERIMENT = "helox-registry"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HISTORY_TAG = TAG_PREFIX + "alias.{alias}.history"
EVENT_METADATA = ("model_fingerprint", "run_fingerprint", "dataset_version", "config_sha256",
                  "base.name", "base.version", "base.model_fingerprint")
"""Lineage tags every model event carries in its `metadata`."""
HISTORY_KEEP = 200
"""Holders of an alias remembered for rollback (MLflow caps a tag at 5,000 characters)."""



def default_tracking_uri(workspace: Path) -> str:
    return f"sqlite:///{(Path(workspace) / 'registry' / 'mlflow.db').resolve()}"


@dataclass
class VersionInfo:
    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    source: str
    """The artifacts' URI."""
    run_id: str
    """The MLflow run that holds them."""
    created: str
    description: str = ""

    @property
    def kind(self) -> str:
        return self.tags.get(TAG_PREFIX + "kind", "model")

    @property
    def model_fingerprint(self) -> str:
        return self.tags.get(TAG_PREFIX + "model_fingerprint", "")

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def lineage(self) -> dict[str, str]:
        return {k.removeprefix(TAG_PREFIX): v for k, v in sorted(self.tags.items())
                if k.startswith(TAG_PREFIX)}


@dataclass
class AliasChange:
    name: str
    alias: str
    version: str
    previous: str | None
    gates: GateReport | None = None
    forced: bool = False
    events: list[dict] = field(default_factory=list)


class PromotionRefused(HeloxError):
    """A gate failed; the refusal is already in the audit log."""

    def __init__(self, name: str, version: str, report: GateReport):
        lines = "\n".join(f"  {c.name}: {c.detail}" for c in report.failures)
        super().__init__(f"{name} version {version} may not become `{report.target}`: "
                         f"{len(report.failures)} gate(s) failed:\n{lines}",
                         hint="fix what failed (evaluate, fine-tune, re-export) and register "
                              "again; or override with --force --reason TEXT (audited)")
        self.report = report


class Registry:
    """A workspace's registry as one principal sees it. `close()` (or `with`) delivers the
    events it published within events.close_timeout_s; what Redis did not take waits in the
    workspace's outbox."""

    def __init__(self, workspace: Path, config: RegistryConfig, principal: str,
                 events: EventsConfig | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow imports
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            from mlflow import MlflowClient  # optional extra: registry
        except ImportError as exc:
            raise HeloxError(f"the model registry needs MLflow, which is not installed ({exc})",
                             hint="pip install 'helox[registry]' (make demo installs it)"
                             ) from None

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its "View run at" lines

        self.workspace = Path(workspace)
        self.uri = config.tracking_uri or default_tracking_uri(self.workspace)
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.principal = principal
        self.audit = AuditLog(governance_dir(self.workspace))
        self.events_config = events or EventsConfig()
        self._publisher: Publisher | None = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> int:
        """Stop publishing; returns how many events still wait for Redis in the outbox."""
        publisher, self._publisher = self._publisher, None
        return publisher.close() if publisher is not None else 0

    def publish(self, event: str, info: VersionInfo, alias: str | None = None,
                previous: str | None = None) -> None:
        """One model event about `info`, correlated with the run that trained it."""
        if self._publisher is None:
            self._publisher = open_publisher(self.events_config, self.workspace)
        lineage = info.lineage()
        fields = model_event(
            event, model_name=info.name, version=info.version, registry_path=info.uri,
            checkpoint_path=self._local_model_folder(info), alias=alias,
            previous_version=previous, run_fingerprint=lineage.get("run_fingerprint"),
            metadata={key: lineage[key] for key in EVENT_METADATA if key in lineage}
            | {"kind": info.kind, "tracking_uri": self.uri})
        self._publisher.publish("model", event, fields,
                                correlation_id=lineage.get("run_fingerprint") or info.uri)

    # -- registering ---------------------------------------------------------------------------

    def register(self, candidate: Candidate, name: str, alias: str | None = "dev",
                 description: str = "") -> VersionInfo:
        """A new version of `name` from `candidate`; `alias` (ungated: `dev`) points at it."""
        _check_name(name)
        if alias is not None and alias not in ALIASES:
            raise HeloxError(f"unknown alias {alias!r}", hint=f"use one of {', '.join(ALIASES)}")
        if alias in GATED_ALIASES:
            raise HeloxError(f"`{alias}` is reached through the gates, not at registration",
                             hint=f"register with --alias dev, then `helox registry promote "
                                  f"{name} VERSION --to {alias}`")
        tags = {**candidate.lineage_tags(), **self._relatives(candidate)}
        run_id, source = self._log_artifacts(candidate, name)
        if not self._exists(name):
            self.client.create_registered_model(name, description=description or None)
        created = self.client.create_model_version(name, source=source, run_id=run_id,
                                                   tags=tags, description=description or None)
        version = str(created.version)
        self.audit.append(self.principal, "register", _subject(name), version,
                          {"kind": candidate.kind, "checkpoint": str(candidate.checkpoint),
                           "model_fingerprint": candidate.model_fingerprint,
                           "tracking_uri": self.uri})
        info = self.version(name, version)
        self.publish("model-ready", info, alias)
        if alias is not None:
            self._move_alias(name, alias, version)
            self.audit.append(self.principal, "promote", _subject(name), version,
                              {"alias": alias, "previous": None, "gated": False})
        return self.version(name, version)

    def _relatives(self, candidate: Candidate) -> dict[str, str]:
        """The registered versions of the adapter's base and of the run's parent model."""
        tags = {}
        if candidate.base_fingerprint:
            base = self.find_by_fingerprint(candidate.base_fingerprint)
            if base is None:
                raise HeloxError(
                    f"the adapter's base model (fingerprint {candidate.base_fingerprint[:16]}…) "
                    f"is not registered, and an adapter version names its base's version",
                    hint="register the base model first: helox registry register BASE_RUN "
                         "--name NAME")
            tags |= {"base.name": base.name, "base.version": base.version}
        parent = self.find_by_fingerprint(candidate.parent_fingerprint) \
            if candidate.parent_fingerprint else None
        if parent is not None:
            tags |= {"parent.name": parent.name, "parent.version": parent.version}
        return {TAG_PREFIX + key: value for key, value in tags.items()}

    def _log_artifacts(self, candidate: Candidate, name: str) -> tuple[str, str]:
        experiment = self._experiment_id()
        run = self.client.create_run(experiment, run_name=f"{name}-{candidate.checkpoint.name}",
                                     tags={TAG_PREFIX + "registered_model": name})
        try:
            with tempfile.TemporaryDirectory(prefix="helox-register-") as tmp:
                staged = stage_artifacts(candidate, Path(tmp))
                self.client.log_artifacts(run.info.run_id, str(staged))
        except BaseException:
            self.client.set_terminated(run.info.run_id, status="FAILED")
            raise
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id, run.info.artifact_uri

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        location = ((self.workspace / "registry" / "artifacts").resolve().as_uri()
                    if self.uri.startswith("sqlite:") else None)  # a server keeps its own
        return self.client.create_experiment(EXPERIMENT, artifact_location=location)

    # -- aliases -------------------------------------------------------------------------------

    def promote(self, name: str, version: str, to: str, force: bool = False,
                reason: str | None = None) -> AliasChange:
        """Point `to` at `version` once the gates pass (`--force` overrides, with a reason)."""
        if to not in ALIASES:
            raise HeloxError(f"unknown alias {to!r}", hint=f"use one of {', '.join(ALIASES)}")
        if force and not reason:
            raise HeloxError("--force needs --reason: an override is audited with its reason",
                             hint="add --reason 'why this version must go out'")
        info = self.version(name, version)
        incumbent = self.holder(name, to)
        if incumbent is not None and incumbent.version == info.version:
            raise HeloxError(f"{name} version {info.version} already holds `{to}`",
                             hint=f"helox registry show {name} @{to}")
        report = self.gates(info, to, incumbent) if to in GATED_ALIASES else None
        details = {"alias": to, "previous": incumbent.version if incumbent else None,
                   "gates": report.as_dict() if report else None, "forced": force,
                   "reason": reason}
        if report is not None and not report.passed and not force:
            self.audit.append(self.principal, "refuse", _subject(name), info.version, details)
            raise PromotionRefused(name, info.version, report)
        self.audit.append(self.principal, "promote", _subject(name), info.version, details)
        self._move_alias(name, to, info.version)
        self.client.set_model_version_tag(name, info.version, f"{TAG_PREFIX}promoted.{to}",
                                          json.dumps({"by": self.principal, "at": _now(),
                                                      "forced": force, "reason": reason}))
        self.publish("model-promoted", info, to, details["previous"])
        return AliasChange(name, to, info.version, details["previous"], report, force)

    def rollback(self, name: str, alias: str) -> AliasChange:
        """Point `alias` back at the version that held it before the current one."""
        current = self.holder(name, alias)
        if current is None:
            raise HeloxError(f"no version of {name} holds `{alias}`",
                             hint=f"helox registry list {name}")
        history = self._history(name, alias)
        while history and history[-1] == current.version:
            history.pop()
        if not history:
            raise HeloxError(f"{name}@{alias} (version {current.version}) has no previous "
                             f"holder to roll back to",
                             hint=f"promote another version: helox registry promote {name} "
                                  f"VERSION --to {alias}")
        previous = history[-1]
        self.audit.append(self.principal, "rollback", _subject(name), previous,
                          {"alias": alias, "from": current.version})
        self.client.set_registered_model_alias(name, alias, previous)
        self._set_history(name, alias, history)
        self.publish("model-rolled-back", self.version(name, previous), alias, current.version)
        return AliasChange(name, alias, previous, current.version)

    def gates(self, info: VersionInfo, alias: str, incumbent: VersionInfo | None) -> GateReport:
        with tempfile.TemporaryDirectory(prefix="helox-gates-") as tmp:
            candidate_dir = self.artifacts(info, Path(tmp) / "candidate", (EVALS_ARTIFACT,
                                                                           PARITY_FILE))
            incumbent_dir = self.artifacts(incumbent, Path(tmp) / "incumbent",
                                           (EVALS_ARTIFACT,)) if incumbent else None
            checks: list[Check] = eval_checks(
                candidate_dir / EVALS_ARTIFACT,
                incumbent_dir / EVALS_ARTIFACT if incumbent_dir else None,
                incumbent.version if incumbent else None)
            checks += parity_check(candidate_dir / PARITY_FILE)
        if info.kind == "adapter":
            base_name = info.tags.get(TAG_PREFIX + "base.name", "")
            served = self.holder(base_name, alias) if base_name else None
            checks.append(adapter_base_check(
                base_name, alias, info.tags.get(TAG_PREFIX + "base.model_fingerprint", ""),
                served.version if served else None,
                served.model_fingerprint if served else None))
        return GateReport(alias, checks)

    def _move_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)
        history = self._history(name, alias)
        self._set_history(name, alias, [*history, version][-HISTORY_KEEP:])

    def _history(self, name: str, alias: str) -> list[str]:
        raw = self.client.get_registered_model(name).tags.get(HISTORY_TAG.format(alias=alias))
        return list(json.loads(raw)) if raw else []

    def _set_history(self, name: str, alias: str, history: list[str]) -> None:
        self.client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias),
                                             json.dumps(history))

    # -- reading -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(m.name for m in self.client.search_registered_models())

    def versions(self, name: str) -> list[VersionInfo]:
        self._require(name)
        found = [self._info(v) for v in self.client.search_model_versions(f"name = '{name}'")]
        aliases = self.client.get_registered_model(name).aliases  # search leaves them out
        for info in found:
            info.aliases = sorted(a for a, v in aliases.items() if str(v) == info.version)
        return sorted(found, key=lambda v: int(v.version))

    def version(self, name: str, ref: str) -> VersionInfo:
        """`3`, or an alias (`prod`, `@prod`)."""
        self._require(name)
        from mlflow.exceptions import MlflowException  # optional extra: registry

        ref = str(ref).removeprefix("@")
        try:
            found = (self.client.get_model_version(name, ref) if ref.isdigit()
                     else self.client.get_model_version_by_alias(name, ref))
        except MlflowException:
            known = ", ".join(str(v.version) for v in self.client.search_model_versions(
                f"name = '{name}'"))
            raise HeloxError(f"{name} has no version or alias {ref!r}",
                             hint=f"versions: {known or 'none'}; aliases: "
                                  f"{', '.join(ALIASES)}") from None
        return self._info(found)

    def holder(self, name: str, alias: str) -> VersionInfo | None:
        if not self._exists(name):
            return None
        version = self.client.get_registered_model(name).aliases.get(alias)
        return self.version(name, str(version)) if version is not None else None

    def history(self, name: str, alias: str) -> list[str]:
        return self._history(name, alias)

    def find_by_fingerprint(self, fingerprint: str) -> VersionInfo | None:
        """The first registered full model (not an adapter) with these weights."""
        key = f"{TAG_PREFIX}model_fingerprint"
        found = self.client.search_model_versions(f"tags.`{key}` = '{fingerprint}'")
        models = sorted((self._info(v) for v in found if v.tags.get(TAG_PREFIX + "kind")
                         != "adapter"), key=lambda v: (v.name, int(v.version)))
        return models[0] if models else None

    def artifacts(self, info: VersionInfo, into: Path | None = None,
                  parts: tuple[str, ...] = ()) -> Path:
        """A local folder with the version's artifacts (only `parts` of them, top-level
        names, when given). A local store's folder is returned as it is; a server's is
        downloaded into `into`."""
        parsed = urlparse(info.source)
        if parsed.scheme in ("", "file"):
            return Path(unquote(parsed.path))
        into = Path(into or tempfile.mkdtemp(prefix="helox-model-"))
        into.mkdir(parents=True, exist_ok=True)
        logged = {Path(f.path).name for f in self.client.list_artifacts(info.run_id)}
        for part in (p for p in parts or sorted(logged) if p in logged):
            self.client.download_artifacts(info.run_id, part, str(into))
        return into

    def model_folder(self, info: VersionInfo, into: Path | None = None) -> Path:
        """The version's `model/` run folder, loadable with `load_trained_model`."""
        return self.artifacts(info, into, (MODEL_ARTIFACT,)) / MODEL_ARTIFACT

    def _info(self, version) -> VersionInfo:
        created = datetime.fromtimestamp(version.creation_timestamp / 1000, timezone.utc)
        return VersionInfo(version.name, str(version.version), list(version.aliases or []),
                           dict(version.tags or {}), version.source, version.run_id,
                           created.isoformat(timespec="seconds"), version.description or "")

    def _exists(self, name: str) -> bool:
        return bool(self.client.search_registered_models(f"name = '{name}'"))

    def _require(self, name: str) -> None:
        _check_name(name)
        if not self._exists(name):
            raise HeloxError(f"no registered model named {name!r} in {self.uri}",
                             hint=f"known: {', '.join(self.names()) or 'none'}; register one "
                                  f"with `helox registry register RUN --name {name}`")

    def _local_model_folder(self, info: VersionInfo) -> str | None:
        """The version's loadable folder when the store is on this machine's disk."""
        if urlparse(info.source).scheme not in ("", "file"):
            return None
        return str(self.model_folder(info))


def _check_name(name: str) -> None:
    if not NAME_RE.match(name or ""):
        raise HeloxError(f"registered model name {name!r} is not valid",
                         hint="use letters, digits and . _ - (e.g. quickstart-llama)")


def _subject(name: str) -> str:
    """The audit log's subject for a registered model (dataset names cannot contain `/`)."""
    return f"models/{name}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_registry(workspace: Path) -> Registry:
    """The registry of a workspace, as its platform.yaml (or the environment) configures it,
    acting as the current principal (HELOX_PRINCIPAL, else the login name) and publishing to
    its event bus."""
    platform = load_platform(workspace)
    return Registry(workspace, platform.registry, resolve_principal(None), platform.events)
