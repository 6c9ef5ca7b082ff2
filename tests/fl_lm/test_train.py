"""Local training continued from a snapshot ends where the uninterrupted run ends (issue 13)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from shared.datasets import Example
from shared.messages import LoraSpec

# Dropout on: the resumed run must also draw the same dropout masks (torch's generator state).
LORA = LoraSpec(r=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj", "up_proj"))
EXAMPLES = [Example(f"Add {a} and {b}.", "", str(a + b)) for a in range(6) for b in range(3)]
STEPS = 7
ARGS: dict[str, Any] = dict(steps=STEPS, lr=5e-3, batch_size=4, max_len=48, seed=11)


class Crash(Exception):
    pass


def _fresh(student: str) -> tuple[Any, Any]:
    """A new process's model: the base loaded again and the same LoRA attached (as a device does)."""
    from fl_lm.loading import load_model, load_tokenizer
    from fl_lm.lora import attach_lora

    return attach_lora(load_model(student), LORA), load_tokenizer(student)


def _adapter(peft: Any) -> dict[str, np.ndarray]:
    from fl_lm.lora import get_adapter

    return get_adapter(peft)


@pytest.fixture(scope="module")
def uninterrupted(tiny_models: dict[str, str]) -> tuple[dict[str, np.ndarray], Any]:
    from fl_lm.train import train_lora

    peft, tok = _fresh(tiny_models["student"])
    res = train_lora(peft, tok, EXAMPLES, **ARGS)
    return _adapter(peft), res


def _crash_at(student: str, step: int) -> Any:
    from fl_lm.train import train_lora

    peft, tok = _fresh(student)
    taken: list[Any] = []

    def after_step(n: int, snapshot: Any) -> None:
        if n == step:
            taken.append(snapshot())
            raise Crash  # the process dies right after writing its checkpoint

    with pytest.raises(Crash):
        train_lora(peft, tok, EXAMPLES, **ARGS, after_step=after_step)
    return taken[0]


@pytest.mark.parametrize("step", [1, 4, STEPS - 1])
def test_a_resumed_run_ends_with_the_uninterrupted_adapter(step: int, tiny_models: dict[str, str], uninterrupted: Any) -> None:
    from fl_lm.train import train_lora

    want, want_res = uninterrupted
    st = _crash_at(tiny_models["student"], step)
    assert st.step == step and len(st.losses) == step
    assert set(st.moments) == {f"{k}/{n}" for n in st.params for k in ("exp_avg", "exp_avg_sq")}
    assert set(st.counts.values()) == {float(step)}

    peft, tok = _fresh(tiny_models["student"])  # a new process
    res = train_lora(peft, tok, EXAMPLES, **ARGS, resume=st)
    got = _adapter(peft)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert res.steps == STEPS and res.resumed_from == step
    assert res.mean_loss == pytest.approx(want_res.mean_loss, rel=1e-5) and res.first_loss == pytest.approx(want_res.first_loss)
    # The check can fail: the resumed steps moved the adapter well beyond float noise.
    final = {n: p.detach() for n, p in peft.named_parameters() if p.requires_grad}
    assert max(float((final[n] - v).abs().max()) for n, v in st.params.items()) > 1e-4


def test_a_snapshot_that_does_not_fit_is_ignored_with_one_warning(tiny_models: dict[str, str], uninterrupted: Any,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from fl_lm.train import train_lora

    want, _ = uninterrupted
    st = _crash_at(tiny_models["student"], 3)
    name = sorted(st.params)[0]
    bad = dataclasses.replace(st, params={**st.params, name: st.params[name][:1]})
    peft, tok = _fresh(tiny_models["student"])
    with caplog.at_level("WARNING", logger="fl_lm.train"):
        res = train_lora(peft, tok, EXAMPLES, **ARGS, resume=bad)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "parameters differ from the adapter's" in warnings[0], warnings
    assert warnings[0].endswith("starting from step 0")
    assert res.resumed_from == 0 and res.steps == STEPS
    got = _adapter(peft)
    for k in want:  # from step 0: the uninterrupted run again
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
