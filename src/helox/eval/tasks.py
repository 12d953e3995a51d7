"""Scoring each kind of suite task into item rows.

An `ItemRow` is one scored item: its `score` (1 right, 0 wrong) or its negative log-likelihood
and token count (perplexity tasks), a `group` for the per-cell metrics (a domain, a context
length and depth, a chain length), and what the model produced. Metrics are functions of rows
(results.py), so the same rows give the aggregate, its bootstrap interval and the paired
comparison against a baseline.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helox.chat.messages import Conversation
from helox.chat.templates import ChatTemplate
from helox.chat.tooluse import score_calls
from helox.data.sources import SourceConfig, read_documents
from helox.data.synthetic import make_probe
from helox.errors import HeloxError
from helox.eval.lm import LanguageModel
from helox.eval.suite import (GoldenItem, GoldenTask, PerplexityTask, ReasoningTask,
                              RecallTask, ToolCallTask)

Advance = Callable[[int], None]
CHUNK_ITEMS = 16
"""Items per model call between progress updates."""


@dataclass
class ItemRow:
    task: str
    id: str
    text: str
    """What the contamination check compares with the training data (prompt and answer)."""
    score: float | None = None
    nll: float | None = None
    """Summed negative log-likelihood, nats (perplexity tasks and scorer)."""
    tokens: int | None = None
    group: str | None = None
    detail: dict = field(default_factory=dict)
    contaminated: bool = False

    def as_dict(self) -> dict:
        record = {"task": self.task, "id": self.id, "group": self.group,
                  "contaminated": self.contaminated}
        for key in ("score", "nll", "tokens"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        return {**record, **self.detail}


def continuation_ids(lm: LanguageModel, prompt: str, continuation: str
                     ) -> tuple[list[int], list[int]]:
    """(context, continuation) token ids as lm-eval splits them: the whole text is encoded
    once and split where the prompt's tokens end, so a merge across the boundary does not
    invent a tokenization the model never saw; a trailing space of the prompt moves to the
    continuation."""
    if prompt.endswith(" ") and not continuation.startswith(" "):
        prompt, continuation = prompt[:-1], " " + continuation
    context = lm.document(prompt)
    whole = lm.document(prompt + continuation)
    if whole[:len(context)] == context and len(whole) > len(context):
        return context, whole[len(context):]
    return context, lm.encode(continuation)


# ---------------------------------------------------------------------------------------------
# golden


def score_golden(lm: LanguageModel, task: GoldenTask, items: list[GoldenItem],
                 advance: Advance) -> list[ItemRow]:
    by_scorer: dict[str, list[GoldenItem]] = {}
    for item in items:
        by_scorer.setdefault(item.scorer or task.scorer, []).append(item)
    rows: dict[str, ItemRow] = {}
    for scorer, chosen in by_scorer.items():
        for start in range(0, len(chosen), CHUNK_ITEMS):
            chunk = chosen[start:start + CHUNK_ITEMS]
            for row in _SCORERS[scorer](lm, task, chunk):
                rows[row.id] = row
            advance(len(chunk))
    return [rows[str(item.id)] for item in items]


def _generative(lm: LanguageModel, task: GoldenTask, items: list[GoldenItem]) -> list[ItemRow]:
    outputs = lm.greedy([lm.document(i.prompt) for i in items], task.max_new_tokens, task.stop)
    rows = []
    for item, output in zip(items, outputs):
        scorer = item.scorer or task.scorer
        rows.append(ItemRow(task.name, str(item.id), f"{item.prompt} {item.target or ''}",
                            score=float(_matches(scorer, item, output, task.ignore_case)),
                            detail={"output": output, "scorer": scorer}))
    return rows


def _matches(scorer: str, item: GoldenItem, output: str, ignore_case: bool) -> bool:
    fold = str.lower if ignore_case else (lambda s: s)
    if scorer == "exact":
        return fold(output.strip()) == fold(item.target.strip())
    if scorer == "contains":
        return fold(item.target) in fold(output)
    return re.search(item.pattern, output, flags=re.IGNORECASE if ignore_case else 0) is not None


def _choice(lm: LanguageModel, task: GoldenTask, items: list[GoldenItem]) -> list[ItemRow]:
    prompts = [item.prompt for item in items]
    if task.normalize == "unconditional":
        prompts += [""] * len(items)
    requests = [continuation_ids(lm, prompt, choice)
                for prompt, item in zip(prompts, items * 2) for choice in item.choices]
    likelihoods = iter(lm.loglikelihood(requests))
    logprobs = [[next(likelihoods).logprob for _ in item.choices] for item in items]
    alone = [[next(likelihoods).logprob for _ in item.choices] for item in items] \
        if task.normalize == "unconditional" else None
    rows = []
    for i, item in enumerate(items):
        picked = int(np.argmax(_choice_ranks(task.normalize, item.choices, logprobs[i],
                                             alone[i] if alone else None)))
        rows.append(ItemRow(task.name, str(item.id),
                            f"{item.prompt} {item.choices[item.answer]}",
                            score=float(picked == item.answer),
                            detail={"choice_logprobs": logprobs[i], "picked": picked,
                                    "scorer": "choice"}))
    return rows


def _choice_ranks(normalize: str, choices: list[str], logprobs: list[float],
                  alone: list[float] | None) -> list[float]:
    if normalize == "bytes":
        return [lp / len(choice.encode()) for lp, choice in zip(logprobs, choices)]
    if normalize == "unconditional":
        return [lp - base for lp, base in zip(logprobs, alone)]
    return logprobs


def _perplexity_item(lm: LanguageModel, task: GoldenTask, items: list[GoldenItem]
                     ) -> list[ItemRow]:
    results = lm.loglikelihood([continuation_ids(lm, i.prompt, i.target) for i in items])
    rows = []
    for item, result in zip(items, results):
        ppl = float(np.exp(-result.logprob / result.num_tokens))
        bound = item.max_ppl or task.max_ppl
        rows.append(ItemRow(task.name, str(item.id), f"{item.prompt} {item.target}",
                            score=float(ppl <= bound), nll=-result.logprob,
                            tokens=result.num_tokens,
                            detail={"ppl": ppl, "max_ppl": bound, "scorer": "perplexity"}))
    return rows


_SCORERS = {"exact": _generative, "contains": _generative, "regex": _generative,
            "choice": _choice, "perplexity": _perplexity_item}


# ---------------------------------------------------------------------------------------------
# perplexity per domain


def score_perplexity(lm: LanguageModel, task: PerplexityTask, documents: list[tuple[str, str,
                     list[int], str]], advance: Advance) -> list[ItemRow]:
    """`documents`: (id, domain, token ids starting with EOS, text) each."""
    rows = []
    for start in range(0, len(documents), CHUNK_ITEMS):
        chunk = documents[start:start + CHUNK_ITEMS]
        logprobs = lm.token_logprobs([ids[:task.max_tokens] for _, _, ids, _ in chunk])
        for (doc_id, domain, _, text), logprobs_N in zip(chunk, logprobs):
            rows.append(ItemRow(task.name, doc_id, text, nll=float(-logprobs_N.sum()),
                                tokens=len(logprobs_N), group=domain))
        advance(len(chunk))
    return rows


def validation_documents(dataset, eos_id: int, max_documents: int) -> list[tuple]:
    """The first `max_documents` documents of each validation domain, as token ids."""
    if "val" not in dataset.splits():
        raise HeloxError(f"dataset {dataset.version} has no validation split",
                         hint="give the perplexity task a file (path:) instead of "
                              "source: validation")
    documents = []
    for domain in dataset.domains("val"):
        for i, tokens in zip(range(max_documents), dataset.documents("val", domain)):
            documents.append((f"{domain}/{i}", domain, [eos_id, *tokens.tolist()], None))
    return documents


def file_documents(lm: LanguageModel, task: PerplexityTask, suite_dir: Path) -> list[tuple]:
    source = SourceConfig(path=suite_dir / task.path, text_field=task.text_field)
    per_domain: dict[str, int] = {}
    documents = []
    for doc in read_documents(source):
        domain = doc.domain or "default"
        if per_domain.get(domain, 0) >= task.max_documents:
            continue
        per_domain[domain] = per_domain.get(domain, 0) + 1
        documents.append((doc.id, domain, lm.document(doc.text), doc.text))
    return documents


# ---------------------------------------------------------------------------------------------
# long-context recall and reasoning


def score_exact_answers(lm: LanguageModel, task_name: str,
                        probes: list[tuple[str, str, str, str]], advance: Advance,
                        ) -> list[ItemRow]:
    """(id, group, prompt, answer) probes: right when greedy decoding produces the answer
    exactly (its every token is the argmax), read off one forward (no sampling)."""
    rows = []
    for start in range(0, len(probes), CHUNK_ITEMS):
        chunk = probes[start:start + CHUNK_ITEMS]
        requests = [continuation_ids(lm, prompt, answer) for _, _, prompt, answer in chunk]
        for (probe_id, group, prompt, answer), request, result in zip(
                chunk, requests, lm.loglikelihood(requests)):
            truncated = len(request[0]) + len(request[1]) > lm.max_seq_len + 1
            rows.append(ItemRow(task_name, probe_id, f"{prompt}{answer}",
                                score=float(result.greedy), group=group,
                                detail={"answer": answer, "answer_logprob": result.logprob,
                                        "context_tokens": len(request[0]),
                                        "truncated": truncated}))
        advance(len(chunk))
    return rows


def recall_probes(task: RecallTask) -> list[tuple[str, str, str, str]]:
    """Needle-in-a-haystack probes over the grid context_words x depths; the asked value is
    the first word of the probe's answer (the needle)."""
    probes = []
    for words in task.context_words:
        for depth in task.depths:
            for i in range(task.items_per_cell):
                seed = task.seed * 1_000_003 + len(probes)
                probe = make_probe(task.task, seed, words, depth)
                value = " " + probe.answer.split()[0]
                probes.append((f"len{words}.depth{depth:g}.{i}", f"len{words}.depth{depth:g}",
                               probe.prompt, value))
    return probes


def reasoning_probes(task: ReasoningTask) -> list[tuple[str, str, str, str]]:
    rng = np.random.default_rng(task.seed)
    make = _chained_arithmetic if task.generator == "chained_arithmetic" else _variable_chain
    probes = []
    for steps in task.steps:
        for i in range(task.items_per_step):
            prompt, answer = make(rng, steps)
            probes.append((f"steps{steps}.{i}", f"steps{steps}", prompt, answer))
    return probes


VARIABLES = "abcdefghijklmnopqrstuvwxyz"


def _chained_arithmetic(rng: np.random.Generator, steps: int) -> tuple[str, str]:
    """'a = 3. b = a + 4. c = b - 2. c =' -> ' 5': each step adds or subtracts a digit from
    the previous variable, never going below 0."""
    value = int(rng.integers(0, 10))
    names = rng.permutation(list(VARIABLES))[:steps + 1]
    parts = [f"{names[0]} = {value}."]
    for step in range(1, steps + 1):
        delta = int(rng.integers(1, 10))
        if value - delta >= 0 and rng.random() < 0.5:
            value -= delta
            parts.append(f"{names[step]} = {names[step - 1]} - {delta}.")
        else:
            value += delta
            parts.append(f"{names[step]} = {names[step - 1]} + {delta}.")
    return " ".join(parts) + f" {names[steps]} =", f" {value}"


def _variable_chain(rng: np.random.Generator, steps: int) -> tuple[str, str]:
    """'X = 7. Y = X. Z = Y. Z =' -> ' 7', with a distractor chain interleaved."""
    names = [str(n) for n in rng.permutation(list(VARIABLES.upper()))[:2 * steps + 2]]
    values = rng.choice(10, size=2, replace=False)
    chains = [names[:steps + 1], names[steps + 1:]]
    lines = []
    for i in range(steps + 1):
        for c, chain in enumerate(chains):
            lines.append(f"{chain[0]} = {values[c]}." if i == 0 else f"{chain[i]} = "
                         f"{chain[i - 1]}.")
    return " ".join(lines) + f" {chains[0][-1]} =", f" {values[0]}"


# ---------------------------------------------------------------------------------------------
# tool calls

TURN_END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def tool_call_prompts(lm: LanguageModel, task: ToolCallTask, conversations: list[Conversation],
                      ) -> list[tuple[str, str, list[int], list]]:
    """(item id, user request, prompt ids, expected calls) per conversation: the conversation
    up to its first assistant turn, rendered with the generation prompt."""
    template = ChatTemplate.builtin(task.template,
                                    {"eos_token": lm.tokenizer.id_to_token(lm.eos_id) or ""})
    prompts = []
    for index, conversation in enumerate(conversations):
        turns = conversation.assistant_turns()
        if not turns:
            raise HeloxError(f"task {task.name}: conversation {index + 1} has no assistant turn",
                             hint="each item needs the assistant turn it is scored on")
        first = turns[0]
        prompt = template.render(conversation, add_generation_prompt=True, upto=first)
        request = next((m.content for m in conversation.messages[:first] if m.role == "user"),
                       "") or ""
        expected = [call.function for call in conversation.messages[first].tool_calls or []]
        prompts.append((tool_item_id(conversation, index), request, lm.encode(prompt),
                        expected))
    return prompts


def tool_item_id(conversation: Conversation, index: int) -> str:
    """A conversation's id, else its line number among the task's items."""
    return conversation.id or str(index + 1)


def score_tool_calls(lm: LanguageModel, task: ToolCallTask, conversations: list[Conversation],
                     advance: Advance) -> list[ItemRow]:
    """Greedy generations of the first assistant turn; an item scores 1 when its calls are
    well formed, of the right tools and with exactly the right arguments. Rows are grouped by
    the expected tool (`no_tool` where the turn calls none)."""
    prompts = tool_call_prompts(lm, task, conversations)
    rows = []
    for start in range(0, len(prompts), CHUNK_ITEMS):
        chunk = prompts[start:start + CHUNK_ITEMS]
        outputs = lm.greedy([ids for _, _, ids, _ in chunk], task.max_new_tokens,
                            [TURN_END[task.template]])
        for (item_id, request, _, expected), output in zip(chunk, outputs):
            score = score_calls(output, expected, task.template)
            rows.append(ItemRow(task.name, item_id, request, score=float(score.right_arguments),
                                group=expected[0].name if expected else "no_tool",
                                detail={"output": output, "well_formed": score.well_formed,
                                        "right_tool": score.right_tool}))
        advance(len(chunk))
    return rows
