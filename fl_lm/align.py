"""Cross-tokenizer alignment (FedMKT, after FuseLLM): a MinED vocabulary map and DTW over tokens.

- ``surfaces(tok)``: each vocabulary entry's text with one space marker, ``▁``, whatever the
  tokenizer's convention (byte-level BPE's ``Ġ``/``Ċ`` alphabet is decoded to real text first),
  so two vocabularies compare like for like.
- ``mined_map(src, dst)``: for every id of ``src`` the id of ``dst`` whose surface is equal, or
  else at the minimum edit distance (rapidfuzz's Levenshtein, computed in blocks; O(|V1|*|V2|)
  distances, so it is computed once per tokenizer pair and cached on disk).
- ``dtw_align(a, b)``: dynamic time warping over two token-surface sequences of the same text,
  with edit distance as the cost; ``one_to_one`` keeps positions aligned to exactly one token
  of the other side that is equal or mapped-equal. Anything else gets a one-hot target.
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SPACE = "▁"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes-to-unicode table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tok: Any) -> bool:
    try:
        spec = json.loads(tok.backend_tokenizer.to_str())
    except (AttributeError, ValueError):
        return False
    return "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


def surfaces(tok: Any) -> list[str]:
    """Surface text of every id (index = id); spaces written as ``▁``; special tokens by role."""
    n = len(tok)
    raw = tok.convert_ids_to_tokens(list(range(n)))
    specials = set(tok.all_special_tokens)
    byte_level = _is_byte_level(tok)
    dec = _byte_decoder()
    out = []
    for t in raw:
        if t in specials or not byte_level or any(ch not in dec for ch in t):
            out.append(t.replace(" ", SPACE))
        else:
            out.append(bytes(dec[ch] for ch in t).decode("utf-8", errors="replace").replace(" ", SPACE))
    # Special tokens match by role, not by spelling: one vocabulary's </s> is another's <|endoftext|>.
    for role in ("unk", "pad", "bos", "eos"):  # eos last: it wins where one id plays several roles
        i = getattr(tok, f"{role}_token_id", None)
        if i is not None and 0 <= i < n:
            out[i] = f"<{role}>"
    return out


def vocab_digest(tok: Any) -> str:
    return hashlib.sha256("\x00".join(surfaces(tok)).encode()).hexdigest()


def mined_map(src: list[str], dst: list[str], block: int = 256) -> np.ndarray:
    """``map[i]`` = the id in ``dst`` equal to ``src[i]``, else the one at minimum edit distance."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    exact = {s: i for i, s in reversed(list(enumerate(dst)))}  # first id wins on duplicates
    out = np.full(len(src), -1, dtype=np.int64)
    todo = []
    for i, s in enumerate(src):
        j = exact.get(s)
        if j is not None:
            out[i] = j
        else:
            todo.append(i)
    for k in range(0, len(todo), block):
        rows = todo[k : k + block]
        d = cdist([src[i] for i in rows], dst, scorer=Levenshtein.distance, dtype=np.int32, workers=1)  # (block, |dst|)
        out[rows] = d.argmin(axis=1)
    return out


def cached_map(src_tok: Any, dst_tok: Any, cache_dir: str | Path | None) -> np.ndarray:
    """``mined_map`` for a tokenizer pair, cached as JSON under ``cache_dir`` by vocabulary digests."""
    src, dst = surfaces(src_tok), surfaces(dst_tok)
    path = None
    if cache_dir is not None:
        ds = hashlib.sha256("\x00".join(src).encode()).hexdigest()[:16]
        dd = hashlib.sha256("\x00".join(dst).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"mined_{ds}_to_{dd}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if len(data["map"]) == len(src):
                return np.asarray(data["map"], dtype=np.int64)
    m = mined_map(src, dst)
    exact = sum(1 for i, j in enumerate(m) if src[i] == dst[j])
    log.info("MinED vocabulary map: %d of %d ids map exactly, the rest by edit distance", exact, len(src))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"src_size": len(src), "dst_size": len(dst), "exact": exact, "map": m.tolist()}))
        tmp.replace(path)
    return m


def dtw_path(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Monotone alignment of two token sequences minimizing the summed edit distance."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    if not a or not b:
        return []
    cost = cdist(a, b, scorer=Levenshtein.distance, dtype=np.int32, workers=1).astype(np.float64)  # (La, Lb)
    la, lb = cost.shape
    acc = np.full((la + 1, lb + 1), np.inf)
    acc[0, 0] = 0.0
    for i in range(1, la + 1):
        ci = cost[i - 1]
        prev, cur = acc[i - 1], acc[i]
        for j in range(1, lb + 1):
            m = prev[j - 1]
            if prev[j] < m:
                m = prev[j]
            if cur[j - 1] < m:
                m = cur[j - 1]
            cur[j] = ci[j - 1] + m
    path = []
    i, j = la, lb
    while i > 0 and j > 0:
        path.append((i - 1, j - 1))
        step = int(np.argmin((acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])))  # ties: prefer the diagonal
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return path[::-1]


def one_to_one(a: list[str], b: list[str], a_ids: list[int], b_ids: list[int], a_to_b: np.ndarray) -> np.ndarray:
    """For each position of ``a``, the position of ``b`` it aligns to one-to-one with an equal or
    mapped-equal token, else -1. (La,) int64."""
    path = dtw_path(a, b)
    na = np.zeros(len(a), dtype=np.int64)
    nb = np.zeros(len(b), dtype=np.int64)
    for i, j in path:
        na[i] += 1
        nb[j] += 1
    out = np.full(len(a), -1, dtype=np.int64)
    for i, j in path:
        if na[i] == 1 and nb[j] == 1 and (a[i] == b[j] or int(a_to_b[a_ids[i]]) == b_ids[j]):
            out[i] = j
    return out
