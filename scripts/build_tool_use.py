"""Write the synthetic tool-use set shipped in src/helox/evals/tool-use/ (helox.chat.tooluse):
train.jsonl (400 conversations, the fine-tuning split) and test.jsonl (100, the held-out items
of the `tool-use` suite, sharing no request with train). Deterministic: seed 0.

    python scripts/build_tool_use.py
"""

from pathlib import Path

from helox.chat.tooluse import write_tool_use_set

FOLDER = Path(__file__).resolve().parents[1] / "src" / "helox" / "evals" / "tool-use"
TRAIN, TEST, SEED = 400, 100, 0

if __name__ == "__main__":
    for path in write_tool_use_set(FOLDER, TRAIN, TEST, SEED):
        print(path)
