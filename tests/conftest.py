import pytest
import torch

from helox.data.prepare import prepare_dataset
from helox.testing.tiny import tiny_config, tiny_mixed_config


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
