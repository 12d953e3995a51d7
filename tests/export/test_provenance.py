"""Fingerprints, embedded metadata and signed manifests: `helox provenance verify` passes an
untouched export and names what is wrong with a tampered one."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helox.cli import app
from helox.export.exporter import export_model
from helox.export.manifest import (FOLDER_MANIFEST, generate_key, manifest_path,
                                   verify_artifact)
from helox.checkpoint.fingerprint import (StoredTensor, model_fingerprint, torch_stored,
                                         weights_fingerprint)
from helox.export.source import load_export_source


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {name: (folder / f"{name}.pem", generate_key(folder / f"{name}.pem"))
            for name in ("ours", "theirs")}


@pytest.fixture(scope="module")
def pristine(export_run, keys, tmp_path_factory):
    """A signed Hugging Face export: writing it needs transformers (its config and tokenizer
    classes), so the tests on it skip without; the ONNX, GGUF and key tests do not."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("provenance") / "hf"
    return export_model(export_run, "hf", out, key=keys["ours"][0]).artifact


@pytest.fixture
def copy(pristine, tmp_path):
    """A copy of the export to tamper with."""
    return shutil.copytree(pristine, tmp_path / "hf")


def failed(result) -> dict[str, str]:
    return {check.name: check.detail for check in result.failures()}


def test_fingerprint_covers_name_type_shape_and_every_byte():
    base = [StoredTensor("a", "F32", (2,), b"\0" * 8), StoredTensor("b", "F16", (1,), b"\1\2")]
    fingerprint = weights_fingerprint(base)
    assert weights_fingerprint(list(reversed(base))) == fingerprint  # order-independent
    variants = [
        [StoredTensor("a", "F32", (2,), b"\0" * 7 + b"\1"), base[1]],
        [StoredTensor("a", "I32", (2,), b"\0" * 8), base[1]],
        [StoredTensor("a", "F32", (1, 2), b"\0" * 8), base[1]],
        [StoredTensor("c", "F32", (2,), b"\0" * 8), base[1]],
        base[:1],
        [*base, StoredTensor("z", "F32", (0,), b"")],
    ]
    assert len({weights_fingerprint(v) for v in variants} | {fingerprint}) == len(variants) + 1


def test_model_fingerprint_is_the_fp32_weights_by_helox_name(export_run):
    source = load_export_source(export_run)
    model = source.model
    assert model_fingerprint(model) == model_fingerprint(model)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["embed.weight"].data_ptr()  # tied
    expected = weights_fingerprint(torch_stored(name, tensor) for name, tensor in state.items()
                                   if name != "lm_head.weight")
    assert model_fingerprint(model) == expected
    with torch.no_grad():
        model.norm.weight[0] += 1e-3
    assert model_fingerprint(model) != expected


def test_an_untouched_export_verifies(pristine, keys):
    result = verify_artifact(pristine, keys["ours"][1])
    assert result.passed, result.failures()
    assert [c.name for c in result.checks] == ["signature", "files", "weights fingerprint",
                                               "metadata", "model fingerprint"]
    assert "by the trusted key" in result.checks[0].detail
    without_key = verify_artifact(pristine / FOLDER_MANIFEST)
    assert without_key.passed and "pass --public-key" in without_key.checks[0].detail


def flip_a_weight_byte(weights):
    data = bytearray(weights.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 100] ^= 0x01  # inside the first tensor's bytes
    weights.write_bytes(bytes(data))


def test_a_flipped_weight_byte_fails_naming_the_fingerprint(copy, keys):
    flip_a_weight_byte(copy / "model.safetensors")
    result = verify_artifact(copy, keys["ours"][1])
    problems = failed(result)
    assert set(problems) == {"files", "weights fingerprint", "model fingerprint"}
    assert "weights fingerprint mismatch" in problems["weights fingerprint"]
    assert "model.safetensors changed" in problems["files"]
    assert "signature" not in problems and "metadata" not in problems

    cli = CliRunner().invoke(app, ["provenance", "verify", str(copy)])
    assert cli.exit_code == 1
    assert "weights fingerprint mismatch" in cli.output


def test_a_tampered_manifest_fails_the_signature(copy, keys):
    path = manifest_path(copy)
    manifest = json.loads(path.read_text())
    manifest["metadata"]["helox.dataset_version"] = "0123456789abcdef"
    path.write_text(json.dumps(manifest))
    problems = failed(verify_artifact(copy, keys["ours"][1]))
    assert "edited after signing" in problems["signature"]
    assert "helox.dataset_version" in problems["metadata"]


def test_another_signers_key_is_refused(pristine, keys):
    problems = failed(verify_artifact(pristine, keys["theirs"][1]))
    assert set(problems) == {"signature"}
    assert "not by the trusted key" in problems["signature"]


def test_added_or_missing_files_are_named(copy, keys):
    (copy / "extra.bin").write_bytes(b"x")
    (copy / "README.md").unlink()
    problems = failed(verify_artifact(copy, keys["ours"][1]))
    assert set(problems) == {"files"}
    assert "README.md is missing" in problems["files"]
    assert "extra.bin is not in the manifest" in problems["files"]


def test_metadata_rewritten_in_the_weights_file_is_caught(copy, keys):
    from safetensors.torch import load_file, save_file

    from helox.export.provenance import safetensors_metadata

    weights = copy / "model.safetensors"
    metadata = {"format": "pt", **safetensors_metadata(weights),
                "helox.parent_model": "a model it never came from"}
    save_file(load_file(str(weights)), str(weights), metadata=metadata)
    problems = failed(verify_artifact(copy, keys["ours"][1]))
    assert set(problems) == {"files", "metadata"}  # the tensors, and so both fingerprints, hold
    assert "helox.parent_model" in problems["metadata"]


def test_keygen_never_overwrites(tmp_path):
    runner = CliRunner()
    key = tmp_path / "k.pem"
    assert runner.invoke(app, ["provenance", "keygen", "--out", str(key)]).exit_code == 0
    assert key.stat().st_mode & 0o777 == 0o600 and key.with_name("k.pem.pub").is_file()
    again = runner.invoke(app, ["provenance", "keygen", "--out", str(key)])
    assert again.exit_code != 0


def assert_a_flipped_byte_of_is_named(artifact, tensor_bytes: bytes, public_key):
    """Flip one bit in the middle of a tensor's bytes inside the file: the file hash and the
    weights fingerprint fail, and the failure names the fingerprint."""
    data = bytearray(artifact.read_bytes())
    start = data.find(tensor_bytes)
    assert start >= 0, "the tensor's bytes are not in the file as stored"
    data[start + len(tensor_bytes) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    problems = failed(verify_artifact(artifact, public_key))
    assert set(problems) == {"files", "weights fingerprint"}
    assert "weights fingerprint mismatch" in problems["weights fingerprint"]


def test_onnx_export_verifies_and_a_flipped_initializer_byte_is_named(export_run, keys,
                                                                      tmp_path):
    onnx = pytest.importorskip("onnx")
    exported = export_model(export_run, "onnx", tmp_path / "model.onnx", key=keys["ours"][0])
    assert exported.manifest.name == "model.onnx.manifest.json"
    assert verify_artifact(exported.artifact, keys["ours"][1]).passed
    model = onnx.load(str(exported.artifact))
    largest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    assert_a_flipped_byte_of_is_named(exported.artifact, largest.raw_data, keys["ours"][1])


def test_gguf_export_verifies_and_a_flipped_block_byte_is_named(export_run, keys, tmp_path):
    pytest.importorskip("gguf")
    from helox.export.gguf import gguf_metadata, gguf_stored_tensors

    exported = export_model(export_run, "gguf", tmp_path / "model.gguf", gguf_type="Q8_0",
                            key=keys["ours"][0])
    assert verify_artifact(exported.artifact, keys["ours"][1]).passed
    assert gguf_metadata(exported.artifact) == exported.metadata
    quantized = next(t for t in gguf_stored_tensors(exported.artifact) if t.dtype == "Q8_0")
    assert_a_flipped_byte_of_is_named(exported.artifact, bytes(quantized.data),
                                      keys["ours"][1])


def test_the_first_export_creates_the_default_signing_key(export_run, tmp_path, monkeypatch):
    pytest.importorskip("transformers")  # the first export is a Hugging Face folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HELOX_SIGNING_KEY", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(export_run), "--format", "hf", "--out",
                                 str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    key = tmp_path / "home" / ".config" / "helox" / "signing-key.pem"
    assert "created signing key" in result.output and key.stat().st_mode & 0o777 == 0o600
    verified = runner.invoke(app, ["provenance", "verify", str(tmp_path / "hf"),
                                   "--public-key", f"{key}.pub"])
    assert verified.exit_code == 0, verified.output
    again = runner.invoke(app, ["export", str(export_run), "--format", "onnx", "--out",
                                str(tmp_path / "model.onnx")])
    assert again.exit_code == 0 and "created signing key" not in again.output
    assert verify_artifact(tmp_path / "model.onnx", Path(f"{key}.pub")).passed
