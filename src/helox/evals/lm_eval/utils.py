"""Datasets for the tasks in this folder, read from the JSONL files beside it.

`dataset_path: json` would resolve relative `data_files` against the working directory, so
the tasks load their files through `custom_dataset` instead: found from this file's folder,
from any working directory, with no hub access.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rows(name: str) -> dict:
    import datasets

    with open(HERE / name, encoding="utf-8") as f:
        return {"test": datasets.Dataset.from_list([json.loads(line) for line in f])}


def cloze(**metadata) -> dict:
    """lm-eval passes the task's metadata and dataset_kwargs; these files need none."""
    return _rows("cloze.jsonl")


def passages(**metadata) -> dict:
    return _rows("passages.jsonl")
