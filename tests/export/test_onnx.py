"""ONNX export: onnxruntime runs the exported graph and matches Helox's fp32 logits on dynamic
batch and sequence sizes and on padded batches; metadata and the weights fingerprint survive
the file; TensorRT builds an engine where it exists and says clearly when it does not."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from helox.errors import HeloxError
from helox.export.onnx import (MAX_SEQ_LEN_KEY, OPSET, OnnxRunner,
                               TensorRTRunner, build_tensorrt_engine, onnx_logits,
                               onnx_metadata, onnx_stored_tensors, write_onnx)
from helox.checkpoint.fingerprint import weights_fingerprint
from helox.export.provenance import training_metadata
from helox.export.parity import THRESHOLDS, parity_figures, threshold_failures
from helox.export.source import ExportSource, load_export_source
from helox.testing.skips import NO_TENSORRT

PROMPTS = ["Once upon a time", "The cat sat on the mat because it was",
           "In the beginning there was", "a"]


@pytest.fixture(scope="module")
def tied_onnx(export_run, tmp_path_factory) -> tuple[ExportSource, Path]:
    source = load_export_source(export_run)
    out_path = tmp_path_factory.mktemp("onnx") / "tied.onnx"
    return source, write_onnx(source, out_path, training_metadata(source))


@pytest.fixture(scope="module")
def untied_onnx(untied_run, tmp_path_factory) -> tuple[ExportSource, Path]:
    source = load_export_source(untied_run)
    out_path = tmp_path_factory.mktemp("onnx") / "untied.onnx"
    return source, write_onnx(source, out_path, training_metadata(source))


def prompt_ids(source: ExportSource, text: str) -> np.ndarray:
    """(1, T): Helox reads every text after an EOS."""
    return np.array([[source.eos_id, *source.tokenizer.encode(text).ids]], dtype=np.int64)


def helox_logits(source: ExportSource, input_ids_BT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return source.model(torch.from_numpy(input_ids_BT)).numpy()


def agreement(reference_BTV: np.ndarray, candidate_BTV: np.ndarray) -> dict[str, float]:
    """helox parity's figures over every row of a batch (no perplexity: no ids)."""
    return parity_figures(list(reference_BTV), list(candidate_BTV))


TINY_FP32 = {"max_abs_logit": 5e-6, "mean_kl": 5e-14, "top1_agreement": 1.0}
"""onnxruntime against Helox on the tiny models, at about 3× the worst measured over these
tests (max |Δlogit| 1.7e-6, mean KL 1.5e-14, top-1 1.0; no perplexity without the ids): the
production fp32 limits (1e-3, 1e-8, 0.99) would pass a graph hundreds of times worse."""


def assert_parity(figures: dict[str, float]) -> None:
    assert not threshold_failures(figures, THRESHOLDS["fp32"]), figures
    assert not threshold_failures(figures, TINY_FP32), figures


@pytest.mark.parametrize("exported", ["tied_onnx", "untied_onnx"])
def test_onnxruntime_matches_helox_fp32(exported, request):
    source, path = request.getfixturevalue(exported)
    runner = OnnxRunner(path)
    for text in PROMPTS:
        input_ids_BT = prompt_ids(source, text)
        assert_parity(agreement(helox_logits(source, input_ids_BT),
                                runner.logits(input_ids_BT)))


def test_graph_has_fixed_opset_and_dynamic_axes(tied_onnx):
    _, path = tied_onnx
    model = onnx.load(str(path))
    assert {op.domain: op.version for op in model.opset_import}[""] == OPSET
    dims = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in [*model.graph.input, *model.graph.output]}
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "sequence"]
    assert dims["logits"] == ["batch", "sequence", 512]
    assert not list(path.parent.glob("*.data"))  # a tiny model is one file


@pytest.mark.parametrize("batch,sequence", [(1, 1), (3, 7), (1, None), (3, None)])
def test_one_file_serves_every_batch_and_sequence_length(tied_onnx, batch, sequence):
    source, path = tied_onnx
    sequence = sequence or source.config.model.max_seq_len
    input_ids_BT = np.random.default_rng(batch * 1000 + sequence).integers(
        0, source.config.model.vocab_size, (batch, sequence))
    logits_BTV = onnx_logits(path, input_ids_BT)
    assert logits_BTV.shape == (batch, sequence, source.config.model.vocab_size)
    assert_parity(agreement(helox_logits(source, input_ids_BT), logits_BTV))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_match_each_row_run_alone(tied_onnx, side):
    source, path = tied_onnx
    rows = [prompt_ids(source, text)[0] for text in PROMPTS]
    T = max(len(row) for row in rows)
    input_ids_BT = np.zeros((len(rows), T), dtype=np.int64)
    attention_mask_BT = np.zeros_like(input_ids_BT)
    real = [slice(0, len(row)) if side == "right" else slice(T - len(row), T) for row in rows]
    for b, (row, positions) in enumerate(zip(rows, real)):
        input_ids_BT[b, positions], attention_mask_BT[b, positions] = row, 1
    logits_BTV = OnnxRunner(path).logits(input_ids_BT, attention_mask_BT)
    assert np.isfinite(logits_BTV).all()  # padded positions too: they attend to padding
    for b, (row, positions) in enumerate(zip(rows, real)):
        alone_1TV = helox_logits(source, row[None])
        assert_parity(agreement(alone_1TV, logits_BTV[b, positions][None]))


def test_runner_refuses_sequences_longer_than_the_model(tied_onnx):
    source, path = tied_onnx
    too_long = np.zeros((1, source.config.model.max_seq_len + 1), dtype=np.int64)
    with pytest.raises(HeloxError, match="exceed the model's max_seq_len"):
        OnnxRunner(path).logits(too_long)


def test_metadata_props_round_trip(tied_onnx):
    source, path = tied_onnx
    assert onnx_metadata(path) == training_metadata(source)
    model = onnx.load(str(path), load_external_data=False)
    assert (model.producer_name, model.graph.name) == ("helox", source.name)
    props = {prop.key: prop.value for prop in model.metadata_props}
    assert props[MAX_SEQ_LEN_KEY] == str(source.config.model.max_seq_len)


def test_weights_fingerprint_changes_with_one_initializer_byte(tied_onnx, tmp_path):
    _, path = tied_onnx
    model = onnx.load(str(path))
    resaved, modified = tmp_path / "resaved.onnx", tmp_path / "modified.onnx"
    onnx.save(model, str(resaved))
    largest = max(model.graph.initializer, key=lambda tensor: np.prod(tensor.dims))
    array = numpy_helper.to_array(largest).copy()
    array.view(np.uint8).reshape(-1)[17] ^= 1
    largest.CopyFrom(numpy_helper.from_array(array, largest.name))
    onnx.save(model, str(modified))
    original = weights_fingerprint(onnx_stored_tensors(path))
    assert weights_fingerprint(onnx_stored_tensors(resaved)) == original
    assert weights_fingerprint(onnx_stored_tensors(modified)) != original


def test_export_failure_is_a_clear_error_and_writes_nothing(export_run, tmp_path,
                                                            monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no ONNX translation for aten::mystery_op")

    monkeypatch.setattr(torch.onnx, "export", fail)
    source = load_export_source(export_run)
    out_path = tmp_path / "model.onnx"
    with pytest.raises(HeloxError, match="torch.onnx.export failed.*mystery_op") as caught:
        write_onnx(source, out_path, training_metadata(source))
    assert "onnxscript" in caught.value.hint
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_says_how_to_install(tied_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes the import fail
    with pytest.raises(HeloxError, match="onnxruntime is not installed") as caught:
        OnnxRunner(tied_onnx[1])
    assert caught.value.hint == "pip install onnxruntime"


def test_tensorrt_engine_without_tensorrt_is_a_clear_error(tied_onnx, tmp_path, monkeypatch):
    """Where TensorRT is installed too: its module and trtexec are hidden from the test."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes the import fail
    monkeypatch.setenv("PATH", str(tmp_path / "no-trtexec"))
    with pytest.raises(HeloxError, match=r"TensorRT is not installed .*pip install tensorrt"):
        build_tensorrt_engine(tied_onnx[1], tmp_path / "model.engine")
    assert list(tmp_path.iterdir()) == []
    # helox export --format tensorrt says so before exporting anything.
    from typer.testing import CliRunner

    from helox.cli import app

    result = CliRunner().invoke(app, ["export", str(tied_onnx[0].checkpoint), "--format",
                                      "tensorrt", "--out", str(tmp_path / "model.engine")])
    assert result.exit_code == 1 and "TensorRT is not installed" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_tensorrt_engine_matches_helox(tied_onnx, tmp_path):
    pytest.importorskip("tensorrt", reason=NO_TENSORRT)  # allowed under strict skips
    source, path = tied_onnx
    engine = build_tensorrt_engine(path, tmp_path / "model.engine", max_batch_size=4)
    runner = TensorRTRunner(engine)
    for text in PROMPTS:
        input_ids_BT = prompt_ids(source, text)
        figures = agreement(helox_logits(source, input_ids_BT), runner.logits(input_ids_BT))
        # fp16 kernels: ~1e-2 on logits of size ~4, not fp32 parity.
        assert figures["max_abs_logit"] < 0.1 and figures["top1_agreement"] >= 0.9, figures
