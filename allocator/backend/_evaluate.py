"""Evaluate a (quantized) model against its full-precision outputs on held-out data.

Metrics by model kind (``error`` is the one the pipeline compares plans by):

* ``causal_lm`` — perplexity ``exp(Σ NLL / #targets)`` of next-token prediction on the held-out
  text, the full-precision perplexity from the cached reference logits, and KL(P_fp ‖ P_q) of the
  next-token distributions averaged over real tokens (``error`` = KL).
* ``encoder`` — mean cosine similarity of the sentence embeddings to the full-precision ones
  (``error`` = 1 − cosine), and retrieval agreement: for each of the first ``n_queries`` texts,
  the overlap |N_fp ∩ N_q| / k of its top-k neighbours (cosine, itself excluded) among all
  evaluated texts, averaged.
* ``classifier`` — accuracy against labels when the batches carry ``labels`` (else agreement
  with the full-precision argmax) and the KL of the class distributions (``error`` = KL).

Full-precision reference outputs are kept per batch in an
:class:`~allocator.model.output_store.OutputStore` (in memory up to a budget, on disk past it: a
128k-vocabulary model's held-out logits do not fit in memory, and KL needs every position's whole
distribution), cached by (model fingerprint, data fingerprint, kind), and optionally on disk under
``cache_dir``. :func:`evaluate` streams: one batch's outputs and its reference at a time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.model.distortion import cosine_distance, kl_divergence
from allocator.model.kind import ModelKind
from allocator.model.output_store import OutputStore
from allocator.model.outputs import forward_outputs

if TYPE_CHECKING:
    import torch

__all__ = [
    "EvalReport",
    "ReferenceOutputs",
    "clear_reference_cache",
    "data_fingerprint",
    "evaluate",
    "next_token_nll",
    "reference_outputs",
    "retrieval_agreement",
]

_KINDS = tuple(k.value for k in ModelKind)
_CACHE: dict[str, ReferenceOutputs] = {}
_CACHE_MAX = 8
#: resident bytes of the cached references beyond which the oldest are dropped (the newest stays)
_CACHE_RESIDENT_MAX = 256 * 2**20


@dataclass(frozen=True, kw_only=True, eq=False)
class ReferenceOutputs:
    """Full-precision outputs per batch (logits, or L2-normalised sentence embeddings)."""

    kind: str
    outputs: Sequence[torch.Tensor]
    key: str | None = None


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    kind: str
    metrics: Mapping[str, float]
    error_metric: str
    n_samples: int
    n_tokens: int = 0
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> float:
        """The comparison metric (KL for logits, 1 − cosine for embeddings); lower is better."""
        return float(self.metrics[self.error_metric])


# ------------------------------------------------------------------ pure metric functions
def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor,
                   mask: torch.Tensor | None) -> tuple[float, int]:
    """(Σ −log p(x_{t+1} | x_≤t), number of targets) over positions with mask[t] = mask[t+1] = 1."""
    import torch

    tgt = input_ids[:, 1:]
    # rows in blocks: a float64 log-softmax of a whole batch is B·T·V·8 bytes (0.8 GB for 16 × 128
    # tokens of a 49152 vocabulary); every position's value is the same either way
    width = max(1, (logits.shape[1] - 1) * logits.shape[-1])
    step = max(1, _NLL_BLOCK_ELEMENTS // width)
    parts = []
    for r in range(0, logits.shape[0], step):
        lp = torch.log_softmax(logits[r:r + step, :-1].double(), dim=-1)
        parts.append(-lp.gather(-1, tgt[r:r + step].unsqueeze(-1)).squeeze(-1))
        del lp
    nll = torch.cat(parts) if parts else torch.zeros(tgt.shape, dtype=torch.float64)
    if mask is None:
        valid = torch.ones_like(tgt, dtype=torch.bool)
    else:
        valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    return float(nll[valid].sum()), int(valid.sum())


#: float64 elements of one block of rows in :func:`next_token_nll` (32 MiB)
_NLL_BLOCK_ELEMENTS = 1 << 22


def retrieval_agreement(ref: torch.Tensor, emb: torch.Tensor, *, k: int = 5,
                        n_queries: int | None = None) -> float:
    """Mean |top-k_fp(q) ∩ top-k_q(q)| / k over queries q (the first ``n_queries`` rows).

    Neighbours are ranked by cosine similarity among all rows, the query itself excluded.
    """
    import torch

    n = ref.shape[0]
    if n < 2:
        raise InvalidParameterError("retrieval agreement needs at least 2 texts")
    k = min(k, n - 1)
    m = n if n_queries is None else min(n_queries, n)
    a = torch.nn.functional.normalize(ref.double(), dim=-1)
    b = torch.nn.functional.normalize(emb.double(), dim=-1)
    sims_a, sims_b = a[:m] @ a.T, b[:m] @ b.T
    idx = torch.arange(m, device=sims_a.device)
    sims_a[idx, idx] = -math.inf
    sims_b[idx, idx] = -math.inf
    top_a = sims_a.topk(k, dim=1).indices.tolist()
    top_b = sims_b.topk(k, dim=1).indices.tolist()
    total = sum(len(set(x) & set(y)) / k for x, y in zip(top_a, top_b, strict=True))
    return total / m


# ------------------------------------------------------------------ reference outputs
def data_fingerprint(batches: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of every tensor of every batch (names, shapes, bytes), first 16 hex digits."""
    import torch

    h = hashlib.sha256()
    for b in batches:
        for key in sorted(b):
            v = b[key]
            h.update(key.encode())
            if isinstance(v, torch.Tensor):
                h.update(str(tuple(v.shape)).encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def clear_reference_cache() -> None:
    _CACHE.clear()


def _forward(model: torch.nn.Module, batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    return forward_outputs(model, batch, kind).detach().float()


def reference_outputs(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, Any]],
    *,
    kind: str,
    model_fingerprint: str | None = None,
    cache_dir: str | Path | None = None,
    forward: Callable[[torch.nn.Module, Mapping[str, Any], str], torch.Tensor] | None = None,
) -> ReferenceOutputs:
    """Outputs of the (full-precision) ``model`` on ``batches``, cached when it has a fingerprint."""
    import torch

    _check_kind(kind)
    key = None
    if model_fingerprint is not None:
        key = f"{model_fingerprint}-{data_fingerprint(batches)}-{kind}"
        if key in _CACHE:
            return _CACHE[key]
        if cache_dir is not None:
            folder = Path(cache_dir) / f"ref-{key}"
            if (folder / "done").is_file():
                ref = ReferenceOutputs(kind=kind, key=key, outputs=_load_outputs(folder))
                _remember(key, ref)
                return ref
    fwd = forward or _forward
    was_training = model.training
    model.eval()
    outs = OutputStore()
    try:
        with torch.inference_mode():
            # CPU copies: logits of every held-out batch would hold GPU memory for the whole
            # evaluation; evaluate() moves each one to where the quantized outputs are
            for b in batches:
                outs.append(fwd(model, b, kind))
    finally:
        model.train(was_training)
    ref = ReferenceOutputs(kind=kind, key=key, outputs=outs)
    if key is not None:
        _remember(key, ref)
        if cache_dir is not None:
            _save_outputs(outs, Path(cache_dir) / f"ref-{key}")
    return ref


def _save_outputs(outs: Sequence[torch.Tensor], folder: Path) -> None:
    """One file per batch (read back one at a time), then ``done`` (a folder without it is
    incomplete and recomputed)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for i, out in enumerate(outs):
        torch.save(out.contiguous(), folder / f"{i}.pt")
    (folder / "done").write_text(str(len(outs)), encoding="ascii")


def _load_outputs(folder: Path) -> OutputStore:
    """The batches of a ``cache_dir`` folder, into a store (CPU: a cache written on a GPU machine
    loads on any machine)."""
    import torch

    n = int((folder / "done").read_text(encoding="ascii"))
    store = OutputStore()
    for i in range(n):
        store.append(torch.load(folder / f"{i}.pt", weights_only=True, map_location="cpu", mmap=True))
    return store


def _resident(ref: ReferenceOutputs) -> int:
    outs = ref.outputs
    if isinstance(outs, OutputStore):
        return outs.resident_bytes
    return sum(o.numel() * o.element_size() for o in outs)


def _remember(key: str, ref: ReferenceOutputs) -> None:
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = ref
    while len(_CACHE) > 1 and sum(_resident(r) for r in _CACHE.values()) > _CACHE_RESIDENT_MAX:
        _CACHE.pop(next(iter(_CACHE)))


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise InvalidParameterError(f"model kind {kind!r} is unknown; choose one of {_KINDS}")


# ------------------------------------------------------------------ evaluate
def evaluate(
    model: torch.nn.Module,
    batches: Sequence[Mapping[str, Any]],
    reference: ReferenceOutputs,
    *,
    k: int = 5,
    n_queries: int | None = 64,
    forward: Callable[[torch.nn.Module, Mapping[str, Any], str], torch.Tensor] | None = None,
) -> EvalReport:
    """Metrics of ``model`` on held-out ``batches`` against ``reference`` (see the module doc)."""
    import torch

    if len(reference.outputs) != len(batches):
        raise InvalidParameterError(
            f"reference has {len(reference.outputs)} batches but {len(batches)} were given; "
            "compute the reference on the same evaluation data"
        )
    fwd = forward or _forward
    kind = reference.kind
    sums = _Sums(kind)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # one batch at a time: its outputs and its reference (CPU copy, compared where the
            # model's outputs are), reduced to sums before the next batch
            for b, r in zip(batches, reference.outputs, strict=True):
                o = fwd(model, b, kind)
                sums.add(b, r.to(o.device), o)
                del o, r
    finally:
        model.train(was_training)
    if kind == "encoder":
        return _encoder_report(sums.refs, sums.outs, k=k, n_queries=n_queries)
    return sums.report()


class _Sums:
    """Running sums of the per-batch metrics (in batch order, as one pass over a list would)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.refs: list[torch.Tensor] = []  # encoder embeddings ([B, H], small): kept for retrieval
        self.outs: list[torch.Tensor] = []
        self.nll = self.nll_fp = self.kl_sum = self.correct = self.agree = 0.0
        self.n_tgt = self.n_tok = self.n = 0
        self.labelled = True

    def add(self, b: Mapping[str, Any], r: torch.Tensor, o: torch.Tensor) -> None:
        if self.kind == "encoder":
            self.refs.append(r)
            self.outs.append(o)
        elif self.kind == ModelKind.CAUSAL_LM:
            self._add_causal(b, r, o)
        else:
            self._add_classifier(b, r, o)

    def _add_causal(self, b: Mapping[str, Any], r: torch.Tensor, o: torch.Tensor) -> None:

        mask = b.get("attention_mask")
        s, c = next_token_nll(o, b["input_ids"], mask)
        s_fp, _ = next_token_nll(r, b["input_ids"], mask)
        self.nll, self.nll_fp, self.n_tgt = self.nll + s, self.nll_fp + s_fp, self.n_tgt + c
        kl = kl_divergence(r, o)
        m = mask.bool() if mask is not None else None
        self.kl_sum += float(kl[m].sum() if m is not None else kl.sum())
        self.n_tok += int(m.sum()) if m is not None else int(kl.numel())
        self.n += int(o.shape[0])

    def _add_classifier(self, b: Mapping[str, Any], r: torch.Tensor, o: torch.Tensor) -> None:

        r2, o2 = r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1])
        pred = o2.argmax(-1)
        self.agree += float((pred == r2.argmax(-1)).sum())
        self.kl_sum += float(kl_divergence(r2, o2).sum())
        y = b.get("labels", b.get("label"))
        self.labelled = self.labelled and y is not None
        if self.labelled:
            self.correct += float((pred == y.reshape(-1)).sum())
        self.n += int(o2.shape[0])

    def report(self) -> EvalReport:
        if self.kind == ModelKind.CAUSAL_LM:
            metrics = {"perplexity": math.exp(self.nll / max(self.n_tgt, 1)),
                       "perplexity_fp": math.exp(self.nll_fp / max(self.n_tgt, 1)),
                       "kl": self.kl_sum / max(self.n_tok, 1)}
            return EvalReport(kind=ModelKind.CAUSAL_LM.value, metrics=metrics, error_metric="kl",
                              n_samples=self.n, n_tokens=self.n_tok)
        n = max(self.n, 1)
        metrics = {"agreement": self.agree / n, "kl": self.kl_sum / n}
        if self.labelled:
            metrics["accuracy"] = self.correct / n
        return EvalReport(kind="classifier", metrics=metrics, error_metric="kl", n_samples=self.n)


def _encoder_report(refs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], *, k: int,
                    n_queries: int | None) -> EvalReport:
    import torch

    ref, emb = torch.cat(list(refs)), torch.cat(list(outs))
    cos_d = cosine_distance(ref, emb)
    metrics = {"cosine": float(1 - cos_d.mean()), "cos_distance": float(cos_d.mean()),
               f"retrieval@{k}": retrieval_agreement(ref, emb, k=k, n_queries=n_queries)}
    return EvalReport(kind="encoder", metrics=metrics, error_metric="cos_distance",
                      n_samples=int(ref.shape[0]))
