"""A chat dataset: conversations (and prompt/completion pairs) cleaned per message, rendered,
masked and packed whole into rows; the loader's targets skip what is not trained."""

import json

import numpy as np
import pytest
import torch

from helox.chat.messages import Conversation
from helox.chat.templates import ChatTemplate
from helox.chat.tooluse import tool_use_set
from helox.data.loader import IGNORE_INDEX, fixed_sequences
from helox.data.prepare import prepare_dataset
from helox.errors import HeloxError
from helox.testing.tiny import tiny_config
from helox.training.step import trained_targets

ROW_TOKENS = 1024


def chat_config(workspace, tokenizer_json, train, val=None, overrides=()):
    return tiny_config(workspace, [
        "data.name=chat", f"data.train=[{{path: {train}, format: chat}}]",
        f"data.val=[{{path: {val}, format: chat}}]" if val else "data.val=[]",
        "data.chat.template=chatml", "data.pipeline=[{step: pii}, {step: exact_dedup}]",
        f"tokenizer.path={tokenizer_json}", "train.eval_every_steps=0",
        f"train.seq_len={ROW_TOKENS}", f"model.max_seq_len={ROW_TOKENS}", *overrides])


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2):
    folder = tmp_path_factory.mktemp("chat-data")
    tokenizer_json = folder / "tokenizer.json"
    smollm2[1].save(str(tokenizer_json))
    conversations = [c.model_dump(exclude_none=True) for c in tool_use_set(12, seed=3)]
    conversations[0]["messages"][1]["content"] = "Mail the answer to ana@example.com please."
    records = [*conversations, conversations[2],  # an exact duplicate
               "{not json", {"messages": [{"role": "user"}]},  # two bad lines
               {"prompt": "Say hi.", "completion": "Hi!"},
               {"messages": [{"role": "user", "content": "word " * 1200},
                             {"role": "assistant", "content": "Too long."}]}]
    train = write_jsonl(folder / "train.jsonl", records)
    val = write_jsonl(folder / "val.jsonl",
                      [c.model_dump(exclude_none=True) for c in tool_use_set(4, seed=99)])
    return tokenizer_json, train, val, conversations


@pytest.fixture(scope="module")
def dataset(files, tmp_path_factory):
    tokenizer_json, train, val, _ = files
    return prepare_dataset(chat_config(tmp_path_factory.mktemp("ws"), tokenizer_json, train,
                                       val))


def test_the_version_knows_its_template_and_counts_what_it_dropped(dataset):
    chat = dataset.chat
    assert (chat["template"], chat["train_on"], chat["row_tokens"]) == (
        "chatml", "assistant", ROW_TOKENS)
    assert ChatTemplate.from_file(dataset.path / chat["template_file"]).source == \
        ChatTemplate.builtin("chatml").source
    train = chat["splits"]["train"]["default"]
    assert train["conversations"] == 14 and train["truncated"] == 1  # 12 + pair + long one
    read, pii, dedup = dataset.report["splits"]["train"]
    assert read["dropped"] == {"malformed_json": 1, "not_a_conversation": 1}
    assert pii["changed"] == {"email": 1} and dedup["dropped"] == {"exact_duplicate": 1}
    assert dataset.verify() == []
    template_file = dataset.path / chat["template_file"]
    saved = template_file.read_bytes()
    template_file.write_text("{}")
    assert dataset.verify() == [chat["template_file"]]
    template_file.write_bytes(saved)
    assert dataset.verify() == []


def decode(tokenizer, ids):
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def test_rows_hold_whole_conversations_and_train_only_assistant_turns(dataset, files, smollm2):
    tokenizer = smollm2[1]
    batch = fixed_sequences(dataset, "train", ROW_TOKENS, 100, document_masking=True)["default"]
    inputs, targets = batch.inputs, batch.targets
    eos = dataset.eos_id
    texts = [decode(tokenizer, row[row != eos]) for row in inputs]
    # Every conversation starts at a row start or right after an end-of-document token and
    # ends before the row does: no rendered conversation is cut across rows.
    for row in inputs:
        starts = np.flatnonzero(row.numpy() == eos)
        pieces = np.split(row.numpy(), starts + 1)
        for piece in pieces:
            piece = piece[piece != eos]
            if len(piece):
                assert decode(tokenizer, piece).startswith("<|im_start|>")
                assert decode(tokenizer, piece).rstrip().endswith("<|im_end|>") or \
                    len(piece) == ROW_TOKENS - 1  # the truncated one
    trained = "".join(decode(tokenizer, targets[r][targets[r] != IGNORE_INDEX])
                      for r in range(len(targets)))
    _, _, _, conversations = files
    first = Conversation.model_validate(conversations[0])
    answer = first.messages[-1].content
    assert f"{answer}<|im_end|>" in trained
    assert "<tool_call>" in trained and "Hi!<|im_end|>" in trained
    assert "ana@example.com" not in "".join(texts) and "<EMAIL>" in "".join(texts)
    for never in ("<|im_start|>", "You are a helpful assistant", "Say hi."):
        assert never not in trained
    assert trained_targets([batch]) == int((targets != IGNORE_INDEX).sum())
    assert dataset.chat["splits"]["train"]["default"]["trained_tokens"] == \
        int((targets != IGNORE_INDEX).sum())
    # document masking: positions restart at each conversation
    assert int(batch.position_ids[0, 0]) == 0 and int(batch.doc_ids.max()) >= 1


def test_the_loss_is_the_mean_over_trained_targets_only(dataset):
    batch = fixed_sequences(dataset, "val", ROW_TOKENS, 2, document_masking=False)["default"]
    logits = torch.randn(*batch.inputs.shape, dataset.vocab_size)
    keep = batch.targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], batch.targets[keep])
    got = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                                            reduction="sum") / trained_targets([batch])
    assert torch.allclose(got, expected)


def test_a_conversation_the_template_cannot_render_names_its_line(files, tmp_path):
    tokenizer_json, _, _, conversations = files
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Say hi.", "completion": "Hi!"},
        {"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"},
                      {"role": "assistant", "content": "ok"}]}])
    no_tools = tmp_path / "no_tools.json"
    ChatTemplate("no-tools", "{% for m in messages %}{% if m.role == 'tool' %}"
                 "{{ raise_exception('this template has no tool role') }}{% endif %}"
                 "{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}").save(no_tools)
    config = chat_config(tmp_path, tokenizer_json, bad,
                         overrides=[f"data.chat.template={no_tools}"])
    with pytest.raises(HeloxError, match=r"bad.jsonl:2: .*no tool role"):
        prepare_dataset(config)


def test_an_end_of_document_token_inside_conversations_is_refused(files, tmp_path):
    tokenizer_json, train, _, _ = files
    config = chat_config(tmp_path, tokenizer_json, train,
                         overrides=["tokenizer.eos_token=<|im_end|>"])
    with pytest.raises(HeloxError, match="end-of-document token '<\\|im_end\\|>'"):
        prepare_dataset(config)


def test_chat_and_text_sources_do_not_mix_and_rows_are_the_sequence_length(files, tmp_path):
    tokenizer_json, train, _, _ = files
    with pytest.raises(Exception, match="all conversations, all preference pairs or all text"):
        chat_config(tmp_path, tokenizer_json, train,
                    overrides=[f"data.val=[{{path: {train}}}]"])
    with pytest.raises(Exception, match="row_tokens"):
        chat_config(tmp_path, tokenizer_json, train, overrides=["data.chat.row_tokens=64"])


def test_data_show_says_how_the_conversations_were_packed(dataset):
    from rich.console import Console

    from helox.data.report import print_show

    console = Console(record=True, width=200)
    print_show(console, dataset)
    text = console.export_text()
    assert f"chat: template chatml, trains assistant, rows of {ROW_TOKENS:,} tokens" in text
    assert "train default: 14 in" in text and "1 too long" in text
