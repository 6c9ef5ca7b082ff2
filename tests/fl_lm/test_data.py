"""Prompts use the tokenizer's chat template where it has one (issue 14), the Alpaca template otherwise."""

from __future__ import annotations

from fl_lm.data import IGNORE, encode_example, prompt_text
from shared.datasets import Example

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_alpaca_template_without_a_chat_template(tiny_models: dict[str, str]) -> None:
    from fl_lm.loading import load_tokenizer

    tok = load_tokenizer(tiny_models["student"])
    assert not getattr(tok, "chat_template", None)
    ex = Example("Add.", "2 3", "5")
    assert prompt_text(tok, ex) == ex.prompt
    assert prompt_text(tok, Example("", "", "plain text")) == ""


def test_chat_template_is_used_and_only_the_answer_is_learnt(tiny_models: dict[str, str]) -> None:
    from fl_lm.loading import load_tokenizer

    tok = load_tokenizer(tiny_models["student"])
    tok.chat_template = TEMPLATE
    ex = Example("Add.", "2 3", "5")
    p = prompt_text(tok, ex)
    assert p == "<|user|>Add.\n\n2 3\n<|assistant|>"
    ids, labels = encode_example(tok, ex, 128)
    n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids[:n_prompt]).replace(" ", "") == p.replace(" ", "")
