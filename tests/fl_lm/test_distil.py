"""The distillation loop on tiny models: a KD step lowers the divergence; DualMinCE selects per sample."""

from __future__ import annotations

import pytest

from shared.datasets import Example
from shared.messages import LoraSpec

LORA = LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj", "embed_tokens"))
PUBLIC = [Example("Repeat the text.", w, w, "copy") for w in ("apple river", "stone 12", "cloud maple tiger", "lemon 7 piano")]


class Sharp:
    """The untrained tiny teacher is near-uniform; scaled logits give it opinions worth learning."""

    def __init__(self, model, scale: float = 8.0) -> None:
        self.model, self.scale = model, scale

    def eval(self) -> None:
        self.model.eval()

    def __call__(self, **kw):
        out = self.model(**kw)
        out.logits = out.logits * self.scale
        return out


@pytest.fixture
def pair(tiny_models: dict[str, str]):
    from fl_lm.loading import load_model, load_tokenizer
    from fl_lm.lora import attach_lora

    tok = load_tokenizer(tiny_models["student"])
    learner = attach_lora(load_model(tiny_models["student"]), LORA, seed=0)
    return tok, learner, Sharp(load_model(tiny_models["teacher"]))


def _kd_on_public(d, learner, guide, s) -> float:
    import torch

    from fl_lm import kd

    batch = d._collate(d.pairs)
    with torch.no_grad():
        g = guide(input_ids=batch["g_ids"], attention_mask=batch["g_mask"]).logits
        logits = learner(input_ids=batch["ids"], attention_mask=batch["mask"]).logits
        return float(kd.kd_loss(logits[:, :-1], d._target(g, batch, s), batch["labels"][:, 1:], s.kind))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_distillation_steps_lower_the_divergence(pair, kind: str) -> None:
    from fl_lm.distil import Distiller, KDSettings

    tok, learner, guide = pair
    s = KDSettings(kind=kind, top_k=8, kd_alpha=0.0, steps=8, lr=5e-3, batch_size=4, selective=False)
    d = Distiller(tok, tok, PUBLIC, max_len=48)
    before = _kd_on_public(d, learner, guide, s)
    stats = d.run(learner, guide, s, seed=0)
    after = _kd_on_public(d, learner, guide, s)
    assert stats.steps == 8 and stats.from_guide == 1.0
    assert after < before


def test_dualmince_learns_nothing_from_a_guide_that_is_not_better(pair) -> None:
    """A guide identical to the learner never has the strictly lower CE: the KD term stays off."""
    import copy

    from fl_lm.distil import Distiller, KDSettings

    tok, learner, _ = pair
    same = copy.deepcopy(learner)
    same.eval()
    d = Distiller(tok, tok, PUBLIC, max_len=48)
    stats = d.run(learner, same, KDSettings(top_k=8, steps=2, batch_size=4, selective=True), seed=0)
    assert stats.from_guide == 0.0 and stats.kd_first == 0.0
