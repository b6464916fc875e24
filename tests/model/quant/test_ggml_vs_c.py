"""Bit-for-bit equality with ggml's C quantizers, built from the llama.cpp sources in the
``llama-cpp-python`` sdist (once, cached). Skipped, with the reason, without sources or a compiler;
``BITALLOC_GGML_REFERENCE=0`` skips it on purpose, ``BITALLOC_GGML_SRC`` points at a checkout."""

from __future__ import annotations

import os

import pytest
import torch
from _ggml_cases import weights_and_importance

from allocator.model.quant import GGML_BLOCKS, quantize_ggml
from allocator.testing.ggml_reference import GgmlReference, ReferenceUnavailable, load_ggml_reference


@pytest.fixture(scope="module")
def ggml() -> GgmlReference:
    if os.environ.get("BITALLOC_GGML_REFERENCE") == "0":
        pytest.skip("BITALLOC_GGML_REFERENCE=0")
    try:
        return load_ggml_reference()
    except ReferenceUnavailable as exc:
        pytest.skip(f"ggml reference unavailable: {exc}")


@pytest.mark.parametrize("importance", ["none", "imatrix", "ones"])
@pytest.mark.parametrize("name", list(GGML_BLOCKS))
def test_bytes_equal_ggml(ggml: GgmlReference, name: str, importance: str) -> None:
    w, imp = weights_and_importance(768, seed=1)
    qw = {"none": None, "imatrix": imp, "ones": torch.ones(w.shape[1])}[importance]
    ours = quantize_ggml(w, name, importance=qw).data
    theirs = ggml.quantize(w.numpy(), name, None if qw is None else qw.numpy())
    bb = GGML_BLOCKS[name].block_bytes
    bad_blocks = int((ours.reshape(-1, bb) != theirs.reshape(-1, bb)).any(1).sum())
    assert bad_blocks == 0
