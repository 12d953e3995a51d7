"""Evaluation suites: a YAML file of tasks, each with its items (JSONL or generated) and
thresholds. A bad file is refused with every problem named by file:line.

    src/helox/evals/<suite>/suite.yaml  (bundled; `--suite NAME`), or any suite.yaml path
    name: quickstart
    tasks:
      - name: scripture_choice          # a golden task over a JSONL file beside the suite
        type: golden
        items: scripture_choice.jsonl
        scorer: choice                  # exact | contains | regex | choice | perplexity
        thresholds: {accuracy: {min: 0.6}}
      - name: domains                   # perplexity per domain of a test set
        type: perplexity
        source: validation              # the run's validation split, or a file (path:)
        thresholds: {ppl: {max: 300}}
      - name: passkey                   # long-context recall (helox.data.synthetic probes)
        type: recall
        task: passkey
        context_words: [50, 200]
        depths: [0.0, 0.5, 1.0]
        thresholds: {accuracy: {min: 0.8}}

Golden items (one JSON object per line): `prompt`, and by scorer `target` (exact, contains,
perplexity), `pattern` (regex), `choices` + `answer` (the index of the right choice); optional
`id`, `scorer` (overrides the task's) and `max_ppl` (perplexity). Every prompt is read as the
start of a document, as in training.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from helox.chat.messages import read_conversations
from helox.configbase import StrictModel, describe_error
from helox.errors import HeloxError
from helox.resources import suites_dir

Scorer = Literal["exact", "contains", "regex", "choice", "perplexity"]
GENERATIVE_SCORERS = ("exact", "contains", "regex")


class Bound(StrictModel):
    """A metric's pass condition: at least `min` and/or at most `max`."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_side(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        return self

    def passes(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        parts = ([f"≥ {self.min:g}"] if self.min is not None else []) + (
            [f"≤ {self.max:g}"] if self.max is not None else [])
        return " and ".join(parts)


class TaskBase(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    thresholds: dict[str, Bound] = {}
    """Metric name -> bound; a metric without one is reported but does not gate."""


class GoldenTask(TaskBase):
    type: Literal["golden"]
    items: Path
    """JSONL file of items, relative to the suite file."""
    scorer: Scorer
    max_new_tokens: int = Field(default=32, ge=1)
    """Greedy tokens generated for the exact/contains/regex scorers."""
    stop: list[str] = ["\n"]
    """Generation stops at the first of these strings (not included in the output)."""
    ignore_case: bool = False
    """exact/contains/regex compare case-insensitively."""
    max_ppl: float | None = Field(default=None, gt=0)
    """perplexity scorer: an item passes when the target's perplexity is at most this (an
    item's own max_ppl wins)."""
    normalize: Literal["none", "bytes", "unconditional"] = "none"
    """choice scorer: rank choices by their summed log-likelihood (`none`, lm-eval's acc), by
    it per UTF-8 byte (`bytes`, acc_norm: short choices are not favoured), or by how much the
    prompt raises it over the choice alone at the start of a document (`unconditional`,
    acc_mutual_info: a choice that is likely anyway is not favoured)."""


class PerplexityTask(TaskBase):
    type: Literal["perplexity"]
    source: Literal["validation"] | None = None
    """`validation`: the run's dataset validation split, per domain."""
    path: Path | None = None
    """Or a file of documents (txt, JSONL, Parquet; relative to the suite file)."""
    text_field: str = "text"
    domain_field: str | None = "domain"
    max_documents: int = Field(default=64, ge=1)
    """Documents per domain at most (the first ones, so every version sees the same)."""
    max_tokens: int = Field(default=512, ge=2)
    """Tokens per document at most (its start)."""

    @model_validator(mode="after")
    def _one_source(self) -> PerplexityTask:
        if (self.source is None) == (self.path is None):
            raise ValueError("give exactly one of source: validation or path: FILE")
        return self


class RecallTask(TaskBase):
    type: Literal["recall"]
    task: Literal["passkey", "kv_recall", "variable_tracking"] = "passkey"
    context_words: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    """Haystack lengths in noise words (the context length axis)."""
    depths: list[Annotated[float, Field(ge=0, le=1)]] = Field(min_length=1)
    """Where the needle sits: 0 the start, 1 right before the question."""
    items_per_cell: int = Field(default=5, ge=1)
    seed: int = Field(default=0, ge=0)


class ReasoningTask(TaskBase):
    type: Literal["reasoning"]
    generator: Literal["chained_arithmetic", "variable_tracking"]
    steps: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    """Chain lengths (the difficulty axis)."""
    items_per_step: int = Field(default=10, ge=1)
    seed: int = Field(default=0, ge=0)


class ToolCallTask(TaskBase):
    type: Literal["tool_calls"]
    items: Path
    """JSONL conversations with tools (helox.chat.messages), relative to the suite file. Each
    is scored on its first assistant turn: the model, prompted with what comes before it,
    must call the tools that turn calls with the same arguments (or call none, if it calls
    none)."""
    template: Literal["chatml", "llama3"] = "chatml"
    """The chat template the prompt is rendered with and the calls are read in."""
    max_new_tokens: int = Field(default=96, ge=1)


Task = Annotated[Union[GoldenTask, PerplexityTask, RecallTask, ReasoningTask, ToolCallTask],
                 Field(discriminator="type")]


class RegressionConfig(StrictModel):
    max_accuracy_drop: float = Field(default=0.02, ge=0)
    """A drop of an accuracy metric (absolute) beyond this, and outside the paired
    bootstrap interval, is a regression."""
    max_ppl_increase: float = Field(default=0.02, ge=0)
    """The same for a perplexity, as a relative increase (0.02: +2%)."""


class ContaminationCheck(StrictModel):
    ngram_words: int = Field(default=8, ge=3)
    """Word n-grams compared with the training data (GPT-3's 13 misses short eval items; an
    item shorter than this is compared as a whole)."""
    min_overlap_ngrams: int = Field(default=1, ge=1)


class Suite(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    tasks: list[Task] = Field(min_length=1)
    regression: RegressionConfig = RegressionConfig()
    contamination: ContaminationCheck = ContaminationCheck()

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list) -> list:
        names = [t.name for t in tasks]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"task names must be unique: {', '.join(duplicated)} repeat")
        return tasks


class GoldenItem(BaseModel, extra="forbid"):
    id: str | int | None = None
    prompt: str
    target: str | None = None
    pattern: str | None = None
    choices: list[str] | None = None
    answer: int | None = None
    scorer: Scorer | None = None
    max_ppl: float | None = Field(default=None, gt=0)


class LoadedSuite:
    """A validated suite, its items read, with where it came from."""

    def __init__(self, suite: Suite, path: Path, items: dict[str, list[GoldenItem]],
                 sha256: str):
        self.suite, self.path, self.items, self.sha256 = suite, path, items, sha256

    @property
    def name(self) -> str:
        return self.suite.name


def subset(loaded: LoadedSuite, task_names: list[str]) -> LoadedSuite:
    """The suite with only the named tasks (all when the list is empty)."""
    if not task_names:
        return loaded
    known = [t.name for t in loaded.suite.tasks]
    unknown = [n for n in task_names if n not in known]
    if unknown:
        raise HeloxError(f"suite {loaded.name} has no task {', '.join(unknown)}",
                         hint=f"its tasks: {', '.join(known)}")
    tasks = [t for t in loaded.suite.tasks if t.name in task_names]
    return LoadedSuite(loaded.suite.model_copy(update={"tasks": tasks}), loaded.path,
                       {n: items for n, items in loaded.items.items() if n in task_names},
                       loaded.sha256)


# ---------------------------------------------------------------------------------------------
# Loading


class SuiteError(HeloxError):
    exit_code = 2

    def __init__(self, problems: list[str]):
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"invalid eval suite, {len(problems)} {noun}:\n"
                         + "\n".join(f"  {p}" for p in problems),
                         hint="fix each file:line above (see helox/eval/suite.py for the format)")
        self.problems = problems


def resolve_suite_path(name_or_path: str | Path) -> Path:
    """A suite file, a folder holding suite.yaml, or the name of a bundled suite."""
    path = Path(name_or_path)
    bundled = suites_dir()
    for candidate in (path, path / "suite.yaml", bundled / str(name_or_path) / "suite.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.parent.name for p in bundled.glob("*/suite.yaml"))
    raise HeloxError(f"no eval suite {name_or_path!r}",
                     hint=f"pass a suite.yaml path or one of: {', '.join(known) or 'none'}")


def load_suite(name_or_path: str | Path) -> LoadedSuite:
    path = resolve_suite_path(name_or_path)
    text = path.read_text(encoding="utf-8")
    raw, node = _parse_yaml(path, text)
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as exc:
        raise SuiteError([f"{path}:{_line_of(node, _yaml_loc(err))}: "
                          f"{_problem(err, Suite)}" for err in exc.errors()]) from None
    items, problems, digest = {}, [], hashlib.sha256(text.encode())
    for task_index, task in enumerate(suite.tasks):
        if isinstance(task, GoldenTask):
            items_path = path.parent / task.items
            loaded, task_problems = _read_items(items_path, task,
                                                f"{path}:{_line_of(node, ('tasks', task_index))}")
            items[task.name] = loaded
            problems += task_problems
            if items_path.is_file():
                digest.update(items_path.read_bytes())
        elif isinstance(task, ToolCallTask):
            items_path = path.parent / task.items
            if not items_path.is_file():
                problems.append(f"{path}:{_line_of(node, ('tasks', task_index, 'items'))}: "
                                f"tasks.{task_index}.items: {task.items} does not exist")
                continue
            items[task.name] = [c for _, c in read_conversations(items_path)]
            digest.update(items_path.read_bytes())
        elif isinstance(task, PerplexityTask) and task.path is not None:
            if not (path.parent / task.path).exists():
                problems.append(f"{path}:{_line_of(node, ('tasks', task_index, 'path'))}: "
                                f"tasks.{task_index}.path: {task.path} does not exist")
    if problems:
        raise SuiteError(problems)
    return LoadedSuite(suite, path, items, digest.hexdigest())


def _parse_yaml(path: Path, text: str) -> tuple[Any, yaml.Node | None]:
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise SuiteError([f"{path}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}"]
                         ) from None
    if not isinstance(raw, dict):
        raise SuiteError([f"{path}:1: a suite is a mapping with name and tasks"])
    return raw, node


def _line_of(node: yaml.Node | None, loc: tuple) -> int:
    """The line of the deepest YAML node along `loc` (1-based)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and \
                part < len(node.value):
            node = node.value[part]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _yaml_loc(err: dict) -> tuple:
    """The error's path as the file has it (without the union tag pydantic inserts), and at
    the `type` key when the type itself is wrong: where `_line_of` looks."""
    loc = tuple(int(p) if p.isdigit() else p for p in describe_error(err, Suite)[0])
    return loc + ("type",) if err["type"].startswith("union_tag") else loc


def _problem(err: dict, root: type[StrictModel]) -> str:
    """`dotted.path: message`, by the formatter recipes use (helox.configbase)."""
    loc, message = describe_error(err, root)
    return f"{'.'.join(loc)}: {message}" if loc else message


def _read_items(path: Path, task: GoldenTask, declared_at: str
                ) -> tuple[list[GoldenItem], list[str]]:
    if not path.is_file():
        return [], [f"{declared_at}: task {task.name}: items file {path} does not exist"]
    items, problems, seen = [], [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        try:
            item = GoldenItem.model_validate(record)
        except ValidationError as exc:
            problems += [f"{where}: {_problem(err, GoldenItem)}" for err in exc.errors()]
            continue
        problem = _item_problem(item, task)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        item = item.model_copy(update={"id": str(item.id if item.id is not None else number)})
        if item.id in seen:
            problems.append(f"{where}: id {item.id!r} repeats line {seen[item.id]}")
            continue
        seen[item.id] = number
        items.append(item)
    if not items and not problems:
        problems.append(f"{path}: no items")
    return items, problems


def _item_problem(item: GoldenItem, task: GoldenTask) -> str | None:
    """What the item lacks for its scorer, or None."""
    scorer = item.scorer or task.scorer
    if scorer in ("exact", "contains", "perplexity") and not item.target:
        return f"scorer {scorer} needs a non-empty target"
    if scorer == "regex":
        if not item.pattern:
            return "scorer regex needs a pattern"
        try:
            re.compile(item.pattern)
        except re.error as exc:
            return f"pattern is not a valid regular expression ({exc})"
    if scorer == "choice":
        if not item.choices or len(item.choices) < 2:
            return "scorer choice needs at least two choices"
        if item.answer is None or not 0 <= item.answer < len(item.choices):
            return f"answer must be the index of a choice (0..{len(item.choices) - 1})"
    if scorer == "perplexity" and (item.max_ppl or task.max_ppl) is None:
        return "scorer perplexity needs max_ppl (on the item or the task)"
    return None
