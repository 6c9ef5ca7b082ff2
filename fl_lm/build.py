"""Build the offline teacher and student: tokenizers trained locally on public text and two small
Llama models from configs, pretrained on public examples and saved with ``save_pretrained`` so
everything else loads them through ``from_pretrained`` exactly as it would load a real model id
or path. Nothing private goes in: the corpus and the pretraining examples are the caller's public
data.

Tokenizers: byte-level BPE (GPT-2/Qwen style, ``Ġ`` for a space) for the student, and by default
the teacher; with ``teacher_tokenizer="metaspace"`` the teacher gets its own SentencePiece-style
BPE (``▁`` for a space, another vocabulary size), so the two must be aligned (``fl_lm.align``).
Both split digits into single tokens: numbers are then learnable digit by digit.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.datasets import Example

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass(frozen=True)
class TinyLlama:
    """Shape of a from-config Llama. Defaults are the student: ~0.6M params, fast on 2 CPU cores."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 256


STUDENT = TinyLlama()
# About 6x the student's parameters, so there is something to distil; pretrained on public data only.
TEACHER = TinyLlama(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, intermediate_size=512)
VOCAB = 1024  # enough for the generated families' words and names; small, so the embeddings train fast


def train_tokenizer(texts: Sequence[str], out_dir: Path, vocab_size: int = VOCAB, style: str = "bytelevel") -> None:
    """Train a BPE on ``texts`` (byte-level, or Metaspace) and save it as a fast tokenizer in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    digits = pre_tokenizers.Digits(individual_digits=True)
    if style == "bytelevel":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        eos, pad = EOS, PAD
    elif style == "metaspace":
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Sequence([digits, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")])
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
        eos, pad = "</s>", "<pad>"
    else:
        raise ValueError(f"tokenizer style must be bytelevel or metaspace, got {style!r}")
    specials = [eos, pad] + (["<unk>"] if style == "metaspace" else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tk.train_from_iterator(list(texts), trainer=trainer)
    # model_input_names: without it generate() trips over token_type_ids (STACK.md).
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, bos_token=eos, pad_token=pad,
                                  unk_token="<unk>" if style == "metaspace" else None,
                                  model_input_names=["input_ids", "attention_mask"])
    tok.save_pretrained(out_dir)


def build_model(tokenizer_dir: Path, out_dir: Path, shape: TinyLlama, seed: int) -> int:
    """Create a Llama from a config, save it next to the tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def pretrain(model_dir: Path, examples: Sequence[Example], steps: int, seed: int, lr: float = 1e-3, batch_size: int = 16) -> float:
    """Full fine-tune on public examples so the base knows the prompt format and every token; saved in place.

    Stands in for the pre-training a real base model has had (a higher rate collapses the tiny
    models onto the pretraining tasks, and LoRA then learns little). Returns the last mean loss.
    """
    import torch

    from fl_lm.data import batches
    from fl_lm.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    model.train()
    # One thread: tiny matmuls gain nothing from two, and OpenMP spin-waits badly on a busy box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    for step, batch in enumerate(batches(tok, list(examples), batch_size, 128, seed, steps)):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 100 == 0:
            log.info("pretrain %s step %d/%d loss %.3f", model_dir.name, step, steps, losses[-1])
    torch.set_num_threads(threads)
    model.save_pretrained(model_dir, safe_serialization=True)
    return sum(losses[-20:]) / max(1, len(losses[-20:]))


def build_offline_models(
    out_dir: str | Path,
    corpus: Sequence[str],
    pretrain_examples: Sequence[Example] = (),
    pretrain_steps: int = 0,
    seed: int = 0,
    student: TinyLlama = STUDENT,
    teacher: TinyLlama = TEACHER,
    teacher_pretrain_steps: int | None = None,
    teacher_tokenizer: str = "same",
) -> dict[str, str]:
    """Tokenizer(s) + ``student/`` and ``teacher/`` under ``out_dir``; returns their paths.

    ``corpus`` and ``pretrain_examples`` must be public. Idempotent: if both models exist with the
    same recipe, nothing is rebuilt.
    """
    if teacher_tokenizer not in ("same", "metaspace"):
        raise ValueError(f"teacher_tokenizer must be same or metaspace, got {teacher_tokenizer!r}")
    out = Path(out_dir)
    t_steps = pretrain_steps if teacher_pretrain_steps is None else teacher_pretrain_steps
    recipe = {
        "seed": seed,
        "student": student.__dict__,
        "teacher": teacher.__dict__,
        "pretrain_steps": pretrain_steps,
        "teacher_pretrain_steps": t_steps,
        "teacher_tokenizer": teacher_tokenizer,
        "corpus_chars": sum(len(t) for t in corpus),
        "pretrain_examples": len(pretrain_examples),
        "version": 2,
    }
    marker = out / "recipe.json"
    paths = {"student": str(out / "student"), "teacher": str(out / "teacher"), "tokenizer": str(out / "tokenizer")}
    if marker.exists() and json.loads(marker.read_text()) == recipe:
        log.info("offline models already built in %s", out)
        return paths
    out.mkdir(parents=True, exist_ok=True)
    texts = list(corpus)
    random.Random(seed).shuffle(texts)
    train_tokenizer(texts, out / "tokenizer")
    t_tok = out / "tokenizer"
    if teacher_tokenizer == "metaspace":
        t_tok = out / "teacher_tokenizer"
        train_tokenizer(texts, t_tok, vocab_size=VOCAB + 512, style="metaspace")
    n_s = build_model(out / "tokenizer", out / "student", student, seed)
    n_t = build_model(t_tok, out / "teacher", teacher, seed + 1)
    log.info("built student (%d params) and teacher (%d params) in %s", n_s, n_t, out)
    if pretrain_examples:
        for name, steps in (("student", pretrain_steps), ("teacher", t_steps)):
            if steps > 0:
                loss = pretrain(out / name, pretrain_examples, steps, seed)
                log.info("pretrained %s on %d public examples for %d steps: loss %.3f", name, len(pretrain_examples), steps, loss)
    marker.write_text(json.dumps(recipe, indent=2))
    return paths
