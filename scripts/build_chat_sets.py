"""Write the synthetic chat sets shipped in src/helox/evals/ (deterministic, seed 0):

  tool-use/  train.jsonl (400 conversations, the fine-tuning split) and test.jsonl (100, the
             `tool-use` suite's held-out items, sharing no request with train)
             (helox.chat.tooluse)
  parity/    train.jsonl (400 preference pairs, DPO's training split), test.jsonl (100
             held-out pairs, its validation split) and the `parity` suite's choice.jsonl and
             answer.jsonl over the held-out pairs (helox.chat.parity)

    python scripts/build_chat_sets.py
"""

from pathlib import Path

from helox.chat.parity import write_parity_set
from helox.chat.tooluse import write_tool_use_set

EVALS = Path(__file__).resolve().parents[1] / "src" / "helox" / "evals"
TRAIN, TEST, SEED = 400, 100, 0

if __name__ == "__main__":
    for path in [*write_tool_use_set(EVALS / "tool-use", TRAIN, TEST, SEED),
                 *write_parity_set(EVALS / "parity", SEED, TRAIN, TEST)]:
        print(path)
