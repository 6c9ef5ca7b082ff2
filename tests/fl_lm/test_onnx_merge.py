"""Merging an adapter for the release (``fl_lm.onnx_export._merge``): tied embeddings stay tied
when nothing adapted them (the export then carries the matrix once), and are untied when an
adapter on the input embeddings makes the two matrices differ."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("targets", "tied_after"), [
    (("q_proj", "v_proj", "down_proj"), True),  # the real pair's case: linear layers only
    (("q_proj", "embed_tokens"), False),  # the toy pair's: the input embedding moved, the head did not
])
def test_merge_keeps_embeddings_tied_unless_an_adapter_moved_them(targets: tuple[str, ...], tied_after: bool) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fl_lm.lora import attach_lora
    from fl_lm.onnx_export import _merge
    from shared.messages import LoraSpec

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    original_emb = model.get_input_embeddings().weight.detach().clone()
    peft = attach_lora(model, LoraSpec(r=2, alpha=4.0, dropout=0.0, target_modules=targets))
    with torch.no_grad():  # every factor, as after training (PEFT starts one of each pair at zero)
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape) * 0.1)
    ids = torch.tensor([[1, 5, 9, 33, 60]])
    with torch.no_grad():
        want = peft(input_ids=ids).logits
    merged = _merge(peft)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the merged model answers as base + adapter
    emb, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert merged.config.tie_word_embeddings is tied_after
    assert (head is emb) is tied_after
    if not tied_after:
        torch.testing.assert_close(head, original_emb)  # the head projects with the matrix training used
