"""lm-evaluation-harness interop: a Helox model as an lm-eval model class ("helox"), and the
bundled local lm-eval tasks (src/helox/evals/lm_eval/) run on it.

    from helox.eval.lm_eval_adapter import run_lm_eval
    results = run_lm_eval("workspace/runs/quickstart", ["helox_cloze", "helox_passages"])
    results["results"]["helox_cloze"]["acc,none"]

The class subclasses lm-eval's `TemplateLM`, so a (context, continuation) pair is split into
tokens by lm-eval's own code, exactly as for its `hf` model (HFLM): the context's trailing
spaces move to the continuation, context + continuation are encoded together and cut after
the context's tokens, and an empty context becomes the prefix token. Only the scoring is
Helox's (`LanguageModel.loglikelihood`, `greedy`), so the two agree to float rounding on the
same weights.

How a text starts. Helox reads every text as a document: EOS first, then the text's tokens
(`LanguageModel.document`), because in training every document follows the previous one's
EOS. The tokenizer has no BOS, so EOS plays that part:
- `loglikelihood` and `generate_until` contexts are encoded EOS-first. HFLM does the same on
  a Helox HF export when its tokenizer names `<|endoftext|>` as BOS and HFLM is told to add it:
  `--model hf --model_args pretrained=DIR,add_bos_token=True`. Without `add_bos_token`, HFLM
  reads a context as the middle of a document (GPT-2's convention) and scores differ.
- `loglikelihood_rolling` (perplexity) scores the text's own tokens after one EOS (the
  prefix token), in lm-eval's rolling windows. HFLM with `add_bos_token=True` would put a
  second EOS at the front and score it too (log p(EOS | EOS) lands in the perplexity), so
  perplexities agree with HFLM without `add_bos_token`, whose reading is EOS + text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from helox.errors import HeloxError
from helox.eval.lm import LanguageModel, load_language_model
from helox.resources import lm_eval_tasks_dir

try:
    import lm_eval.models  # noqa: F401  (registers the built-in models; see `register_model`)
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # lm-eval is an optional dependency (the test extra)
    raise HeloxError(f"lm-evaluation-harness is not installed ({exc})",
                     hint="pip install lm-eval (it is in helox's test extra)") from None

"""The repo's local lm-eval tasks (YAML + JSONL), found from the source tree."""

MAX_GEN_TOKENS = 256
"""Tokens generated when a task does not say (HFLM's default, so the two stop alike)."""


# lm-eval's registry imports its built-in models only while it is empty: registering "helox"
# before `lm_eval.models` is imported would hide "hf" and the rest (hence the import above).
@register_model("helox")
class HeloxLM(TemplateLM):
    """A Helox run folder, checkpoint or HF folder (or a loaded LanguageModel) as an lm-eval
    model: `simple_evaluate(model="helox", model_args="pretrained=RUN_DIR")`."""

    def __init__(self, pretrained: str | Path | LanguageModel, batch_size: int | str = 8,
                 device: str = "cpu", ema: bool = False):
        super().__init__()
        if isinstance(pretrained, LanguageModel):
            self.lm = pretrained
        else:
            self.lm = load_language_model(Path(pretrained), ema=ema, device=device,
                                          batch_size=_batch_size(batch_size))
        self._eos_text = self.lm.tokenizer.id_to_token(self.lm.eos_id)

    # -- what TemplateLM needs ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.lm.eos_id

    @property
    def max_length(self) -> int:
        return self.lm.max_seq_len

    @property
    def device(self):
        return self.lm.device

    @property
    def tokenizer_name(self) -> str:
        return f"helox-{self.lm.version}"

    def get_model_info(self) -> dict:
        """Lands in the results' `config`: which weights produced them."""
        return {"model_version": self.lm.version, "model_source": self.lm.source}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        """EOS first (Helox's BOS), as HFLM's `tok_encode` adds a BOS: unless told not to, or
        unless the text already starts with it."""
        add = (add_special_tokens if add_special_tokens is not None
               else not string.startswith(self._eos_text))
        return self.lm.document(string) if add else self.lm.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(request strings, context ids, continuation ids) -> (log p, greedy) per request."""
        scored = self.lm.loglikelihood([(context, continuation)
                                        for _, context, continuation in requests])
        answers = [(s.logprob, s.greedy) for s in scored]
        for (request, _, _), answer in zip(requests, answers, strict=True):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return answers

    # -- the other two request types ---------------------------------------------------------

    def loglikelihood_rolling(self, requests: Sequence[Instance],
                              disable_tqdm: bool = False) -> list[float]:
        """log p(text) after one EOS, in lm-eval's windows (each token scored once, the last
        window with a full context), as HFLM cuts them."""
        windows, owners = [], []
        for i, (text,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(self.lm.encode(text), self.prefix_token_id,
                                                    self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, scored in zip(owners, self.lm.loglikelihood(windows), strict=True):
            totals[owner] += scored.logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: Sequence[Instance],
                       disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, batched by generation settings; the context is cut from the
        left to leave room for the new tokens, as HFLM does."""
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(self._generation_settings(request.args[1]), []).append(i)
        out = [""] * len(requests)
        for (max_new_tokens, until), indices in groups.items():
            keep_tokens = self.max_length - max_new_tokens
            prompts = [self.tok_encode(requests[i].args[0])[-keep_tokens:] for i in indices]
            for i, text in zip(indices, self.lm.greedy(prompts, max_new_tokens, until),
                               strict=True):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _generation_settings(self, gen_kwargs: dict) -> tuple[int, tuple[str, ...]]:
        """(max new tokens, stop strings incl. EOS's text) from a task's generation kwargs."""
        kwargs = normalize_gen_kwargs(gen_kwargs, MAX_GEN_TOKENS)
        if kwargs.get("do_sample"):
            raise HeloxError("the helox lm-eval model decodes greedily only",
                             hint="drop do_sample and temperature from the task's "
                                  "generation_kwargs (or --gen_kwargs)")
        max_new_tokens = kwargs["max_gen_toks"]
        if max_new_tokens >= self.max_length:
            raise HeloxError(f"max_gen_toks {max_new_tokens} leaves no room for a context in "
                             f"the model's {self.max_length} tokens",
                             hint=f"set max_gen_toks below {self.max_length} in the task's "
                                  "generation_kwargs (or --gen_kwargs)")
        return max_new_tokens, tuple(handle_stop_sequences(kwargs.get("until"), self._eos_text))


def _batch_size(value: int | str) -> int:
    """lm-eval passes --batch_size through as given; "auto" probes GPU memory, which a
    Helox LanguageModel does not do."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise HeloxError(f"batch_size {value!r} is not a positive whole number",
                         hint="pass e.g. batch_size=8 (\"auto\" is not supported)")
    return size


# ---------------------------------------------------------------------------------------------
# Running


def task_manager(tasks: Sequence[str]) -> TaskManager:
    """Helox's bundled local tasks, plus lm-eval's built-in ones only when a task is not
    local: indexing the ~15k built-in task configs takes ~13 s on 2 cores."""
    tasks_dir = str(lm_eval_tasks_dir())
    local = TaskManager(include_path=tasks_dir, include_defaults=False)
    if all(task in local.all_tasks for task in tasks):
        return local
    every = TaskManager(include_path=tasks_dir)
    unknown = [task for task in tasks if task not in every.all_tasks]
    if unknown:
        raise HeloxError(f"unknown lm-eval task(s): {', '.join(unknown)}",
                         hint=f"local tasks: {', '.join(sorted(local.all_tasks))}; or a "
                              "built-in lm-eval task or group name")
    return every


def run_lm_eval(model: str | Path | LanguageModel, tasks: Sequence[str],
                limit: int | float | None = None, num_fewshot: int | None = None,
                batch_size: int = 8, device: str = "cpu", ema: bool = False,
                log_samples: bool = False, bootstrap_iters: int = 1000,
                seed: int = 1234) -> dict:
    """lm-eval's `simple_evaluate` on a Helox model (a path or a LanguageModel): its results
    dict (`results[task][metric + ",none"]`, plus `samples` per task when `log_samples`).

    bootstrap_iters defaults to 1000 rather than lm-eval's 100000: the perplexities' standard
    errors are bootstrapped, and 100k resamples cost more than scoring a small task."""
    if not tasks:
        raise HeloxError("no lm-eval task given", hint="name at least one task, e.g. "
                         "helox_cloze")
    manager = task_manager(tasks)
    lm = HeloxLM(model, batch_size=batch_size, device=device, ema=ema)
    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                           task_manager=manager, log_samples=log_samples,
                           bootstrap_iters=bootstrap_iters, random_seed=seed,
                           numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


def lm_eval_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, standard error) of an lm-eval results dict, for a table."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, comma, _filter = key.partition(",")
            if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue  # keys without a filter are bookkeeping (alias, sample_len)
            stderr = metrics.get(f"{name}_stderr,{_filter}")
            rows.append((task, name, float(value),
                         float(stderr) if isinstance(stderr, (int, float)) else None))
    return rows


def write_lm_eval_results(results: dict, root: Path, version: str) -> Path:
    """root/evals/lm-eval/<version>/results.json (the scores and lm-eval's config)."""
    folder = Path(root) / "evals" / "lm-eval" / version
    folder.mkdir(parents=True, exist_ok=True)
    kept = {key: results[key] for key in ("results", "versions", "n-shot", "configs",
                                           "config", "model_version", "model_source")
            if key in results}
    (folder / "results.json").write_text(json.dumps(kept, indent=1, default=str))
    return folder
