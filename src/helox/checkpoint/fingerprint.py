"""The identity of a model's weights: a fingerprint over canonical weight bytes, the same
whatever format the weights are later stored in (exports compare against it; a LoRA run
records its base's)."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as an artifact stores it: `dtype` in the format's own words (F32, Q8_0,
    ...), `shape` in the format's order, `data` the exact stored bytes."""
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


def weights_fingerprint(tensors: Iterable[StoredTensor]) -> str:
    """sha256 over the tensors sorted by name, each a JSON header (name, dtype, shape, byte
    count) and a newline followed by its bytes: any changed byte, shape, type or name, and
    any tensor added or dropped, changes it."""
    digest = hashlib.sha256()
    for tensor in sorted(tensors, key=lambda t: t.name):
        data = memoryview(tensor.data).cast("B")
        header = {"name": tensor.name, "dtype": tensor.dtype, "shape": list(tensor.shape),
                  "nbytes": data.nbytes}
        digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
        digest.update(data)
    return digest.hexdigest()


def torch_stored(name: str, tensor: torch.Tensor) -> StoredTensor:
    """A torch tensor as little-endian bytes in its own dtype (F32, F16, BF16, ...)."""
    array = tensor.detach().cpu().contiguous()
    dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32"}[array.dtype]
    raw = array.view(torch.uint8) if array.dtype == torch.bfloat16 else array
    assert sys.byteorder == "little", "fingerprints are defined over little-endian bytes"
    return StoredTensor(name, dtype, tuple(array.shape), raw.numpy().tobytes())


def model_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint of a model's weights in fp32 under Helox's names (a tied head once):
    the identity of a trained model, whatever format it is later stored in."""
    return weights_fingerprint(torch_stored(name, tensor)
                               for name, tensor in canonical_state(model).items())


def canonical_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights by Helox name, fp32 and contiguous, a tied head included once
    (under `embed.weight`): the input of the model fingerprint."""
    state = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key in seen and tensor.shape == state[seen[key]].shape:
            continue
        seen[key] = name
        state[name] = tensor.detach().to(torch.float32).contiguous()
    return state
