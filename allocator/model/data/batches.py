"""Calibration / evaluation token batches built with a model's tokenizer.

``CalibrationData`` is an immutable, iterable list of batches (dicts of ``input_ids`` and
``attention_mask`` tensors, ready for ``model(**batch)``) plus what made them: sample count,
sequence length, batch size, seed, the source and a sha256 fingerprint of the token ids.

Two layouts:

* ``pack=False`` (default): one text per sample, truncated to ``seq_len`` tokens and right-padded
  to the longest sample of its batch (``attention_mask`` 0 on padding). Suits encoders and
  classifiers (one sentence embedding per text) and works for causal LMs.
* ``pack=True``: texts (in seeded order) are joined with the tokenizer's EOS/SEP token and cut
  into full windows of ``seq_len`` tokens, no padding (the GPTQ-style LM calibration layout).

torch is imported lazily so that ``import allocator.model.data`` stays light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.model.data.corpus import texts_fingerprint

if TYPE_CHECKING:
    import torch

__all__ = ["CalibrationData", "batch_rows", "batches_fingerprint", "load_texts", "read_text_file"]

log = logging.getLogger(__name__)


def read_text_file(path: str | Path) -> list[str]:
    """Texts of a file: ``.jsonl`` → the ``"text"`` field of each line; otherwise one text per
    blank-line-separated paragraph (inner newlines become spaces)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidParameterError(
            f"text file {str(p)!r} does not exist; pass a .txt/.jsonl file or omit it for the "
            f"built-in corpus")
    raw = p.read_text(encoding="utf-8")
    texts: list[str] = []
    if p.suffix.lower() == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidParameterError(
                    f"{p}:{lineno} is not valid JSON ({e.msg}); write one JSON object per line") from e
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise InvalidParameterError(
                    f'{p}:{lineno} has no string "text" field; write {{"text": "..."}} per line')
            if text.strip():
                texts.append(text.strip())
    else:
        for para in raw.replace("\r\n", "\n").split("\n\n"):
            text = " ".join(para.split())
            if text:
                texts.append(text)
    if not texts:
        raise InvalidParameterError(f"text file {str(p)!r} holds no text; add at least one paragraph")
    return texts


def load_texts(path: str | Path | None = None, split: str = "calibration") -> list[str]:
    """Texts of ``path`` (see ``read_text_file``), or of the built-in corpus ``split`` when None
    (the mix of every domain) or ``builtin:DOMAIN`` (one domain).

    A file is used whole whatever ``split`` says: the caller keeps calibration and evaluation
    files apart.
    """
    from allocator.model.data.domains import builtin_texts, parse_builtin

    builtin, domain = parse_builtin(path)
    if path is None or builtin:
        return builtin_texts(split, domain)
    return read_text_file(path)


def batch_rows(batch: Mapping[str, Any]) -> int:
    """Rows (samples) of a token batch: the leading dimension of its first non-scalar tensor.

    Raises:
        InvalidParameterError: the batch holds no tensor (it was not tokenized).
    """
    import torch

    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise InvalidParameterError(f"a calibration batch holds no tensor (keys {sorted(batch)}); "
                                "pass tokenized batches")


def batches_fingerprint(batches: Sequence[Mapping[str, Any]]) -> str:
    """sha256 (hex) over every batch: tensor names, shapes, dtypes and bytes, in order."""
    import torch

    h = hashlib.sha256()
    for b in batches:
        for key in sorted(b):
            v = b[key]
            if not isinstance(v, torch.Tensor):
                continue
            t = v.detach().to("cpu").contiguous()
            h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _special_id(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return tid
    return None


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidParameterError(f"{name} must be an int >= {low}; got {value!r}")
    return value


class BatchSequence:
    """Iteration, length and indexing over ``self.batches`` (shared by the data classes)."""

    batches: tuple[dict[str, torch.Tensor], ...]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


@dataclass(frozen=True, kw_only=True, eq=False)
class CalibrationData(BatchSequence):
    """Token batches plus their provenance; iterate it to get ``dict[str, Tensor]`` batches."""

    batches: tuple[dict[str, torch.Tensor], ...]
    n_samples: int
    seq_len: int
    batch_size: int
    seed: int
    pack: bool = False
    source: str = "texts"
    texts_sha256: str = ""
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.batches:
            raise InvalidParameterError("CalibrationData needs at least one batch; got none")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", batches_fingerprint(self.batches))

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        tokenizer: Any,
        *,
        n_samples: int = 128,
        seq_len: int = 128,
        batch_size: int = 8,
        seed: int = 0,
        pack: bool = False,
        source: str = "texts",
    ) -> CalibrationData:
        """Tokenise ``texts`` (seeded order) into ``n_samples`` samples of ≤ ``seq_len`` tokens.

        Fewer samples than asked when the texts run out (a warning is logged; ``n_samples``
        records the real count).
        """
        import torch

        _check_int("n_samples", n_samples, 1)
        _check_int("seq_len", seq_len, 2)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        clean = [t for t in texts if isinstance(t, str) and t.strip()]
        if not clean:
            raise InvalidParameterError(
                f"no texts to build calibration data from ({source}); pass non-empty texts")
        order = list(range(len(clean)))
        random.Random(seed).shuffle(order)
        chosen = [clean[i] for i in order]
        if pack:
            rows, n_used = cls._packed_rows(chosen, tokenizer, n_samples, seq_len)
            chosen = chosen[:n_used]
        else:
            chosen = chosen[:n_samples]
            rows = cls._text_rows(chosen, tokenizer, seq_len)
        if not rows:
            raise InvalidParameterError(
                f"the texts ({source}) give no token sequences of length {seq_len}; "
                f"pass more text or lower seq_len")
        if len(rows) < n_samples:
            log.warning("only %d of %d samples could be built from %s", len(rows), n_samples, source)
        pad = _special_id(tokenizer, "pad_token_id", "eos_token_id", "unk_token_id") or 0
        batches: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
            batches.append({"input_ids": ids, "attention_mask": mask})
        return cls(batches=tuple(batches), n_samples=len(rows), seq_len=seq_len,
                   batch_size=batch_size, seed=seed, pack=pack, source=source,
                   texts_sha256=texts_fingerprint(chosen))

    @staticmethod
    def _text_rows(texts: list[str], tokenizer: Any, seq_len: int) -> list[list[int]]:
        enc = tokenizer(texts, truncation=True, max_length=seq_len, add_special_tokens=True)
        return [list(map(int, ids)) for ids in enc["input_ids"] if len(ids) > 0]

    @staticmethod
    def _packed_rows(texts: list[str], tokenizer: Any, n: int,
                     seq_len: int) -> tuple[list[list[int]], int]:
        """Full ``seq_len`` windows of the joined token stream, and how many texts it used."""
        sep = _special_id(tokenizer, "eos_token_id", "sep_token_id")
        bos = _special_id(tokenizer, "bos_token_id")
        stream: list[int] = []
        rows: list[list[int]] = []
        used = 0
        for text in texts:  # tokenise lazily: stop once n windows are full
            used += 1
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            stream.extend(([bos] if bos is not None else []) + list(map(int, ids)))
            if sep is not None:
                stream.append(sep)
            while len(stream) >= seq_len and len(rows) < n:
                rows.append(stream[:seq_len])
                stream = stream[seq_len:]
            if len(rows) >= n:
                break
        return rows, used

    @classmethod
    def from_corpus(cls, tokenizer: Any, *, split: str = "calibration", n_samples: int = 128,
                    seq_len: int = 128, batch_size: int = 8, seed: int = 0,
                    pack: bool = False, domain: str | None = None) -> CalibrationData:
        """Batches from the built-in corpus ``split``: the mix of every domain (``domain=None``)
        or one domain (:mod:`allocator.model.data.domains`); the source records the texts'
        sha256 (``builtin:SPLIT@…`` / ``builtin:DOMAIN:SPLIT@…``)."""
        from allocator.model.data.domains import builtin_fingerprint, builtin_label, builtin_texts

        return cls.from_texts(builtin_texts(split, domain), tokenizer, n_samples=n_samples,
                              seq_len=seq_len, batch_size=batch_size, seed=seed, pack=pack,
                              source=f"{builtin_label(split, domain)}@"
                                     f"{builtin_fingerprint(split, domain)[:16]}")

    @classmethod
    def from_path(cls, path: str | Path | None, tokenizer: Any, *, split: str = "calibration",
                  n_samples: int = 128, seq_len: int = 128, batch_size: int = 8, seed: int = 0,
                  pack: bool = False) -> CalibrationData:
        """Batches from a text file, or from the built-in corpus ``split`` when ``path`` is None
        (the mix) or ``builtin[:DOMAIN]``."""
        from allocator.model.data.domains import parse_builtin

        builtin, domain = parse_builtin(path)
        if path is None or builtin:
            return cls.from_corpus(tokenizer, split=split, n_samples=n_samples, seq_len=seq_len,
                                   batch_size=batch_size, seed=seed, pack=pack, domain=domain)
        return cls.from_texts(read_text_file(path), tokenizer, n_samples=n_samples,
                              seq_len=seq_len, batch_size=batch_size, seed=seed, pack=pack,
                              source=f"file:{Path(path).name}")

    # --- use ----------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens over all batches."""
        return int(sum(int(b["attention_mask"].sum()) for b in self.batches))

    def to(self, device: str | torch.device) -> CalibrationData:
        """A copy with every tensor on ``device`` (the fingerprint is kept: same token ids)."""
        moved = tuple({k: v.to(device) for k, v in b.items()} for b in self.batches)
        return replace(self, batches=moved)

    def metadata(self) -> dict[str, Any]:
        """JSON-able provenance for cost-table / plan metadata."""
        return {"source": self.source, "n_samples": self.n_samples, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed, "pack": self.pack,
                "n_tokens": self.n_tokens, "texts_sha256": self.texts_sha256,
                "fingerprint": self.fingerprint}
