"""MinED vocabulary map and DTW alignment on a fixed text with two different tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from fl_lm import align

TEXT = "the cat sat on the mat"


def _byte_level_words():
    """Whole words in byte-level style (``Ġcat``), like GPT-2/Qwen vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|eos|>", "the", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "Ġdog", "<unk>"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|eos|>", unk_token="<unk>", pad_token="<|eos|>")


def _metaspace_pieces():
    """SentencePiece style (``▁c`` + ``at``), like Llama vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["▁", "t", "h", "e", "c", "a", "s", "o", "n", "m", "d", "g"]
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("a", "t"), ("▁", "c"), ("▁", "s"), ("▁", "o"), ("▁o", "n"), ("▁", "m")]
    vocab = {"</s>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def test_surfaces_use_one_space_marker() -> None:
    a, b = _byte_level_words(), _metaspace_pieces()
    sa, sb = align.surfaces(a), align.surfaces(b)
    assert [sa[i] for i in a(TEXT)["input_ids"]] == ["the", "▁cat", "▁sat", "▁on", "▁the", "▁mat"]
    assert [sb[i] for i in b(TEXT)["input_ids"]] == ["▁the", "▁c", "at", "▁s", "at", "▁on", "▁the", "▁m", "at"]


def test_mined_map_known_answers() -> None:
    a, b = _byte_level_words(), _metaspace_pieces()
    sa, sb = align.surfaces(a), align.surfaces(b)
    m = align.mined_map(sa, sb)
    by = {sa[i]: sb[m[i]] for i in range(len(sa))}
    assert by["▁on"] == "▁on" and by["▁the"] == "▁the"  # exact, once the space markers agree
    assert by["the"] == "▁the"  # one edit away: the nearest entry
    from rapidfuzz.distance import Levenshtein

    # Not in the other vocabulary: the nearest entry (two edits), the lowest id among ties.
    best = min(Levenshtein.distance("▁cat", x) for x in sb)
    assert Levenshtein.distance("▁cat", by["▁cat"]) == best == 2
    assert sb.index(by["▁cat"]) == min(i for i, x in enumerate(sb) if Levenshtein.distance("▁cat", x) == 2)
    assert by["<eos>"] == "<eos>"  # special tokens by role
    back = align.mined_map(sb, sa)
    assert sa[back[sb.index("▁the")]] == "▁the" and sa[back[sb.index("▁on")]] == "▁on"


def test_dtw_one_to_one_alignment_known_answer() -> None:
    a, b = _byte_level_words(), _metaspace_pieces()
    sa, sb = align.surfaces(a), align.surfaces(b)
    ia, ib = a(TEXT)["input_ids"], b(TEXT)["input_ids"]
    m = align.mined_map(sa, sb)
    pos = align.one_to_one([sa[i] for i in ia], [sb[i] for i in ib], ia, ib, m)
    # the->▁the (mapped-equal), ▁on and ▁the (equal); ▁cat, ▁sat, ▁mat span two pieces: one-hot.
    assert pos.tolist() == [0, -1, -1, 5, 6, -1]
    ia2, ib2 = ia + [a.eos_token_id], ib + [b.eos_token_id]
    pos2 = align.one_to_one([sa[i] for i in ia2], [sb[i] for i in ib2], ia2, ib2, m)
    assert pos2.tolist() == [0, -1, -1, 5, 6, -1, 9]  # </s> and <|eos|> are the same role
    path = align.dtw_path([sa[i] for i in ia], [sb[i] for i in ib])
    assert path[0] == (0, 0) and path[-1] == (5, 8) and all(
        (i2 - i1, j2 - j1) in ((0, 1), (1, 0), (1, 1)) for (i1, j1), (i2, j2) in zip(path, path[1:]))


def test_cached_map_is_written_once_and_reused(tmp_path) -> None:
    a, b = _byte_level_words(), _metaspace_pieces()
    m1 = align.cached_map(a, b, tmp_path)
    files = list(tmp_path.glob("mined_*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    m2 = align.cached_map(a, b, tmp_path)
    np.testing.assert_array_equal(m1, m2)
    assert files[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize("same", [True, False])
def test_cross_tokenizer_targets(same: bool) -> None:
    """The guide's distribution lands on the learner's ids where positions align; one-hot elsewhere."""
    import torch

    from fl_lm.distil import Distiller, KDSettings
    from shared.datasets import Example

    a, b = _byte_level_words(), _metaspace_pieces()
    guide_tok = a if same else b
    ex = Example("", "", TEXT)
    d = Distiller(a, guide_tok, [ex], max_len=32)
    batch = d._collate(d.pairs)
    vg = len(guide_tok)
    g_logits = torch.full((1, batch["g_ids"].size(1), vg), -20.0)
    sg = align.surfaces(guide_tok)
    # The guide is sure of the right next token everywhere.
    for j in range(batch["g_ids"].size(1) - 1):
        g_logits[0, j, batch["g_ids"][0, j + 1]] = 20.0
    t = d._target(g_logits, batch, KDSettings(top_k=2))
    top = t.idx[0, :, 0].tolist()  # most likely learner id per learner target position
    want = batch["labels"][0, 1:].tolist()
    assert top == want  # aligned or one-hot, the target's mode is the right learner token
    if not same:
        sa = align.surfaces(a)
        assert [sa[i] for i in want[:5]] == ["▁cat", "▁sat", "▁on", "▁the", "▁mat"]
        assert sg  # the guide vocabulary is the other one
