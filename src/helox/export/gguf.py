"""GGUF export for llama.cpp: a Helox Llama as llama.cpp's `llama` architecture, with its
byte-level BPE tokenizer and the training provenance, plus the readers and the llama.cpp runner
that the provenance and parity checks use.

The file is written with the `gguf` package (llama.cpp's own writer and quantizers), following
what llama.cpp's convert_hf_to_gguf.py does for a Hugging Face Llama:
- Tensor names come from gguf's TensorNameMap applied to the Hugging Face names (helox.model.hf).
- Q and K projections are permuted from the rotate-half RoPE layout (Helox, HF) to the
  interleaved layout that llama.cpp's llama architecture rotates.
- 1-D tensors (the RMSNorm weights) stay F32; 2-D weights take the requested type.
- A tied head is not stored: llama.cpp falls back to token_embd when output.weight is absent.

Tensor types of the matrices, per requested type (llama.cpp's conventions):
- F32, F16: every matrix in that type.
- Q8_0: every matrix in Q8_0, token_embd and output included (convert_hf_to_gguf --outtype q8_0).
- Q4_0: matrices in Q4_0, except the output matrix (output.weight, or token_embd when the head is
  tied), which llama-quantize keeps at more bits (Q6_K, demoted to Q8_0 when rows are not a
  multiple of 256). gguf-py cannot write Q6_K, so it is Q8_0 here: what llama-quantize itself
  stores for rows that are not a multiple of 256, and the nearest finer type gguf-py can make.
- A quantized type needs rows that are a multiple of its block (32 values); a matrix whose rows
  are not is stored in F16, as llama-quantize does, and `write_gguf` reports it through `warn`.
  `gguf_stored_tensors` shows the type each tensor was stored in.

Helox reads every document as following the end-of-document token, so the GGUF's BOS and EOS
are both that token and add_bos_token is true: llama.cpp's tokenization of a text is then
`[eos_id] + tokenizer.encode(text).ids`, the ids Helox feeds its model.

Legend for array suffixes: T positions, V vocabulary.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from helox.errors import HeloxError
from helox.export.provenance import METADATA_PREFIX
from helox.checkpoint.fingerprint import StoredTensor, canonical_state
from helox.export.source import ExportSource
from helox.model.hf import to_hf_state_dict

try:
    import gguf
except ImportError:  # pragma: no cover - gguf is installed wherever GGUF export is used
    raise HeloxError("GGUF export needs the `gguf` package (llama.cpp's GGUF writer)",
                     hint="pip install 'gguf>=0.17'") from None

GGUF_TENSOR_TYPES: dict[str, gguf.LlamaFileType] = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
"""The tensor types `write_gguf` accepts, and the llama.cpp file type each one declares."""

GGUF_PRE_TOKENIZER = "gpt-2"
"""llama.cpp's name for the GPT-2 pre-tokenizer regex, which `tokenizers`' ByteLevel
pre-tokenizer (use_regex) applies: `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+|
?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)`."""

_QUANTIZED = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0)


@dataclass(frozen=True)
class GgufTensor:
    """One weight as it goes into the file: llama.cpp name, fp32 values in llama.cpp's layout,
    the type it is stored in, and why that type is not the requested one ("" when it is)."""
    name: str
    values: np.ndarray
    ggml_type: gguf.GGMLQuantizationType
    note: str = ""


def write_gguf(source: ExportSource, out_path: Path, tensor_type: str,
               metadata: dict[str, str], warn: Callable[[str], None] = lambda message: None,
               ) -> Path:
    """Write `source` as a GGUF file that llama.cpp loads, matrices in `tensor_type` (F32, F16,
    Q8_0 or Q4_0), `metadata` (helox.* provenance) as string key-values. Written to a
    temporary file and renamed, so `out_path` is never left half-written. Matrices stored in
    another type than requested (see the module doc) are reported through `warn`."""
    file_type = _file_type(tensor_type)
    _check_metadata(metadata)
    _check_tokenizer(source)
    tensors = gguf_tensors(source, tensor_type)
    notes = [f"{t.name}: {t.note}" for t in tensors if t.note]
    if notes:
        warn(f"GGUF {tensor_type}: " + "; ".join(notes))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        _write_file(tmp_path, source, file_type, tensors, metadata)
        os.replace(tmp_path, out_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return out_path


def gguf_tensors(source: ExportSource, tensor_type: str) -> list[GgufTensor]:
    """The model's weights under llama.cpp's names, Q/K permuted, each with its stored type."""
    requested = gguf.GGMLQuantizationType[_checked_type_name(tensor_type)]
    cfg = source.config.model
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_layers)
    hf_state = to_hf_state_dict(canonical_state(source.model), cfg)
    tensors = []
    for hf_name, tensor in hf_state.items():
        name = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise HeloxError(f"weight '{hf_name}' has no llama.cpp tensor name",
                             hint="only Llama-architecture models export to GGUF")
        values = _llama_cpp_layout(hf_name, tensor, cfg.num_heads, cfg.kv_heads).numpy()
        is_output = name == "output.weight" or (cfg.tie_embeddings and name == "token_embd.weight")
        ggml_type, note = _stored_type(values, requested, is_output)
        tensors.append(GgufTensor(name, values, ggml_type, note))
    return tensors


def rope_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Q or K projection rows (num_heads * head_dim, d_model) from the rotate-half RoPE layout
    (each head's first half rotates with its second half) to the interleaved one (pairs of
    adjacent rows rotate together): llama.cpp's llama architecture uses the latter. The same
    reshape as convert_hf_to_gguf.py's LlamaModel.permute."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, 2, head_dim // 2, cols).transpose(1, 2)
            .reshape(rows, cols))


def gguf_stored_tensors(path: Path) -> list[StoredTensor]:
    """Every tensor of a GGUF file as stored: GGML type name (F32, Q8_0, ...), shape in GGUF
    order (innermost dimension first) and its exact bytes (a view of the mapped file), the
    input of `weights_fingerprint`."""
    reader = _reader(path)
    return [StoredTensor(t.name, t.tensor_type.name, tuple(int(n) for n in t.shape),
                         memoryview(reader.data[t.data_offset:t.data_offset + t.n_bytes]))
            for t in reader.tensors]


def gguf_metadata(path: Path) -> dict[str, str]:
    """The helox.* string key-values of a GGUF file (the provenance `write_gguf` embedded)."""
    reader = _reader(path)
    return {name: str(field.contents()) for name, field in reader.fields.items()
            if name.startswith(METADATA_PREFIX)
            and field.types == [gguf.GGUFValueType.STRING]}


class LlamaCppRunner:
    """A GGUF file loaded in llama.cpp through llama-cpp-python, on the CPU with an fp32 KV cache
    (the default f16 cache would blur fp32 parity): logits of every position, llama.cpp's
    tokenization and greedy generation. Use as a context manager, or call `close`."""

    def __init__(self, path: Path, num_threads: int = 1):
        llama_cpp = _import_llama_cpp()
        # n_ctx=0: the file's context length (llama.cpp pads it to a multiple of 256).
        self._llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=0, logits_all=True, n_gpu_layers=0,
            n_threads=num_threads, n_threads_batch=num_threads, flash_attn=False,
            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, seed=0,
            verbose=False)
        # What the model was built for (its max_seq_len), not the padded context.
        self.context_length = int(self._llama.metadata.get("llama.context_length",
                                                           self._llama.n_ctx()))

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """(T, V) fp32 next-token logits for every position of `token_ids` (BOS included if
        wanted: nothing is added)."""
        if not 0 < len(token_ids) <= self.context_length:
            raise HeloxError(f"{len(token_ids)} tokens do not fit the model's context of "
                             f"{self.context_length}",
                             hint="evaluate between 1 and the context length of tokens")
        self._llama.reset()
        self._llama.eval(list(token_ids))
        return np.array(self._llama.scores[:len(token_ids)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's ids for `text`, BOS first (the file sets add_bos_token)."""
        return self._llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def greedy(self, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """llama.cpp's greedy continuation (its own sampler at temperature 0), stopping early at
        the EOS token, which is not returned (as helox.model.generate does)."""
        new_ids: list[int] = []
        if max_new_tokens <= 0:
            return new_ids
        for token_id in self._llama.generate(list(token_ids), temp=0.0, top_k=1,
                                             repeat_penalty=1.0, reset=True):
            if token_id == self._llama.token_eos():
                break
            new_ids.append(int(token_id))
            if len(new_ids) == max_new_tokens:
                break
        return new_ids

    def close(self) -> None:
        self._llama.close()

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise HeloxError(f"running a GGUF file needs llama-cpp-python, which does not import "
                         f"here ({exc})",
                         hint="pip install llama-cpp-python (it compiles llama.cpp: ~20 min on "
                              "2 cores; CMAKE_ARGS='-DGGML_NATIVE=OFF' for a portable build)"
                         ) from None
    return llama_cpp


def _checked_type_name(tensor_type: str) -> str:
    if tensor_type not in GGUF_TENSOR_TYPES:
        raise HeloxError(f"unknown GGUF tensor type '{tensor_type}'",
                         hint=f"choose one of {', '.join(GGUF_TENSOR_TYPES)}")
    return tensor_type


def _file_type(tensor_type: str) -> gguf.LlamaFileType:
    return GGUF_TENSOR_TYPES[_checked_type_name(tensor_type)]


def _check_metadata(metadata: dict[str, str]) -> None:
    bad = [key for key, value in metadata.items()
           if not (isinstance(key, str) and key.startswith(METADATA_PREFIX)
                    and len(key) > len(METADATA_PREFIX))
           or not isinstance(value, str)]
    if bad:
        raise HeloxError(f"GGUF metadata must be string values under '{METADATA_PREFIX}*' keys; "
                         f"these are not: {', '.join(map(repr, bad))}",
                         hint="pass helox.export.provenance.training_metadata(source), or "
                              f"prefix keys with '{METADATA_PREFIX}' and convert values to str")


def _llama_cpp_layout(hf_name: str, tensor: torch.Tensor, num_heads: int,
                      num_kv_heads: int) -> torch.Tensor:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return rope_permute(tensor, num_heads)
    if hf_name.endswith("self_attn.k_proj.weight"):
        return rope_permute(tensor, num_kv_heads)
    return tensor


def _stored_type(values: np.ndarray, requested: gguf.GGMLQuantizationType, is_output: bool,
                 ) -> tuple[gguf.GGMLQuantizationType, str]:
    """The type a weight is stored in and, when it is not the requested one for a reason
    worth reporting, why (the module doc lists the conventions)."""
    if values.ndim <= 1:
        return gguf.GGMLQuantizationType.F32, ""  # llama.cpp keeps norms and vectors in F32
    if requested not in _QUANTIZED:
        return requested, ""
    if is_output and requested == gguf.GGMLQuantizationType.Q4_0:
        requested = gguf.GGMLQuantizationType.Q8_0
    block_size, _ = gguf.GGML_QUANT_SIZES[requested]
    if values.shape[-1] % block_size != 0:
        return gguf.GGMLQuantizationType.F16, (
            f"F16, its rows of {values.shape[-1]} are not a multiple of the {requested.name} "
            f"block size {block_size}")
    return requested, ""


def _write_file(path: Path, source: ExportSource, file_type: gguf.LlamaFileType,
                tensors: list[GgufTensor], metadata: dict[str, str]) -> None:
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_model_keys(writer, source, file_type)
        _add_tokenizer_keys(writer, source)
        for key, value in metadata.items():
            # add_key_value, not add_string: add_string drops empty values, which are provenance
            # too (an empty parent_model says there was none).
            writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
        for tensor in tensors:
            _add_tensor(writer, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.flush()
        os.fsync(writer.fout[0].fileno())
    finally:
        writer.close()


def _add_model_keys(writer: gguf.GGUFWriter, source: ExportSource,
                    file_type: gguf.LlamaFileType) -> None:
    cfg = source.config.model
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(source.name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)


def _add_tokenizer_keys(writer: gguf.GGUFWriter, source: ExportSource) -> None:
    merges = json.loads(source.tokenizer.to_str())["model"]["merges"]
    tokens, token_types = _vocab(source)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    # tokenizer.json stores merges as "a b" (older) or ["a", "b"] (newer `tokenizers`).
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(source.eos_id)
    writer.add_eos_token_id(source.eos_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _check_tokenizer(source: ExportSource) -> None:
    """llama.cpp's "gpt2" model with the "gpt-2" pre-tokenizer reproduces a byte-level BPE
    without normalizer whose ByteLevel pre-tokenizer splits with the GPT-2 regex and adds no
    prefix space; anything else would tokenize differently, so it is refused."""
    spec = json.loads(source.tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model is {model.get('type')}, not BPE")
    if pre.get("type") != "ByteLevel":
        problems.append(f"pre-tokenizer is {pre.get('type')}, not ByteLevel")
    elif pre.get("add_prefix_space") or not pre.get("use_regex", True):
        problems.append("ByteLevel pre-tokenizer adds a prefix space or skips the GPT-2 regex")
    if spec.get("normalizer") is not None:
        problems.append(f"it has a normalizer ({spec['normalizer'].get('type')})")
    if model.get("ignore_merges") or model.get("byte_fallback") or model.get(
            "continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("BPE options (ignore_merges, byte_fallback, subword affixes) are set")
    if source.tokenizer.get_vocab_size() > source.config.model.vocab_size:
        problems.append(f"{source.tokenizer.get_vocab_size()} tokens for a model vocabulary "
                        f"of {source.config.model.vocab_size}")
    if problems:
        raise HeloxError(f"{source.tokenizer_json}: llama.cpp cannot reproduce this tokenizer: "
                         + "; ".join(problems),
                         hint="export models trained with Helox's byte-level BPE "
                              "(helox.data.tokenizer.train_bpe)")


def _vocab(source: ExportSource) -> tuple[list[str], list[int]]:
    """Token strings by id (byte-level, as in tokenizer.json) and llama.cpp token types:
    CONTROL for special tokens, USER_DEFINED for other added ones, UNUSED for ids the model
    has past the tokenizer's vocabulary (as convert_hf_to_gguf names them)."""
    by_id = {token_id: token for token, token_id in
             source.tokenizer.get_vocab(with_added_tokens=True).items()}
    added = source.tokenizer.get_added_tokens_decoder()
    tokens, token_types = [], []
    for token_id in range(source.config.model.vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            token_types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            token_types.append(gguf.TokenType.CONTROL if added[token_id].special
                               else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            token_types.append(gguf.TokenType.NORMAL)
    return tokens, token_types


def _add_tensor(writer: gguf.GGUFWriter, tensor: GgufTensor) -> None:
    if tensor.ggml_type in _QUANTIZED:
        writer.add_tensor(tensor.name, gguf.quants.quantize(tensor.values, tensor.ggml_type),
                          raw_dtype=tensor.ggml_type)
    else:
        writer.add_tensor(tensor.name, gguf.quants.quantize(tensor.values, tensor.ggml_type))


def _reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise HeloxError(f"{path}: not a readable GGUF file ({exc})",
                         hint="pass a .gguf file written by `helox export` or llama.cpp") from None
