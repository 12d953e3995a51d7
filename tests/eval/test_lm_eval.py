"""lm-evaluation-harness interop: the "helox" model class on the repo's local tasks, checked
against a direct computation with LanguageModel and against lm-eval's own `hf` model (HFLM)
on a transformers export of the same weights (tier 3: fp32 parity)."""

import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console

from helox.errors import HeloxError
from helox.eval.lm import load_language_model
from helox.model.hf import to_hf_config, to_hf_state_dict
from helox.testing.tiny import tiny_config
from helox.checkpoint import load_trained_model
from helox.training.loop import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable: fail fast, never wait
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[hf]')")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs lm-eval[hf] (accelerate)")
transformers = pytest.importorskip("transformers", reason="the HF export needs transformers")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from helox.eval.lm_eval_adapter import (HeloxLM, run_lm_eval,  # noqa: E402
                                        task_manager)
from helox.resources import lm_eval_tasks_dir  # noqa: E402

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, workspace, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm-eval-run")
    train(tiny_config(workspace), path, tiny_dataset, console=Console(quiet=True))
    return path


@pytest.fixture(scope="module")
def lm(run_dir):
    return load_language_model(run_dir)


@pytest.fixture(scope="module")
def hf_dir(lm, tmp_path_factory):
    """The checkpoint `lm` was loaded from as a transformers Llama folder. Its tokenizer names
    the end-of-document token as BOS too, so HFLM's `add_bos_token` puts it first, as Helox
    does."""
    checkpoint = Path(lm.source)
    trained = load_trained_model(checkpoint)
    model, tokenizer = trained.model, trained.tokenizer
    eos_id = tokenizer.token_to_id(EOS)
    hf = transformers.LlamaForCausalLM(to_hf_config(model.cfg, bos_token_id=eos_id,
                                                    eos_token_id=eos_id))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg),
                                             strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    folder = tmp_path_factory.mktemp("lm-eval-hf")
    hf.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint / "tokenizer.json"), bos_token=EOS, eos_token=EOS,
    ).save_pretrained(folder)
    return folder


def hflm(hf_dir, add_bos_token: bool) -> HFLM:
    return HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=8,
                add_bos_token=add_bos_token)


def run_lm_eval_hf(model: HFLM, tasks: list[str]) -> dict:
    return simple_evaluate(model=model, tasks=tasks, task_manager=task_manager(tasks),
                           log_samples=True, bootstrap_iters=0)


def per_choice_logprobs(results: dict, task: str) -> list[list[float]]:
    """Each item's log-likelihood per choice (or its one rolling log-likelihood)."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] if isinstance(r, (tuple, list)) else r for r in s["filtered_resps"]]
            for s in samples]


def assert_close(actual: list[list[float]], expected: list[list[float]], atol: float):
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def read_items() -> list[dict]:
    with open(lm_eval_tasks_dir() / "cloze.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_cloze_accuracy_equals_a_direct_computation(run_dir, lm):
    """lm-eval's acc over the local task (the model named "helox", built from a run folder
    by lm-eval itself) is the argmax of LanguageModel.loglikelihood over each item's
    choices, the context read as a document (EOS first), the choice after a space."""
    results = simple_evaluate(model="helox", model_args=f"pretrained={run_dir},batch_size=4",
                              tasks=["helox_cloze"], task_manager=task_manager(["helox_cloze"]),
                              log_samples=True, bootstrap_iters=0)
    items = read_items()
    scored = lm.loglikelihood([(lm.document(item["context"]), lm.encode(" " + choice))
                               for item in items for choice in item["choices"]])
    direct, start = [], 0
    for item in items:
        direct.append([s.logprob for s in scored[start:start + len(item["choices"])]])
        start += len(item["choices"])
    correct = [max(range(len(row)), key=row.__getitem__) == item["label"]
               for row, item in zip(direct, items)]

    assert results["results"]["helox_cloze"]["acc,none"] == pytest.approx(
        sum(correct) / len(items), abs=1e-12)
    assert_close(per_choice_logprobs(results, "helox_cloze"), direct, atol=1e-5)
    assert results["config"]["model_version"] == lm.version


def test_empty_context_reads_the_text_as_a_document(lm):
    text = "In the beginning God created the heaven and the earth."
    request = Instance("loglikelihood", {}, ("", text), 0)
    (logprob, _), = HeloxLM(lm).loglikelihood([request])
    assert logprob == pytest.approx(float(lm.token_logprobs([lm.document(text)])[0].sum()),
                                    abs=1e-4)


def test_cloze_matches_lm_evals_hf_model_on_the_export(run_dir, lm, hf_dir):
    """Same items, same token split (lm-eval's), same weights: HFLM with add_bos_token reads
    a context EOS-first as Helox does, and every log-likelihood agrees."""
    ours = run_lm_eval(lm, ["helox_cloze"], log_samples=True)
    theirs = run_lm_eval_hf(hflm(hf_dir, add_bos_token=True), ["helox_cloze"])
    assert_close(per_choice_logprobs(ours, "helox_cloze"),
                 per_choice_logprobs(theirs, "helox_cloze"), atol=1e-4)
    assert ours["results"]["helox_cloze"]["acc,none"] == \
        theirs["results"]["helox_cloze"]["acc,none"]


def test_passage_perplexity_matches_lm_evals_hf_model(lm, hf_dir):
    """Rolling windows over passages longer than the tiny model's 64 tokens: EOS, then the
    text. HFLM reads it so without add_bos_token (with it, a second EOS would be scored)."""
    ours = run_lm_eval(lm, ["helox_passages"], log_samples=True)
    theirs = run_lm_eval_hf(hflm(hf_dir, add_bos_token=False), ["helox_passages"])
    assert_close(per_choice_logprobs(ours, "helox_passages"),
                 per_choice_logprobs(theirs, "helox_passages"), atol=1e-4)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["helox_passages"][metric] == pytest.approx(
            theirs["results"]["helox_passages"][metric], rel=1e-5)


def test_generate_until_matches_greedy_and_hf(lm, hf_dir):
    contexts = ["And God said", "ROMEO.\n", "Return the"]
    settings = {"until": [","], "max_gen_toks": 12}
    requests = [Instance("generate_until", {}, (c, dict(settings)), i)
                for i, c in enumerate(contexts)]
    ours = HeloxLM(lm).generate_until(requests)
    expected = lm.greedy([lm.document(c) for c in contexts], 12, stop=[","])
    theirs = hflm(hf_dir, add_bos_token=True).generate_until(requests)
    assert ours == expected == theirs
    assert any(ours)  # something was generated, so the comparison says something


def test_sampling_and_auto_batch_size_are_refused(lm):
    request = Instance("generate_until", {}, ("In the", {"do_sample": True,
                                                          "temperature": 0.7}), 0)
    with pytest.raises(HeloxError, match="greedily"):
        HeloxLM(lm).generate_until([request])
    too_long = Instance("generate_until", {}, ("In the", {"max_gen_toks": 64}), 0)
    with pytest.raises(HeloxError, match="no room"):
        HeloxLM(lm).generate_until([too_long])
    with pytest.raises(HeloxError, match="batch_size"):
        HeloxLM("unused", batch_size="auto")
