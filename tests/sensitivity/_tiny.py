"""Tiny seeded models and batches shared by the gradient/Hessian estimator tests."""

from __future__ import annotations

import torch
import transformers

from allocator.testing.estimator_conformance import padded_token_batches


def tiny_llama(hidden: int = 8, layers: int = 1, vocab: int = 13, seed: int = 0,
               tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the init's 0.02 std: a loss with real curvature
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model


def llama_batches(vocab: int = 13, rows: int = 3, width: int = 6, n: int = 2,
                  seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (row r of batch k has a length ≥ 2)."""
    return padded_token_batches(vocab, rows=rows, width=width, n=n, seed=seed)


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=31, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=32, hidden_dropout_prob=0.1)
    return transformers.BertModel(cfg).eval()
