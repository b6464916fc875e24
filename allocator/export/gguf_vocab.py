"""The tokenizer of a Hugging Face model as GGUF metadata (``tokenizer.ggml.*``), the way
llama.cpp's ``convert_hf_to_gguf.py`` writes a byte-level BPE vocabulary (``_set_vocab_gpt2``).

Keys: ``model`` = ``gpt2``; ``pre`` (the pre-tokenizer llama.cpp must run); ``tokens`` (every id
below the config's ``vocab_size``; ids the tokenizer lacks become ``[PAD<i>]``); ``token_type``
(1 normal, 3 control for special added tokens, 4 user-defined for other added tokens, 5 unused);
then gguf-py's ``SpecialVocab``: ``merges``, bos/eos/unk/pad ids, ``add_bos_token`` /
``add_eos_token`` (``add_bos_token`` false when the tokenizer adds none) and the chat
template. No ``scores`` (the converter writes none for BPE).

``pre``: the converter recognises a tokenizer by hashing its output on a test text; here the
``pre_tokenizer`` of ``tokenizer.json`` is matched by structure instead, for the two byte-level
layouts llama.cpp names (``gpt-2``: a regex ByteLevel alone; ``smollm``: individual Digits then a
regex ByteLevel). Anything else is refused rather than guessed: a wrong ``pre`` splits text
differently in llama.cpp and changes every token id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from allocator.core.errors import ExportError

__all__ = ["add_vocab", "pre_tokenizer_name"]

_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def _byte_level_regex(p: Any) -> bool:
    return isinstance(p, dict) and p.get("type") == "ByteLevel" and p.get("use_regex", True) is True


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``tokenizer.json``.

    Raises:
        ExportError: a layout llama.cpp's names are not matched to here.
    """
    pre = tokenizer_json.get("pre_tokenizer")
    if _byte_level_regex(pre):
        return "gpt-2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
                and _byte_level_regex(steps[1])):
            return "smollm"
    kind = pre.get("type") if isinstance(pre, dict) else pre
    raise ExportError(f"llamacpp: the tokenizer's pre-tokenizer ({kind!r}) is not one whose llama.cpp "
                      "name is known here (gpt-2, smollm); convert this model with llama.cpp's "
                      "convert_hf_to_gguf.py")


def _tokens(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    vocab: dict[str, int] = tok.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ExportError(f"llamacpp: the tokenizer has id {max(vocab.values())}, past the model's "
                          f"vocab_size {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(_NORMAL if i not in added else _CONTROL if added[i].special else _USER_DEFINED)
    return tokens, types


def add_vocab(writer: Any, model_dir: Path, vocab_size: int) -> str:
    """Write the ``tokenizer.*`` keys of the tokenizer in ``model_dir``; returns ``pre``.

    Raises:
        ExportError: no ``tokenizer.json``, or not a byte-level BPE llama.cpp can run.
    """
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"llamacpp: {str(model_dir)!r} has no tokenizer.json; --gguf writes the "
                          "tokenizer too (save it with tokenizer.save_pretrained)")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if (doc.get("model") or {}).get("type") != "BPE":
        raise ExportError(f"llamacpp: only byte-level BPE tokenizers are written (this one is "
                          f"{(doc.get('model') or {}).get('type')!r})")
    pre = pre_tokenizer_name(doc)
    tokens, types = _tokens(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:
        # llama.cpp's default for a BPE vocabulary may add BOS; the HF tokenizer adds none here
        writer.add_add_bos_token(False)
    config_path = model_dir / "tokenizer_config.json"
    if config_path.is_file():
        tc = json.loads(config_path.read_text(encoding="utf-8"))
        if isinstance(tc.get("add_prefix_space"), bool):
            writer.add_add_space_prefix(tc["add_prefix_space"])
    return pre
