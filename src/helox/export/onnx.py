"""ONNX export: the trained decoder as one .onnx file that onnxruntime runs, with the training
metadata in its metadata_props, and a TensorRT engine built from it where TensorRT exists.

The graph (opset `OPSET`, exported by `torch.onnx.export(..., dynamo=True)`; the legacy
TorchScript exporter fails on Llama's ops):
    inputs   input_ids       int64 (batch, sequence)
             attention_mask  int64 (batch, sequence): 1 = real token, 0 = padding
    output   logits          float32 (batch, sequence, vocab)
Batch is unbounded, sequence runs from 1 to the model's max_seq_len; one file serves all.

Padding may be on the right, the left, or both: position ids count real tokens only
(cumsum(mask) - 1, as transformers does), and a real token attends to earlier real tokens only.
The model's document mask does this with `doc_ids = attention_mask`: padding forms a document
of its own, so a padded position still attends to something (itself) and its logits stay
finite. They are meaningless; read logits at real positions only.

Weights are stored inside the .onnx file; above `EXTERNAL_DATA_BYTES` they go to
`<file>.data` next to it (protobuf cannot serialize a message over 2 GiB).

Legend for tensor suffixes: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from helox import version
from helox.errors import HeloxError
from helox.checkpoint.fingerprint import StoredTensor
from helox.export.provenance import METADATA_PREFIX, numpy_stored
from helox.export.source import ExportSource
from helox.model.llama import Llama

OPSET = 18
"""ai.onnx opset of the graph: run by onnxruntime >= 1.14 and parsed by TensorRT 10 and 11."""
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
MAX_SEQ_LEN_KEY = "max_seq_len"
"""metadata_props key (outside `helox.*`) with the longest sequence the graph accepts."""
EXTERNAL_DATA_BYTES = 1 << 30
"""Weights above 1 GiB go to an external data file: well under protobuf's 2 GiB cap."""


class _LogitsGraph(nn.Module):
    """What the ONNX graph computes: Llama logits for a (possibly padded) batch."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                ) -> torch.Tensor:
        position_ids_BT = (attention_mask_BT.cumsum(dim=1) - 1).clamp(min=0)
        return self.model(input_ids_BT, position_ids_BT, doc_ids_BT=attention_mask_BT)


def write_onnx(source: ExportSource, out_path: Path, metadata: dict[str, str],
               log: Callable[[str], None] | None = None) -> Path:
    """Export `source.model` to `out_path` (atomically: nothing is left half-written) with
    every `metadata` pair in its metadata_props, checked by onnx.checker. `log` receives
    progress lines; when given, torch.onnx prints its own export steps too."""
    _require("onnx", "onnxscript")
    import onnx

    out_path = Path(out_path)
    say = log or (lambda message: None)
    started = time.perf_counter()
    say(f"exporting {source.name} (step {source.step}) to ONNX opset {OPSET} "
        f"with torch {torch.__version__} (dynamo)")
    program = _export_program(source, verbose=None if log else False)
    _annotate(program.model, source, metadata)
    weight_bytes = sum(p.numel() * p.element_size() for p in source.model.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        staged = staging / out_path.name
        program.save(staged, external_data=external)
        say("checking the graph with onnx.checker")
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise HeloxError(f"the exported ONNX graph of {source.name} is invalid: {exc}",
                             hint="report this with your torch and onnxscript versions") from exc
        for staged_file in sorted(staging.iterdir(), key=lambda p: p == staged):
            os.replace(staged_file, out_path.parent / staged_file.name)  # the .onnx last
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB"
        f"{', weights in ' + out_path.name + '.data' if external else ''}) "
        f"in {time.perf_counter() - started:.1f} s")
    return out_path


def _export_program(source: ExportSource, verbose: bool | None):
    """torch.onnx's ONNXProgram of the logits graph with dynamic batch and sequence axes."""
    max_seq_len = source.config.model.max_seq_len
    batch = torch.export.Dim("batch", min=1)
    sequence = torch.export.Dim("sequence", min=1, max=max_seq_len)
    example_T = min(8, max_seq_len)
    input_ids_BT = torch.full((2, example_T), source.eos_id, dtype=torch.int64)
    attention_mask_BT = torch.ones_like(input_ids_BT)
    try:
        with _quiet_exporter():
            return torch.onnx.export(
                _LogitsGraph(source.model).eval(), (input_ids_BT, attention_mask_BT),
                dynamo=True, opset_version=OPSET, input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME], verbose=verbose,
                dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}))
    except Exception as exc:  # torch.export and the ONNX translation raise many types
        lines = [line for line in str(exc).splitlines() if line.strip()][:4]
        raise HeloxError(
            f"torch.onnx.export failed for {source.name}: {type(exc).__name__}: "
            + "\n  ".join(lines),
            hint="an op without an ONNX translation or a shape torch.export cannot trace; "
                 f"check that torch ({torch.__version__}) and onnxscript are current "
                 "(`pip install -U torch onnxscript`) and report the message above") from exc


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence exporter chatter that says nothing about this model: skipped torchvision ops,
    renamed dynamic axes and deprecations inside torch."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _annotate(model, source: ExportSource, metadata: dict[str, str]) -> None:
    """Producer, graph name and metadata_props on the onnx_ir model before it is saved."""
    model.producer_name = "helox"
    model.producer_version = version.__version__
    model.graph.name = source.name
    model.doc_string = (f"{source.name} step {source.step}: next-token logits; "
                        f"attention_mask 1 = token, 0 = padding (left or right)")
    model.metadata_props.update(metadata)
    model.metadata_props[MAX_SEQ_LEN_KEY] = str(source.config.model.max_seq_len)


def onnx_stored_tensors(path: Path) -> list[StoredTensor]:
    """The initializers as stored: name, ONNX data type name (FLOAT, INT64, ...), dims and
    bytes, external data included: what a weights fingerprint of the file hashes."""
    _require("onnx")
    import onnx
    from onnx import numpy_helper

    model = _load_onnx(path, load_external_data=True)
    return [numpy_stored(tensor.name, numpy_helper.to_array(tensor),
                         onnx.TensorProto.DataType.Name(tensor.data_type))
            for tensor in model.graph.initializer]


def onnx_metadata(path: Path) -> dict[str, str]:
    """The `helox.*` metadata_props of an exported file."""
    return {key: value for key, value in _metadata_props(path).items()
            if key.startswith(METADATA_PREFIX)}


def _metadata_props(path: Path) -> dict[str, str]:
    _require("onnx")
    model = _load_onnx(path, load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def _load_onnx(path: Path, load_external_data: bool):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise HeloxError(f"{path} does not exist", hint="pass an .onnx file written by "
                                                        "`helox export --format onnx`")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf's DecodeError, missing external data, ...
        raise HeloxError(f"{path} is not a readable ONNX model: {exc}",
                         hint="export it again; a .onnx with external weights needs its "
                              ".data file next to it") from exc


class OnnxRunner:
    """An onnxruntime session on the CPU over an exported file."""

    def __init__(self, path: Path, num_threads: int = 2):
        ort = _import_onnxruntime()
        path = Path(path)
        self.max_seq_len = int(_metadata_props(path).get(MAX_SEQ_LEN_KEY, 0)) or None
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise HeloxError(f"onnxruntime cannot load {path}: {exc}",
                             hint="export it again with this Helox version") from exc

    def logits(self, input_ids_BT: np.ndarray, attention_mask_BT: np.ndarray | None = None,
               ) -> np.ndarray:
        """float32 logits (B, T, V); no mask means every position is a real token."""
        input_ids_BT, attention_mask_BT = _check_inputs(input_ids_BT, attention_mask_BT,
                                                        self.max_seq_len)
        feeds = {"input_ids": input_ids_BT, "attention_mask": attention_mask_BT}
        return self.session.run([OUTPUT_NAME], feeds)[0]


def onnx_logits(path: Path, input_ids_BT: np.ndarray,
                attention_mask_BT: np.ndarray | None = None) -> np.ndarray:
    """One-off logits from an exported file (a session per call: use OnnxRunner for more)."""
    return OnnxRunner(path).logits(input_ids_BT, attention_mask_BT)


def _check_inputs(input_ids_BT: np.ndarray, attention_mask_BT: np.ndarray | None,
                  max_seq_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """int64 ids and mask of one (B, T) shape, T within the graph's limit."""
    input_ids_BT = np.asarray(input_ids_BT)
    if input_ids_BT.ndim != 2 or not np.issubdtype(input_ids_BT.dtype, np.integer):
        raise HeloxError(f"input_ids must be a 2-D integer array (batch, sequence), got "
                         f"{input_ids_BT.dtype} of shape {input_ids_BT.shape}",
                         hint="wrap one sequence as np.array([ids], dtype=np.int64)")
    if max_seq_len is not None and input_ids_BT.shape[1] > max_seq_len:
        raise HeloxError(f"{input_ids_BT.shape[1]} tokens exceed the model's max_seq_len "
                         f"{max_seq_len}", hint=f"truncate to the last {max_seq_len} tokens")
    if attention_mask_BT is None:
        attention_mask_BT = np.ones_like(input_ids_BT)
    attention_mask_BT = np.asarray(attention_mask_BT)
    if attention_mask_BT.shape != input_ids_BT.shape:
        raise HeloxError(f"attention_mask has shape {attention_mask_BT.shape}, input_ids "
                         f"{input_ids_BT.shape}", hint="give one mask entry per token")
    return input_ids_BT.astype(np.int64), attention_mask_BT.astype(np.int64)


def _require(*modules: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise HeloxError(f"ONNX export needs {' and '.join(missing)}: not installed",
                         hint=f"pip install {' '.join(missing)}")


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise HeloxError("onnxruntime is not installed: it runs exported ONNX models",
                         hint="pip install onnxruntime") from exc
    return onnxruntime


# ---------------------------------------------------------------------------------------------
# TensorRT: an engine from the ONNX file, with one optimization profile over batch x sequence

def build_tensorrt_engine(onnx_path: Path, out_path: Path, max_batch_size: int = 8,
                          max_seq_len: int | None = None, fp16: bool = True,
                          log: Callable[[str], None] | None = None) -> Path:
    """Build a serialized TensorRT engine from an exported file, with the TensorRT Python API
    or, without it, `trtexec` on PATH. The profile spans batch 1..max_batch_size and sequence
    1..max_seq_len (default: the file's); fp16 where the TensorRT version offers the flag
    (TensorRT 11 networks are strongly typed: the ONNX types decide)."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    max_seq_len = max_seq_len or int(_metadata_props(onnx_path).get(MAX_SEQ_LEN_KEY, 0))
    if max_seq_len <= 0:
        raise HeloxError(f"{onnx_path} does not record its max_seq_len",
                         hint="pass max_seq_len, or export the file with this Helox version")
    profile = _profile_shapes(max_batch_size, max_seq_len)
    trt, trtexec = require_tensorrt()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staged = out_path.with_name(f".{out_path.name}.tmp")
    started = time.perf_counter()
    if trt is not None:
        staged.write_bytes(_build_with_python_api(trt, onnx_path, profile, fp16))
    else:
        _build_with_trtexec(trtexec, onnx_path, staged, profile, fp16)
    os.replace(staged, out_path)
    if log:
        log(f"built TensorRT engine {out_path} in {time.perf_counter() - started:.1f} s")
    return out_path


def require_tensorrt():
    """(the tensorrt module or None, the trtexec path or None), at least one of them; else
    the error that says TensorRT is missing."""
    trt = _import_tensorrt()
    trtexec = shutil.which("trtexec")
    if trt is None and trtexec is None:
        raise HeloxError("TensorRT is not installed (needs an NVIDIA GPU and "
                         "`pip install tensorrt`), so no engine can be built",
                         hint="install TensorRT 10 or newer on a machine with an NVIDIA GPU, "
                              "or run the .onnx file with onnxruntime instead")
    return trt, trtexec


def _profile_shapes(max_batch_size: int, max_seq_len: int) -> dict[str, tuple[int, int]]:
    """min, opt and max (batch, sequence) of every input: opt at a typical prompt size."""
    return {"min": (1, 1), "opt": (max(1, max_batch_size // 2), max(1, max_seq_len // 2)),
            "max": (max_batch_size, max_seq_len)}


def _import_tensorrt():
    """The tensorrt module (10 or newer), or None when it is not installed."""
    try:
        import tensorrt
    except ImportError:
        return None
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise HeloxError(f"TensorRT {tensorrt.__version__} is too old for Helox engines",
                         hint="pip install 'tensorrt>=10'")
    return tensorrt


def _build_with_python_api(trt, onnx_path: Path, profile: dict[str, tuple[int, int]],
                           fp16: bool) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise HeloxError(f"TensorRT cannot parse {onnx_path}: {errors}",
                         hint="check the TensorRT version supports ONNX opset "
                              f"{OPSET}, or upgrade TensorRT")
    config = builder.create_builder_config()
    if fp16 and hasattr(trt.BuilderFlag, "FP16") and getattr(builder, "platform_has_fast_fp16",
                                                               False):
        config.set_flag(trt.BuilderFlag.FP16)
    optimization_profile = builder.create_optimization_profile()
    for name in INPUT_NAMES:
        optimization_profile.set_shape(name, profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(optimization_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise HeloxError(f"TensorRT failed to build an engine from {onnx_path}",
                         hint="its log above names the layer; try fp16=False or a smaller "
                              "max_batch_size")
    return bytes(serialized)


def _build_with_trtexec(trtexec: str, onnx_path: Path, engine_path: Path,
                        profile: dict[str, tuple[int, int]], fp16: bool) -> None:
    def shapes(kind: str) -> str:
        batch, sequence = profile[kind]
        return ",".join(f"{name}:{batch}x{sequence}" for name in INPUT_NAMES)

    command = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
               f"--minShapes={shapes('min')}", f"--optShapes={shapes('opt')}",
               f"--maxShapes={shapes('max')}"]
    usage = subprocess.run([trtexec, "--help"], capture_output=True, text=True)
    if fp16 and "--fp16" in usage.stdout + usage.stderr:  # gone in TensorRT 11
        command.append("--fp16")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n  ".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise HeloxError(f"trtexec failed to build an engine from {onnx_path}:\n  {tail}",
                         hint=f"rerun `{' '.join(command)}` to see its full log")


class TensorRTRunner:
    """A TensorRT engine run on the current CUDA device, buffers held by torch."""

    def __init__(self, engine_path: Path):
        trt = _import_tensorrt()
        if trt is None or not torch.cuda.is_available():
            raise HeloxError("running a TensorRT engine needs TensorRT and a CUDA device",
                             hint="pip install tensorrt on a machine with an NVIDIA GPU")
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise HeloxError(f"TensorRT cannot load {engine_path}", hint="engines only run "
                             "on the TensorRT version and GPU they were built with: rebuild it")
        self.context = self.engine.create_execution_context()

    def logits(self, input_ids_BT: np.ndarray, attention_mask_BT: np.ndarray | None = None,
               ) -> np.ndarray:
        input_ids_BT, attention_mask_BT = _check_inputs(input_ids_BT, attention_mask_BT, None)
        buffers = {name: self._device_tensor(name, array) for name, array in
                   zip(INPUT_NAMES, (input_ids_BT, attention_mask_BT))}
        for name, tensor in buffers.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
        out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        buffers[OUTPUT_NAME] = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        for name, tensor in buffers.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise HeloxError("TensorRT failed to run the engine",
                             hint="check the shapes are inside the engine's profile")
        stream.synchronize()
        return buffers[OUTPUT_NAME].cpu().numpy()

    def _device_tensor(self, name: str, array: np.ndarray) -> torch.Tensor:
        """The input in the engine's type for it (TensorRT may take int64 ids as int32)."""
        dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
        return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype)).cuda()
