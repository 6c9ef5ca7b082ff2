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
    """A guide identical to the learner never has the strictly lower CE: every sample's target is
    the learner's own snapshot, which at the first step it matches exactly."""
    import copy

    from fl_lm.distil import Distiller, KDSettings

    tok, learner, _ = pair
    same = copy.deepcopy(learner)
    same.eval()
    d = Distiller(tok, tok, PUBLIC, max_len=48)
    stats = d.run(learner, same, KDSettings(top_k=8, steps=1, batch_size=4, selective=True), seed=0)
    assert stats.from_guide == 0.0 and abs(stats.kd_first) < 1e-6


class Oracle:
    """A guide that puts all its mass on the reference's next token for chosen samples, and on a
    wrong token for the others: it fits the first kind far better than any learner, the second far worse."""

    def __init__(self, batch, good: list[bool], vocab: int) -> None:
        import torch

        ids = batch["g_ids"]
        self.logits = torch.full((*ids.shape, vocab), -10.0)
        for b in range(ids.size(0)):
            for t in range(ids.size(1) - 1):
                tok = int(ids[b, t + 1]) if good[b] else (int(ids[b, t + 1]) + 1) % vocab
                self.logits[b, t, tok] = 10.0

    def eval(self) -> None:
        pass

    def __call__(self, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits)


def test_dualmince_picks_the_lower_ce_side_per_sample(pair) -> None:
    """Per sample: the guide's distribution where it has the lower CE, the learner's own elsewhere."""
    import torch

    from fl_lm import kd
    from fl_lm.distil import Distiller, KDSettings

    tok, learner, _ = pair
    d = Distiller(tok, tok, PUBLIC, max_len=48)
    batch = d._collate(d.pairs)
    good = [True, False, True, False]
    guide = Oracle(batch, good, len(tok))
    s = KDSettings(top_k=4, selective=True)
    target, w = d.targets(guide, learner.eval(), batch, s)
    assert w.tolist() == [1.0, 0.0, 1.0, 0.0]
    with torch.no_grad():
        own = kd.topk_target(learner(input_ids=batch["ids"], attention_mask=batch["mask"]).logits[:, :-1], 4)
    g = d._target(guide.logits, batch, s)
    for b, from_guide in enumerate(good):
        want = g if from_guide else own
        assert torch.equal(target.idx[b], want.idx[b])
        assert torch.allclose(target.logp[b], want.logp[b])
    _, w_all = d.targets(guide, None, batch, KDSettings(top_k=4, selective=False))
    assert w_all.tolist() == [1.0] * 4  # without selection, always the guide
