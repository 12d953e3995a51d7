"""A synthetic preference task for DPO: is a number even or odd? Each pair's chosen response
names the number's parity and the rejected one the other; held-out numbers never occur in
training. A small model starts near chance (it has no rule for parity, only a bias between
the two words), so the held-out preference accuracy shows whether DPO taught the rule.

    {"prompt": "Is 4821 even or odd? Answer with one word.", "chosen": "Odd.",
     "rejected": "Even."}

`write_parity_set` writes the shipped files (helox/evals/parity/, by scripts/build_chat_sets.py):
the pairs and the `parity` eval suite's items.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from helox.chat.messages import Conversation, Message
from helox.chat.templates import ChatTemplate

PROMPT = "Is {number} even or odd? Answer with one word."
ANSWERS = ("Even.", "Odd.")


def parity_pair(number: int) -> dict:
    right = number % 2
    return {"id": f"parity-{number}", "prompt": PROMPT.format(number=number),
            "chosen": ANSWERS[right], "rejected": ANSWERS[1 - right]}


def parity_split(seed: int = 0, train: int = 400, test: int = 100,
                 low: int = 100, high: int = 9999) -> tuple[list[dict], list[dict]]:
    """Disjoint numbers for the two splits, half of each split even."""
    rng = random.Random(seed)
    evens = rng.sample(range(low + low % 2, high + 1, 2), (train + test) // 2)
    odds = rng.sample(range(low + 1 - low % 2, high + 1, 2), (train + test + 1) // 2)
    numbers_train = evens[:train // 2] + odds[:train - train // 2]
    numbers_test = evens[train // 2:] + odds[train - train // 2:]
    rng.shuffle(numbers_train)
    rng.shuffle(numbers_test)
    return ([parity_pair(n) for n in numbers_train], [parity_pair(n) for n in numbers_test])


def write_parity_set(folder: Path, seed: int = 0, train: int = 400, test: int = 100,
                     ) -> list[Path]:
    """train.jsonl and test.jsonl (preference pairs: DPO's training and held-out splits),
    and the suite's choice.jsonl and answer.jsonl over the test pairs in ChatML."""
    train_pairs, test_pairs = parity_split(seed, train, test)
    choice, answer = suite_items(test_pairs, ChatTemplate.builtin("chatml"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in (("train.jsonl", train_pairs), ("test.jsonl", test_pairs),
                          ("choice.jsonl", choice), ("answer.jsonl", answer)):
        paths.append(folder / name)
        paths[-1].write_text("".join(json.dumps(record) + "\n" for record in records))
    return paths


def suite_items(pairs: list[dict], template: ChatTemplate) -> tuple[list[dict], list[dict]]:
    """The `parity` suite's items for held-out pairs, prompts rendered as chat turns that
    await the assistant's answer: a choice item (does the model prefer the chosen response:
    the held-out preference accuracy) and an exact-answer item (what it generates)."""
    choice, answer = [], []
    for pair in pairs:
        prompt = template.render(Conversation(messages=[Message(role="user",
                                                                content=pair["prompt"])]),
                                 add_generation_prompt=True)
        choice.append({"id": pair["id"], "prompt": prompt, "choices": list(ANSWERS),
                       "answer": ANSWERS.index(pair["chosen"])})
        answer.append({"id": pair["id"], "prompt": prompt, "target": pair["chosen"]})
    return choice, answer
