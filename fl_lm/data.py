"""Tokenize examples with the response-only loss mask, and batch them."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from shared.datasets import Example

IGNORE = -100


def prompt_text(tok: Any, ex: Example) -> str:
    """The prompt as the model sees it: the tokenizer's chat template where it has one (a chat
    model was trained on that format), else the Alpaca template of ``shared.datasets``. Both sides
    load the same tokenizer, so devices and aggregator agree without it being in the protocol."""
    if not ex.prompt:
        return ""
    if getattr(tok, "chat_template", None):
        content = ex.instruction + (f"\n\n{ex.input}" if ex.input else "")
        return str(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True))
    return ex.prompt


def encode_example(tok: Any, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt tokens are masked with -100 so loss is on the response only.

    Truncation keeps the start of the prompt and cuts the response, never the other way round, so
    a truncated example still teaches the start of an answer.
    """
    prompt = prompt_text(tok, ex)
    p = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    r = tok(ex.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (p + r)[:max_len]
    labels = ([IGNORE] * len(p) + r)[:max_len]
    return ids, labels


def collate(tok: Any, pairs: Sequence[tuple[list[int], list[int]]]) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in pairs)
    pad = tok.pad_token_id
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(tok: Any, examples: list[Example], batch_size: int, max_len: int, seed: int, steps: int,
            skip: int = 0) -> Iterator[dict[str, Any]]:
    """``steps`` batches, cycling through reshuffled epochs of ``examples``; the first ``skip`` of
    them are drawn but not yielded, so a resumed run sees exactly the batches it had left."""
    if not examples:
        raise ValueError("no examples to train on")
    encoded = [encode_example(tok, e, max_len) for e in examples]
    rng = random.Random(seed)
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more * max(1, -(-batch_size // len(more)))
        picked, order = order[:batch_size], order[batch_size:]
        if step >= skip:
            yield collate(tok, [encoded[i] for i in picked])
