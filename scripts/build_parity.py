"""Write the synthetic parity preference set shipped in src/helox/evals/parity/
(helox.chat.parity): train.jsonl (400 pairs, DPO's training split), test.jsonl (100 held-out
pairs, its validation split) and the `parity` suite's choice.jsonl and answer.jsonl over the
held-out pairs. Deterministic: seed 0.

    python scripts/build_parity.py
"""

from pathlib import Path

from helox.chat.parity import write_parity_set

FOLDER = Path(__file__).resolve().parents[1] / "src" / "helox" / "evals" / "parity"
TRAIN, TEST, SEED = 400, 100, 0

if __name__ == "__main__":
    for path in write_parity_set(FOLDER, SEED, TRAIN, TEST):
        print(path)
