"""A run's config: the composition of every component's config (each lives beside its code),
YAML recipes, dotted overrides, and ConfigError.

Every model refuses unknown keys. `load_config` validates a whole recipe at once and reports every
problem with its dotted path (`train.max_steps: ...`), so a user fixes them in one pass; checks
that span sections run in RunConfig's own validator, so a config built in code or read back
from a run folder is held to the same rules.

Relative paths of input files (`data.train[*].path`, `tokenizer.path`) are resolved against the
recipe's folder, so a recipe and its data move together; `workspace` is resolved against the
current directory, where the user wants the outputs.

This module sits above the components (it imports their configs); no component imports it.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from helox.checkpoint.config import CheckpointConfig
from helox.checkpoint.layout import TOKENIZER_FILE, list_checkpoints, write_config
from helox.configbase import StrictModel, describe_error
from helox.data.config import DataConfig, TokenizerConfig
from helox.data.curriculum import CurriculumConfig
from helox.data.mixing import MixtureConfig
from helox.distributed.config import ParallelConfig
from helox.errors import HeloxError
from helox.eval.config import EvaluationConfig
from helox.fileio import sha256_json
from helox.finetune.dpo import DpoRunConfig
from helox.finetune.lora import LoraTrainConfig
from helox.model.config import ModelConfig
from helox.model.generate import SampleConfig
from helox.observe.config import ObserveConfig
from helox.platform import ReleaseConfig
from helox.training.config import TrainConfig
from helox.training.faults import FaultConfig
from helox.training.optim import OptimConfig
from helox.training.stability import StabilityConfig
from helox.training.watermark import WatermarkConfig

__all__ = ["ConfigError", "RunConfig", "load_config", "validate_config", "read_saved_config",
           "save_config", "apply_override"]


class ConfigError(HeloxError):
    """A recipe or override is invalid; `problems` holds (dotted path, message) pairs."""

    exit_code = 2

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        lines = [f"  {path}: {message}" for path, message in problems]
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(
            f"invalid config ({source}), {len(problems)} {noun}:\n" + "\n".join(lines),
            hint="edit the recipe or the --set override at each path above",
        )
        self.problems = problems


class RunConfig(StrictModel):
    name: str = Field(default="run", pattern=r"^[A-Za-z0-9._-]+$")
    """Run name; the default run folder is <workspace>/runs/<name>."""
    workspace: Path = Path("workspace")
    """Folder for datasets and runs (relative to the current directory)."""
    principal: str | None = None
    """Who runs this (for dataset access control and the audit log); None takes the
    HELOX_PRINCIPAL environment variable, else the login name."""
    data: DataConfig
    """Where the documents come from and how shards are cut."""
    tokenizer: TokenizerConfig = TokenizerConfig()
    """The tokenizer to train or load."""
    model: ModelConfig = ModelConfig()
    """The decoder's shape."""
    train: TrainConfig = TrainConfig()
    """The training loop."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    mixture: MixtureConfig = MixtureConfig()
    """Sampling weights per domain and their online rebalancing."""
    curriculum: CurriculumConfig = CurriculumConfig()
    """Sequence-length, batch-size and task-injection schedules."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoint cadence and retention."""
    stability: StabilityConfig = StabilityConfig()
    """Loss-spike detection and rollback."""
    observe: ObserveConfig = ObserveConfig()
    """What the run reports about itself: sampled telemetry, health monitors, sinks, MFU."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """The eval suite run during training (its gates are `helox eval`'s)."""
    parallel: ParallelConfig = ParallelConfig()
    """How a multi-process job (torchrun, `helox train --nproc`) spreads training: DDP, FSDP2,
    HSDP or ZeRO-1 over a device mesh; ignored by a single process."""
    faults: FaultConfig = FaultConfig()
    """Faults injected on purpose (tests, runbook drills)."""
    sample: SampleConfig = SampleConfig()
    """Text samples printed by `helox run`."""
    release: ReleaseConfig | None = None
    """What `helox run` does after training: evaluate, export, parity, register, promote
    (helox/release.py); null stops after training."""
    watermark: WatermarkConfig | None = None
    """A functional watermark trained in by the objective "watermark" (both or neither)."""
    dpo: DpoRunConfig | None = None
    """Preference training (DPO/IPO) on a `format: preference` dataset, from the policy that
    train.init_from names (helox/finetune/dpo.py)."""
    lora: LoraTrainConfig | None = None
    """Train a LoRA adapter on the frozen base model that train.init_from names; the
    checkpoints hold the adapter alone (helox/finetune/lora.py)."""

    @model_validator(mode="after")
    def _cross_section(self) -> RunConfig:
        """Checks that span sections, each at the path the user should edit: a recipe,
        `RunConfig(...)`, `model_validate` and a saved config are all validated alike."""
        _tokenizer_of_base(self)
        problems = cross_section_problems(self)
        if problems:
            raise ValidationError.from_exception_data("RunConfig", [
                InitErrorDetails(type=PydanticCustomError("cross_section", message),
                                 loc=tuple(int(p) if p.isdigit() else p
                                           for p in path.split(".")), input=None)
                for path, message in problems])
        return self

    def sha256(self) -> str:
        """Hash of the canonical JSON form (sorted keys); what run fingerprints are built on."""
        return sha256_json(self.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------
# Loading recipes


def load_config(recipe: Path | str, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe, apply `a.b.c=value` overrides, validate; ConfigError lists all."""
    recipe = Path(recipe)
    raw = _read_yaml(recipe)
    problems = []
    for override in overrides:
        problem = apply_override(raw, _from_here(override))
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(str(recipe), problems)
    return validate_config(raw, source=str(recipe), base_dir=recipe.parent.resolve())


def validate_config(raw: dict, source: str, base_dir: Path | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(source, describe(exc)) from None


def _tokenizer_of_base(config: RunConfig) -> None:
    """A run that starts from a checkpoint (train.init_from) and names no tokenizer uses the
    checkpoint's: its embeddings are rows of that vocabulary (a new BPE would scramble them)."""
    base = config.train.init_from
    if config.tokenizer.path is not None or base is None or not base.exists():
        return
    candidates = [base / TOKENIZER_FILE, *(c / TOKENIZER_FILE for c in list_checkpoints(base))]
    found = next((path for path in candidates if path.is_file()), None)
    if found is not None:
        config.tokenizer.path = found


def cross_section_problems(config: RunConfig) -> list[tuple[str, str]]:
    """Checks that span sections, each reported at the path the user should edit."""
    problems = []
    if config.train.seq_len > config.model.max_seq_len:
        problems.append(("train.seq_len", f"{config.train.seq_len} exceeds model.max_seq_len "
                                          f"({config.model.max_seq_len})"))
    if config.train.eval_every_steps and not config.data.val:
        problems.append(("data.val", "validation sources are needed because "
                                     "train.eval_every_steps > 0 (or set it to 0)"))
    for problem in config.curriculum.problems(config.train.seq_len, config.train.micro_batch_size
                                              * config.train.grad_accum_steps):
        problems.append(("curriculum", problem))
    if config.mixture.rebalance and not (config.data.val or config.data.version):
        problems.append(("data.val", "mixture.rebalance scores every domain on validation "
                                     "data; add validation sources"))
    optim = config.optim
    decay_steps = max(1, round(optim.decay_fraction * config.train.max_steps))
    if optim.schedule == "wsd" and optim.warmup_steps + decay_steps > config.train.max_steps:
        problems.append(("optim.decay_fraction", f"warmup ({optim.warmup_steps}) and WSD decay "
                                                 f"({decay_steps} steps) exceed train.max_steps "
                                                 f"({config.train.max_steps})"))
    problems += _watermark_problems(config)
    problems += _chat_problems(config)
    problems += _lora_problems(config)
    problems += _dpo_problems(config)
    if config.optim.warmup_steps >= config.train.max_steps:
        problems.append(("optim.warmup_steps", f"{config.optim.warmup_steps} must be below "
                                               f"train.max_steps ({config.train.max_steps})"))
    return problems


def _chat_problems(config: RunConfig) -> list[tuple[str, str]]:
    """A chat dataset's rows are train.seq_len long (filled in when unset) and are never cut."""
    chat = config.data.chat
    if chat is None:
        return []
    if chat.row_tokens is None:
        chat.row_tokens = config.train.seq_len
    problems = []
    if chat.row_tokens != config.train.seq_len:
        problems.append(("data.chat.row_tokens", f"{chat.row_tokens} differs from train.seq_len "
                                                 f"({config.train.seq_len}); packed "
                                                 "conversations are trained in rows of their "
                                                 "own length (leave it unset)"))
    if config.curriculum.seq_len:
        problems.append(("curriculum.seq_len", "a shorter sequence would cut packed "
                                               "conversations apart; chat data trains at "
                                               "train.seq_len only"))
    return problems


def _dpo_problems(config: RunConfig) -> list[tuple[str, str]]:
    if config.dpo is None:
        if config.data.chat_kind == "preference":
            return [("dpo", "preference pairs train with DPO: add a dpo section")]
        return []
    problems = []
    if config.train.init_from is None:
        problems.append(("train.init_from", "DPO improves a trained policy: name its "
                                            "checkpoint or run folder"))
    if not config.train.document_masking:
        problems.append(("train.document_masking", "DPO reads a pair's two responses as the "
                                                   "two documents of its row: set it true"))
    if config.train.compile:
        problems.append(("train.compile", "the DPO step runs eagerly for now: set it false"))
    if config.data.chat_kind not in (None, "preference"):
        problems.append(("data.train", "DPO trains on preference pairs: give the sources "
                                       "`format: preference`"))
    if [o.name for o in config.train.objectives] != ["lm"]:
        problems.append(("train.objectives", "a DPO run's objective is the DPO loss alone"))
    return problems


def _lora_problems(config: RunConfig) -> list[tuple[str, str]]:
    if config.lora is None:
        return []
    problems = []
    if config.train.init_from is None:
        problems.append(("train.init_from", "a LoRA run adapts a base model: name its "
                                            "checkpoint or run folder (e.g. what `helox "
                                            "import-hf` wrote)"))
    if config.train.ema_decay:
        problems.append(("train.ema_decay", "an EMA would copy the whole model for an adapter "
                                            "of a few MB; set it to 0 for a LoRA run"))
    if config.watermark is not None:
        problems.append(("watermark", "a watermark is trained into the base weights, which a "
                                      "LoRA run freezes"))
    return problems


def _watermark_problems(config: RunConfig) -> list[tuple[str, str]]:
    """The objective "watermark" and the `watermark` section come together."""
    named = "watermark" in [objective.name for objective in config.train.objectives]
    watermark = config.watermark
    if named and watermark is None:
        return [("watermark", "the objective 'watermark' in train.objectives needs this section "
                              "(at least watermark.secret_file)")]
    if watermark is not None and not named:
        return [("train.objectives", "the watermark section is set but no objective is named "
                                     "'watermark'; add {name: watermark, weight: 1.0} (or remove "
                                     "the section)")]
    if watermark is not None and \
            1 + watermark.trigger_tokens + watermark.signature_tokens > config.model.max_seq_len:
        return [("watermark.signature_tokens", f"1 + trigger_tokens + signature_tokens exceeds "
                                               f"model.max_seq_len ({config.model.max_seq_len})")]
    return []


def save_config(config: RunConfig, path: Path) -> None:
    write_config(path, config.model_dump(mode="json"))


def read_saved_config(path: Path) -> RunConfig:
    """A config saved by `save_config` in a run folder or checkpoint (inputs may be gone)."""
    raw = _read_yaml(Path(path))
    try:
        return RunConfig.model_validate(raw, context={"check_files": False})
    except ValidationError as exc:
        raise ConfigError(str(path), describe(exc)) from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(str(path), [("<recipe>", f"file not found: {path.resolve()}")])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [("<recipe>", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [("<recipe>", "the top level must be a mapping of sections")])
    return raw


def _from_here(override: str) -> str:
    """An override of a path field with a relative path, made absolute against the current
    folder: paths written in a recipe are relative to the recipe, paths typed on the command
    line to where they were typed."""
    dotted, sep, text = override.partition("=")
    if not sep or not text or text.startswith(("/", "~", "[", "{")) or \
            not _is_path_field(dotted.split(".")):
        return override
    return f"{dotted}={(Path.cwd() / text).resolve()}"


def _is_path_field(keys: list[str]) -> bool:
    """Whether `a.b.0.c` names a Path field of RunConfig (through models and lists)."""
    annotation: Any = RunConfig
    for key in keys:
        annotation = _element(annotation) if key.isdigit() else _field(annotation, key)
        if annotation is None:
            return False
    return Path in _members(annotation)


def _members(annotation: Any) -> list[Any]:
    """The types of a union (X | None, Annotated[...]) or the type itself."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(args[0])
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [member for arg in args for member in _members(arg)]
    return [annotation]


def _field(annotation: Any, key: str) -> Any:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, StrictModel) and \
                key in member.model_fields:
            return member.model_fields[key].annotation
    return None


def _element(annotation: Any) -> Any:
    for member in _members(annotation):
        if typing.get_origin(member) is list:
            return typing.get_args(member)[0]
    return None


def apply_override(raw: dict, override: str) -> tuple[str, str] | None:
    """Set `a.b.0.c=value` in the raw recipe (value parsed as YAML); return a problem or None.

    A list index one past the end appends (`data.pipeline.3={step: ...}`, or field by field:
    `data.synthetic.0.task=passkey` creates the list and its first item)."""
    dotted, sep, text = override.partition("=")
    if not sep or not dotted:
        return (override, "an override must look like section.key=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    keys = dotted.split(".")
    node: Any = raw
    for depth, key in enumerate(keys[:-1]):
        child = _child(node, key)
        if child is None:  # a missing key (or the item one past a list's end) is created
            child = [] if keys[depth + 1].isdigit() else {}
            if isinstance(node, dict):
                node[key] = child
            elif isinstance(node, list) and key == str(len(node)):
                node.append(child)
            else:
                return (".".join(keys[: depth + 1]), "no such list item to override")
        node = child
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            return (dotted, f"no such list item to override (the list has {len(node)}; "
                            f"index {len(node)} appends)")
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        return (dotted, "cannot set a key inside a scalar value")
    return None


def _child(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and key.isdigit() and int(key) < len(node):
        return node[int(key)]
    return None


def describe(exc: ValidationError) -> list[tuple[str, str]]:
    """(dotted path, message) of every error of validating a RunConfig."""
    problems = []
    for err in exc.errors():
        loc, message = describe_error(err, RunConfig)
        problems.append((".".join(loc) or "<recipe>", message))
    return problems
