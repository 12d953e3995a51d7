"""The chat template a served checkpoint chats with, and the turn end it must stop on besides
the EOS (a chat-SFT run's EOS is the packing separator, not `<|im_end|>`)."""

from pathlib import Path

import pytest

from helox.chat.templates import TEMPLATE_FILE, ChatTemplate
from helox.checkpoint import TrainedModel
from helox.data.tokenizer import train_bpe
from helox.errors import HeloxError
from helox.serve.chat import chat_setup, turn_end

SMOL_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A BPE with ChatML's special tokens and Llama 3's turn end, beside the document EOS."""
    tokenizer = train_bpe(["the cat sat on the mat"] * 10, 280, 2, "<|endoftext|>")
    tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|eot_id|>"])
    return tokenizer


def trained(tokenizer, checkpoint: Path, config: dict) -> TrainedModel:
    return TrainedModel(model=None, tokenizer=tokenizer, eos_id=0, eos_token="<|endoftext|>",
                        checkpoint=checkpoint, config=config, run_info={}, ema=False)


def run_folder(tmp_path: Path) -> Path:
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    return checkpoint


def test_a_chat_sft_run_stops_on_its_eos_and_the_templates_turn_end(chat_tokenizer, tmp_path):
    config = {"data": {"train": [{"path": "x.jsonl", "format": "chat"}],
                       "chat": {"template": "chatml"}}, "tokenizer": {"path": None}}
    setup = chat_setup(trained(chat_tokenizer, run_folder(tmp_path), config))
    assert setup.template.name == "chatml"
    assert setup.stop_token_ids == {0, chat_tokenizer.token_to_id("<|im_end|>")}
    assert setup.stop == ()


def test_an_imported_models_own_template_is_found_beside_its_tokenizer(chat_tokenizer,
                                                                       tmp_path):
    checkpoint = run_folder(tmp_path)
    ChatTemplate("tokenizer", SMOL_TEMPLATE, (("eos_token", "<|im_end|>"),)).save(
        checkpoint.parent.parent / TEMPLATE_FILE)
    setup = chat_setup(trained(chat_tokenizer, checkpoint, {"data": {"train": []}}))
    assert setup.template.source == SMOL_TEMPLATE
    assert setup.stop_token_ids == {0, chat_tokenizer.token_to_id("<|im_end|>")}


def test_a_text_run_has_no_chat_unless_a_template_is_named(chat_tokenizer, tmp_path):
    model = trained(chat_tokenizer, run_folder(tmp_path), {"data": {"train": [{"path": "x"}]}})
    assert chat_setup(model) is None
    llama3 = chat_setup(model, "llama3")
    assert llama3.stop_token_ids == {0, chat_tokenizer.token_to_id("<|eot_id|>")}
    with pytest.raises(HeloxError, match="chat template 'nope'"):
        chat_setup(model, "nope")


def test_a_turn_end_that_is_not_one_token_becomes_a_stop_string(tmp_path):
    plain = train_bpe(["the cat sat on the mat"] * 10, 280, 2, "<|endoftext|>")
    assert turn_end(ChatTemplate.builtin("chatml"), plain) == (set(), ("<|im_end|>",))
    alpaca = ChatTemplate.builtin("alpaca", {"eos_token": "<|endoftext|>"})
    assert turn_end(alpaca, plain) == ({0}, ())
