"""Packed-sequence loader over memory-mapped token shards, with an exact, resumable position.

Shards hold documents back to back, each followed by EOS, so cutting the stream into blocks packs
documents with EOS separators. Block k of a shard is tokens [k*T, k*T + T + 1): T inputs and the
T next-token targets. An epoch visits every block once in an order that is a pure function of
(seed, dataset version, epoch); the loader's whole state is (epoch, blocks consumed in it), so
resuming from a checkpoint reproduces the remaining batches exactly.

Legend: B = micro-batch size, T = sequence length.
"""

from __future__ import annotations

import numpy as np
import torch

from helox.data.shards import DatasetVersion
from helox.errors import HeloxError


class PackedLoader:
    def __init__(self, dataset: DatasetVersion, split: str, seq_len: int, batch_size: int,
                 seed: int, shuffle: bool = True):
        self.dataset_version = dataset.version
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.shuffle = seed, shuffle
        self._shards = [np.memmap(p, dtype=dataset.dtype, mode="r")
                        for p in dataset.shard_paths(split)]
        blocks_per_shard = np.array([(len(s) - 1) // seq_len for s in self._shards], np.int64)
        self._first_block = np.concatenate([[0], np.cumsum(blocks_per_shard)])
        self.num_blocks = int(self._first_block[-1])
        if self.num_blocks < batch_size:
            raise HeloxError(
                f"the '{split}' split of dataset {dataset.version} holds {self.num_blocks} "
                f"sequences of {seq_len} tokens, fewer than one batch of {batch_size}",
                hint="add data, or lower train.seq_len or train.micro_batch_size")
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_blocks)
        version_int = int(self.dataset_version, 16)
        rng = np.random.default_rng([self.seed, version_int, epoch])
        return rng.permutation(self.num_blocks)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (inputs_BT, targets_BT) as int64; wraps into the next epoch when one ends."""
        blocks = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row in range(self.batch_size):
            if self.position == self.num_blocks:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            blocks[row] = self._block(int(self._order[self.position]))
            self.position += 1
        tokens_BT1 = torch.from_numpy(blocks)
        return tokens_BT1[:, :-1], tokens_BT1[:, 1:]

    def _block(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first_block, index, side="right")) - 1
        start = (index - int(self._first_block[shard])) * self.seq_len
        return self._shards[shard][start: start + self.seq_len + 1]

    def state_dict(self) -> dict:
        return {"dataset_version": self.dataset_version, "split": self.split,
                "seq_len": self.seq_len, "batch_size": self.batch_size, "seed": self.seed,
                "shuffle": self.shuffle, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("dataset_version", "split", "seq_len", "seed", "shuffle"):
            if state[key] != mine[key]:
                raise HeloxError(
                    f"cannot resume the data loader: saved {key} is {state[key]!r}, "
                    f"this run has {mine[key]!r}",
                    hint="resume with the config and dataset the checkpoint was written with")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
