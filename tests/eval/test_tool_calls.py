"""The `tool_calls` suite task: each held-out conversation is prompted up to its first assistant
turn with the chat template, the model's greedy turn is read as tool calls, and an item scores
1 when the right tools are called with exactly the right arguments. A scripted model (correct
on every other item) fixes what the accuracy must be."""

import torch

from helox.chat.messages import read_conversations
from helox.chat.templates import ChatTemplate
from helox.chat.tooluse import write_tool_use_set
from helox.data.tokenizer import train_bpe
from helox.eval.lm import LanguageModel
from helox.eval.runner import run_suite
from helox.eval.suite import load_suite


class ScriptedLM(LanguageModel):
    """Greedy generation replaced by a script: prompt text → the assistant turn it gets."""

    def __init__(self, tokenizer, script: dict[str, str]):
        super().__init__(None, tokenizer, tokenizer.token_to_id("<eos>"), 4096,
                         tokenizer.get_vocab_size(), "scripted", "test", torch.device("cpu"),
                         batch_size=4)
        self.script, self.stops = script, set()

    def greedy(self, prompts, max_new_tokens, stop=()):
        self.stops.update(stop)
        return [self.script[self.decode(ids)] for ids in prompts]


def test_accuracy_counts_right_calls_with_right_arguments(tmp_path):
    _, test = write_tool_use_set(tmp_path, train=10, test=30, seed=5)
    conversations = [c for _, c in read_conversations(test)]
    template = ChatTemplate.builtin("chatml", {"eos_token": "<eos>"})
    tokenizer = train_bpe((template.render(c) for c in conversations), 600, 2, "<eos>")
    script, expected = {}, []
    for index, conversation in enumerate(conversations):
        first = conversation.assistant_turns()[0]
        prompt = template.render(conversation, add_generation_prompt=True, upto=first)
        assert prompt.endswith("<|im_start|>assistant\n")
        right = template.render(conversation, upto=first + 1)[len(prompt):]
        right = right.removesuffix("<|im_end|>\n")
        calls_a_tool = bool(conversation.messages[first].tool_calls)
        script[prompt] = right if index % 2 == 0 else "I am not sure."
        expected.append(1.0 if index % 2 == 0 or not calls_a_tool else 0.0)
    (tmp_path / "suite.yaml").write_text(
        "name: tools\ntasks:\n  - name: tool_use\n    type: tool_calls\n    items: test.jsonl\n"
        "    thresholds: {accuracy: {min: 0.9}}\n")
    lm = ScriptedLM(tokenizer, script)
    result = run_suite(lm, load_suite(tmp_path / "suite.yaml"), None)
    assert lm.stops == {"<|im_end|>"}
    assert [row.score for row in result.rows] == expected
    (task,) = result.tasks
    assert task.metrics["accuracy"].value == sum(expected) / len(expected) < 0.9
    assert result.failures()  # the threshold gates
    groups = {row.group for row in result.rows}
    assert "get_weather" in groups or "convert_currency" in groups
    wrong = [row for row, score in zip(result.rows, expected) if not score]
    assert all(row.detail["well_formed"] and not row.detail["right_tool"] for row in wrong)
