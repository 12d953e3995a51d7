"""Signed manifests of exported artifacts, and their verification.

A manifest lists every file of the artifact with its sha256, the fingerprint of the weights as
the artifact stores them, and the training metadata embedded in it; it is signed with Ed25519.
`verify_artifact` checks, each as a separate line of the report: the signature (and, with a
trusted public key, who signed), every file's hash, the weights fingerprint recomputed from the
artifact's tensors, the embedded metadata against the manifest's, and for full-precision
Hugging Face weights the model fingerprint recomputed under Helox's names.

The manifest of a folder artifact is `FOLDER/helox-manifest.json`; of a file artifact it sits
beside it: `model.gguf` → `model.gguf.manifest.json`."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from helox.errors import HeloxError
from helox.export.onnx import onnx_metadata, onnx_stored_tensors
from helox.checkpoint.fingerprint import StoredTensor, weights_fingerprint
from helox.export.provenance import (METADATA_PREFIX, model_fingerprint_of_hf,
                                     safetensors_metadata, safetensors_stored_tensors)
from helox.fileio import sha256_file, write_private

FOLDER_MANIFEST = "helox-manifest.json"
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1
DEFAULT_KEY = Path("~/.config/helox/signing-key.pem")


# ---------------------------------------------------------------------------------------------
# Formats: where the weights are and how to read them back


@dataclass(frozen=True)
class ArtifactFormat:
    name: str
    weights_file: Callable[[Path], Path]
    stored_tensors: Callable[[Path], list[StoredTensor]] | None
    """Reads the weights back as stored; None for an opaque artifact."""
    metadata: Callable[[Path], dict[str, str]] | None


def _gguf_tensors(path: Path) -> list[StoredTensor]:
    from helox.export.gguf import gguf_stored_tensors  # optional extra: gguf

    return gguf_stored_tensors(path)


def _gguf_metadata(path: Path) -> dict[str, str]:
    from helox.export.gguf import gguf_metadata  # optional extra: gguf

    return gguf_metadata(path)


def _onnx_tensors(path: Path) -> list[StoredTensor]:
    return onnx_stored_tensors(path)


def _onnx_metadata(path: Path) -> dict[str, str]:
    return onnx_metadata(path)


FORMATS = {
    "hf": ArtifactFormat("hf", lambda folder: folder / "model.safetensors",
                         safetensors_stored_tensors, safetensors_metadata),
    "gguf": ArtifactFormat("gguf", lambda file: file, _gguf_tensors, _gguf_metadata),
    "onnx": ArtifactFormat("onnx", lambda file: file, _onnx_tensors, _onnx_metadata),
    "peft": ArtifactFormat("peft", lambda folder: folder / "adapter_model.safetensors",
                           safetensors_stored_tensors, safetensors_metadata),
    # An engine is opaque (its weights are fused into kernels): the manifest covers its bytes.
    "tensorrt": ArtifactFormat("tensorrt", lambda file: file, None, None),
}


def manifest_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    if artifact.name.endswith(MANIFEST_SUFFIX) or artifact.name == FOLDER_MANIFEST:
        return artifact
    if artifact.is_dir():
        return artifact / FOLDER_MANIFEST
    return artifact.with_name(artifact.name + MANIFEST_SUFFIX)


def artifact_of(manifest: Path) -> Path:
    if manifest.name == FOLDER_MANIFEST:
        return manifest.parent
    return manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX))


def artifact_files(artifact: Path) -> dict[str, str]:
    """sha256 of every file of the artifact, by path relative to it (the manifest excluded)."""
    if artifact.is_file():
        return {artifact.name: sha256_file(artifact)}
    return {str(path.relative_to(artifact)): sha256_file(path)
            for path in sorted(artifact.rglob("*"))
            if path.is_file() and path.name != FOLDER_MANIFEST}


# ---------------------------------------------------------------------------------------------
# Keys


def generate_key(path: Path) -> Path:
    """A new Ed25519 private key (PEM, mode 0600) at `path` and its public key at
    `path`.pub; returns the public key's path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path = write_private(path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), "key")
    public = public_key_path(path)
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def public_key_path(private_key: Path) -> Path:
    return Path(private_key).with_name(Path(private_key).name + ".pub")


def load_private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path).expanduser()
    if not path.is_file():
        raise HeloxError(f"signing key {path} does not exist",
                         hint="create one with `helox provenance keygen --out PATH`")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise HeloxError(f"{path} is not an Ed25519 private key",
                         hint="create one with `helox provenance keygen --out PATH`")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path).expanduser()
    if not path.is_file():
        raise HeloxError(f"public key {path} does not exist",
                         hint="pass the signer's .pub file (written by helox provenance keygen)")
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise HeloxError(f"{path} is not an Ed25519 public key")
    return key


def raw_public_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(raw: bytes) -> str:
    """What names a key in messages: the first 16 hex digits of sha256 of its raw bytes."""
    return hashlib.sha256(raw).hexdigest()[:16]


def signing_key(path: Path | None, announce: Callable[[str], None]):
    """The key to sign with: `path`, else $HELOX_SIGNING_KEY, else the default one, created
    on first use (announced, with where its public half is)."""
    chosen = Path(path or os.environ.get("HELOX_SIGNING_KEY") or DEFAULT_KEY).expanduser()
    if path is None and not chosen.exists():
        public = generate_key(chosen)
        announce(f"created signing key {chosen}; verifiers need its public key {public}")
    return load_private_key(chosen)


# ---------------------------------------------------------------------------------------------
# Writing


def canonical_bytes(manifest: dict) -> bytes:
    body = {key: value for key, value in manifest.items() if key != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_manifest(artifact: Path, format_name: str, metadata: dict[str, str],
                   private_key, details: dict | None = None) -> Path:
    """Hash the artifact, fingerprint its stored weights, sign, write the manifest."""
    artifact = Path(artifact)
    fmt = FORMATS[format_name]
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": format_name,
        "artifact": artifact.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": artifact_files(artifact),
        "weights_fingerprint": weights_fingerprint(fmt.stored_tensors(fmt.weights_file(
            artifact))) if fmt.stored_tensors else None,
        "metadata": dict(sorted(metadata.items())),
        **({"details": details} if details else {}),
    }
    raw = raw_public_key(private_key.public_key())
    manifest["signature"] = {
        "algorithm": "ed25519", "public_key": base64.b64encode(raw).decode(),
        "key_id": key_id(raw),
        "value": base64.b64encode(private_key.sign(canonical_bytes(manifest))).decode()}
    path = manifest_path(artifact)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Verifying


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Verification:
    artifact: Path
    manifest: Path
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]


def read_manifest(artifact: Path) -> tuple[Path, dict]:
    path = manifest_path(artifact)
    if not path.is_file():
        raise HeloxError(f"{artifact}: no manifest at {path}",
                         hint="verify an artifact written by `helox export` (it writes the "
                              "manifest beside a file, or inside a folder)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HeloxError(f"{path}: not JSON ({exc})",
                         hint="the manifest was damaged; export again") from None
    if manifest.get("format") not in FORMATS:
        raise HeloxError(f"{path}: unknown format {manifest.get('format')!r}",
                         hint=f"formats: {', '.join(FORMATS)}")
    return path, manifest


def verify_artifact(artifact: Path, public_key: Path | None = None) -> Verification:
    manifest_file, manifest = read_manifest(Path(artifact))
    artifact = artifact_of(manifest_file)
    fmt = FORMATS[manifest["format"]]
    checks = [check_signature(manifest, public_key), *check_files(artifact, manifest)]
    weights = fmt.weights_file(artifact)
    if weights.is_file() and fmt.stored_tensors is not None:
        checks.append(check_fingerprint(fmt, weights, manifest))
        checks.append(check_metadata(fmt, weights, manifest))
        if manifest["format"] == "hf":
            checks.append(check_model_fingerprint(weights, manifest))
    return Verification(artifact, manifest_file, checks)


def check_signature(manifest: dict, public_key: Path | None) -> Check:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signature = manifest.get("signature") or {}
    try:
        raw = base64.b64decode(signature["public_key"])
        value = base64.b64decode(signature["value"])
    except (KeyError, ValueError, TypeError):
        return Check("signature", False, "the manifest carries no readable signature")
    if public_key is not None:
        trusted = raw_public_key(load_public_key(public_key))
        if trusted != raw:
            return Check("signature", False, f"signed by key {key_id(raw)}, not by the trusted "
                                             f"key {key_id(trusted)} ({public_key})")
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(value, canonical_bytes(manifest))
    except InvalidSignature:
        return Check("signature", False, "the signature does not match the manifest: it was "
                                         "edited after signing")
    who = "the trusted key" if public_key is not None else \
        "the key in the manifest (pass --public-key to check who signed)"
    return Check("signature", True, f"ed25519, key {key_id(raw)}, by {who}")


def check_files(artifact: Path, manifest: dict) -> list[Check]:
    if not artifact.exists():
        return [Check("files", False, f"{artifact} does not exist")]
    expected: dict[str, str] = manifest.get("files", {})
    found = artifact_files(artifact)
    problems = [f"{name} is missing" for name in expected if name not in found]
    problems += [f"{name} changed (sha256 {found[name][:12]}…, manifest "
                 f"{digest[:12]}…)" for name, digest in expected.items()
                 if name in found and found[name] != digest]
    problems += [f"{name} is not in the manifest" for name in found if name not in expected]
    if problems:
        return [Check("files", False, "; ".join(problems))]
    return [Check("files", True, f"{len(expected)} file(s) match their sha256")]


def check_fingerprint(fmt: ArtifactFormat, weights: Path, manifest: dict) -> Check:
    try:
        found = weights_fingerprint(fmt.stored_tensors(weights))
    except Exception as exc:  # a damaged file may fail to parse in any of three libraries
        return Check("weights fingerprint", False, f"the weights cannot be read ({exc})")
    expected = manifest.get("weights_fingerprint", "")
    if found != expected:
        return Check("weights fingerprint", False,
                     f"weights fingerprint mismatch: {found[:16]}… recomputed from "
                     f"{weights.name}, {expected[:16]}… in the manifest: the weights changed "
                     "after export")
    return Check("weights fingerprint", True, f"{found[:16]}… recomputed from {weights.name}")


def check_metadata(fmt: ArtifactFormat, weights: Path, manifest: dict) -> Check:
    try:
        embedded = fmt.metadata(weights)
    except Exception as exc:  # see check_fingerprint
        return Check("metadata", False, f"the embedded metadata cannot be read ({exc})")
    expected = manifest.get("metadata", {})
    differing = sorted(key for key in {*embedded, *expected}
                       if embedded.get(key) != expected.get(key))
    if differing:
        shown = ", ".join(f"{key}: {embedded.get(key)!r} embedded, {expected.get(key)!r} in "
                          "the manifest" for key in differing[:3])
        return Check("metadata", False, f"{len(differing)} key(s) differ: {shown}")
    return Check("metadata", True, f"{len(expected)} {METADATA_PREFIX}* keys embedded in "
                                   f"{weights.name} match")


def check_model_fingerprint(weights: Path, manifest: dict) -> Check:
    """fp32 Hugging Face weights renamed to Helox's names must give the model fingerprint the
    training checkpoint had: the artifact holds exactly the trained model."""
    expected = manifest.get("metadata", {}).get(METADATA_PREFIX + "model_fingerprint", "")
    try:
        found = model_fingerprint_of_hf(weights)
    except Exception as exc:  # see check_fingerprint
        return Check("model fingerprint", False, f"cannot be recomputed ({exc})")
    if found != expected:
        return Check("model fingerprint", False,
                     f"model fingerprint mismatch: {found[:16]}… recomputed, {expected[:16]}… "
                     "recorded at training")
    return Check("model fingerprint", True, f"{found[:16]}… equals the trained model's")
