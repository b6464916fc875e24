"""The user's own text for calibration (``--data``) and held-out evaluation (``--eval-data``).

Every verb that touches a model takes the same two files, in the formats of
:func:`~allocator.model.data.read_text_file` (``.jsonl`` with a ``"text"`` field per line, otherwise one
text per blank-line-separated paragraph):

* neither: the built-in corpus, the mix of every domain (``calibration`` / ``evaluation``
  splits, disjoint by document hash);
* ``--data`` and ``--eval-data``: calibration on the first, evaluation on the second, each whole;
  texts present in both are reported (:func:`overlap`), they are not removed;
* ``--data`` alone, when the verb also evaluates: the file is split by text hash —
  a text is held out when ``int(sha256("bitalloc-user-split:" + text)[:8], 16) mod 100`` is below
  :data:`HELD_OUT_SHARE` (25). The split depends on each text only (not on the file's order or
  the seed), so identical texts always land on the same side and the two sides never share a
  text. A file too small to give both sides at least one text is refused (pass ``--eval-data``);
* ``--eval-data`` alone: calibration on the built-in corpus, evaluation on the file.

Either may instead name the built-in corpus: ``builtin`` (the mix of every domain) or
``builtin:DOMAIN`` (one domain of :mod:`allocator.model.data.domains`: ``docs``, ``code``,
``prose``, ``instructions``, ``multilingual``). ``--data builtin:DOMAIN`` calibrates on that
domain's calibration split and, without ``--eval-data``, evaluates on its evaluation split
(disjoint by text hash); ``--eval-data builtin:DOMAIN`` evaluates on that domain's evaluation split.

Verbs that only calibrate (``apply --method gptq``) use ``--data`` whole (``holdout=False``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from allocator.core.errors import InvalidParameterError
from allocator.model.data.batches import CalibrationData, load_texts, read_text_file
from allocator.model.data.domains import parse_builtin
from allocator.model.data.images import data_for, uses_digits
from allocator.model.kind import ModelKind

__all__ = ["HELD_OUT_SHARE", "data_description", "overlap", "split_user_texts", "user_data_for",
           "user_split_of"]

#: percent of a lone ``--data`` file's texts held out for evaluation (by text hash)
HELD_OUT_SHARE = 25

UserSplit = Literal["calibration", "evaluation"]


def user_split_of(text: str) -> UserSplit:
    """``evaluation`` when ``int(sha256("bitalloc-user-split:" + text)[:8], 16) mod 100`` is below
    :data:`HELD_OUT_SHARE`, else ``calibration``."""
    digest = hashlib.sha256(("bitalloc-user-split:" + text).encode("utf-8")).hexdigest()
    return "evaluation" if int(digest[:8], 16) % 100 < HELD_OUT_SHARE else "calibration"


def split_user_texts(texts: list[str], *, source: str = "--data") -> tuple[list[str], list[str]]:
    """(calibration texts, held-out texts) of one file, split by :func:`user_split_of`.

    Raises:
        InvalidParameterError: one side would be empty (too few texts to split).
    """
    calib = [t for t in texts if user_split_of(t) == "calibration"]
    held = [t for t in texts if user_split_of(t) == "evaluation"]
    if not calib or not held:
        raise InvalidParameterError(
            f"{source} has {len(texts)} text(s), too few to hold {HELD_OUT_SHARE} % out for "
            f"evaluation ({len(calib)} calibration, {len(held)} held out); add paragraphs or pass "
            f"--eval-data")
    return calib, held


_Builtin = tuple[str, str | None]  # (split, domain) of the built-in corpus


def _texts(data: str | Path | None, eval_data: str | Path | None, split: UserSplit,
           holdout: bool) -> tuple[list[str], str] | _Builtin | None:
    """The texts of ``split`` and their source label, ``(split, domain)`` of the built-in corpus
    (``builtin[:DOMAIN]``), or None for the built-in default."""
    if split == "evaluation" and eval_data is not None:
        builtin, domain = parse_builtin(eval_data)
        if builtin:
            return "evaluation", domain
        return read_text_file(eval_data), f"file:{Path(eval_data).name}"
    if data is None:
        return None
    builtin, domain = parse_builtin(data)
    if builtin:  # a built-in domain brings its own disjoint evaluation split
        return split, domain
    texts = read_text_file(data)
    name = Path(data).name
    if eval_data is not None or not holdout:
        if split == "evaluation":  # holdout=False asked for held-out data: nothing to give
            raise InvalidParameterError(
                "no held-out data: pass --eval-data (or let --data be split for evaluation)")
        return texts, f"file:{name}"
    calib, held = split_user_texts(texts, source=f"--data {name}")
    return (calib, f"file:{name}#calibration") if split == "calibration" else \
        (held, f"file:{name}#held-out")


def user_data_for(loaded: Any, split: str, n_samples: int, *, data: str | Path | None = None,
                  eval_data: str | Path | None = None, holdout: bool = True, seq_len: int = 128,
                  batch_size: int = 16, seed: int = 0) -> Any:
    """The batches of ``split`` (``calibration`` / ``evaluation``) a loaded model runs on.

    The user's files as the module docstring says (tokenised exactly as
    :func:`~allocator.model.data.data_for` tokenises the built-in corpus: packed windows for causal
    LMs, one text per sample otherwise); :func:`~allocator.model.data.data_for` when no file applies
    (``builtin:DOMAIN`` picks a domain of the built-in corpus).

    Raises:
        InvalidParameterError: an unknown split or domain, a model without a tokenizer given text,
            a file that does not exist, holds no text or is too small to split.
    """
    if split not in ("calibration", "evaluation"):
        raise InvalidParameterError(f"unknown split {split!r}; use calibration or evaluation")
    common: dict[str, Any] = {"seq_len": seq_len, "batch_size": batch_size, "seed": seed}
    if data is None and eval_data is None:
        return data_for(loaded, split, n_samples, **common)
    if uses_digits(loaded) or getattr(loaded, "tokenizer", None) is None:
        raise InvalidParameterError(
            f"model {getattr(loaded, 'name', '?')!r} takes no text (it has no tokenizer); "
            f"drop --data/--eval-data to use its built-in data")
    side: UserSplit = "calibration" if split == "calibration" else "evaluation"
    got = _texts(data, eval_data, side, holdout)
    if got is None:
        return data_for(loaded, split, n_samples, **common)
    if isinstance(got[0], str):
        return data_for(loaded, got[0], n_samples, domain=got[1], **common)
    texts, source = got
    return CalibrationData.from_texts(texts, loaded.tokenizer, n_samples=n_samples, source=source,
                                      pack=loaded.kind == ModelKind.CAUSAL_LM, **common)


def overlap(data: str | Path, eval_data: str | Path) -> int:
    """How many distinct held-out texts of ``eval_data`` also appear in ``data`` (a built-in
    spelling stands for its calibration / evaluation split)."""
    return len(set(load_texts(data, "calibration")) & set(load_texts(eval_data, "evaluation")))


def _builtin_words(spec: str | Path | None, split: str) -> str | None:
    """The built-in corpus ``spec`` stands for (None: the mix), in words; None for a file."""
    builtin, domain = parse_builtin(spec)
    if spec is not None and not builtin:
        return None
    what = "mix of every domain" if domain is None else f"domain {domain!r}"
    return f"built-in corpus ({what}), {split} split"


def data_description(data: str | Path | None, eval_data: str | Path | None) -> dict[str, str]:
    """Where calibration and held-out data come from, in words (for reports)."""
    cal_builtin = _builtin_words(data, "calibration")
    if cal_builtin is not None and eval_data is None:
        held = _builtin_words(data, "evaluation")
        return {"calibration": cal_builtin,
                "evaluation": f"{held} (disjoint from calibration by document hash)"}
    if eval_data is None:
        name = Path(data).name  # type: ignore[arg-type]
        how = (f"texts hashed into {100 - HELD_OUT_SHARE}/{HELD_OUT_SHARE} % "
               f"calibration/held-out; no text on both sides")
        return {"calibration": f"--data {name} (calibration share; {how})",
                "evaluation": f"--data {name} (held-out share; {how})"}
    ev = _builtin_words(eval_data, "evaluation") or f"--eval-data {Path(eval_data).name}"
    if data is None:
        return {"calibration": cal_builtin or "", "evaluation": ev}
    shared = overlap(data, eval_data)
    note = f"{shared} text(s) also in --data" if shared else "no text shared with --data"
    return {"calibration": cal_builtin or f"--data {Path(data).name}",
            "evaluation": f"{ev} ({note})"}
