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

Each metric is a ratio of sums over the evaluation samples (rows of a batch: a text, a packed
window, an image), and :attr:`EvalReport.samples` keeps those per-sample sums (a few floats per
sample) so that :meth:`EvalReport.intervals` and :meth:`EvalReport.compare` can bootstrap them
(:mod:`allocator.backend._intervals`); the metrics are computed from the same sums.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.backend._intervals import (
    DEFAULT_DRAWS,
    DEFAULT_LEVEL,
    Comparison,
    Interval,
    RatioMetric,
    SampleStats,
    Transform,
    metric_intervals,
    paired_comparison,
    resamples,
)
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
    "next_token_nll_rows",
    "reference_outputs",
    "retrieval_agreement",
    "retrieval_hits",
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
    #: per-sample sums every metric is computed from (None: built without them)
    samples: SampleStats | None = None

    @property
    def error(self) -> float:
        """The comparison metric (KL for logits, 1 − cosine for embeddings); lower is better."""
        return float(self.metrics[self.error_metric])

    def intervals(self, *, draws: int = DEFAULT_DRAWS, seed: int = 0,
                  level: float = DEFAULT_LEVEL) -> dict[str, Interval]:
        """Each metric with its percentile bootstrap interval over the evaluation samples
        (``draws`` resamples from ``seed``); empty without :attr:`samples`."""
        if self.samples is None or self.samples.n == 0:
            return {}
        return metric_intervals(self.samples, resamples(self.samples.n, draws, seed), level)

    def compare(self, baseline: EvalReport, *, draws: int = DEFAULT_DRAWS, seed: int = 0,
                level: float = DEFAULT_LEVEL) -> dict[str, Comparison]:
        """This evaluation against ``baseline`` on the same samples, per metric: the paired
        bootstrap interval of the ratio (lower is better) or difference (higher is better);
        empty when either has no :attr:`samples`."""
        a, b = self.samples, baseline.samples
        if a is None or b is None or a.n == 0:
            return {}
        return paired_comparison(a, b, resamples(a.n, draws, seed), level)


# ------------------------------------------------------------------ pure metric functions
def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor,
                   mask: torch.Tensor | None) -> tuple[float, int]:
    """(Σ −log p(x_{t+1} | x_≤t), number of targets) over positions with mask[t] = mask[t+1] = 1."""
    nll, count = next_token_nll_rows(logits, input_ids, mask)
    return float(nll.sum()), int(count.sum())


def next_token_nll_rows(logits: torch.Tensor, input_ids: torch.Tensor,
                        mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row b: (Σ_t −log p(x_{b,t+1} | x_{b,≤t}) in float64, number of targets), over positions
    with mask[b,t] = mask[b,t+1] = 1."""
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
    return torch.where(valid, nll, 0.0).sum(-1), valid.sum(-1)


#: float64 elements of one block of rows in :func:`next_token_nll` (32 MiB)
_NLL_BLOCK_ELEMENTS = 1 << 22


def retrieval_agreement(ref: torch.Tensor, emb: torch.Tensor, *, k: int = 5,
                        n_queries: int | None = None) -> float:
    """Mean |top-k_fp(q) ∩ top-k_q(q)| / k over queries q (the first ``n_queries`` rows).

    Neighbours are ranked by cosine similarity among all rows, the query itself excluded.
    """
    hits = retrieval_hits(ref, emb, k=k, n_queries=n_queries)
    return sum(hits) / len(hits)


def retrieval_hits(ref: torch.Tensor, emb: torch.Tensor, *, k: int = 5,
                   n_queries: int | None = None) -> list[float]:
    """|top-k_fp(q) ∩ top-k_q(q)| / k for each query q (the first ``n_queries`` rows), in order
    (:func:`retrieval_agreement` is their mean)."""
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
    return [len(set(x) & set(y)) / k for x, y in zip(top_a, top_b, strict=True)]


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


# the metrics of each model kind, as ratios of the per-sample sums _Sums collects
def _causal_metrics() -> dict[str, RatioMetric]:
    return {"perplexity": RatioMetric(numerator="nll", denominator="targets", transform=Transform.EXP),
            "perplexity_fp": RatioMetric(numerator="nll_fp", denominator="targets",
                                         transform=Transform.EXP, compare=False),
            "kl": RatioMetric(numerator="kl", denominator="tokens")}


def _encoder_metrics(k: int) -> dict[str, RatioMetric]:
    return {"cosine": RatioMetric(numerator="cos_distance", denominator="count",
                                  transform=Transform.COMPLEMENT, higher_is_better=True, compare=False),
            "cos_distance": RatioMetric(numerator="cos_distance", denominator="count"),
            f"retrieval@{k}": RatioMetric(numerator="hit", denominator="query", higher_is_better=True)}


def _classifier_metrics(labelled: bool) -> dict[str, RatioMetric]:
    metrics = {"agreement": RatioMetric(numerator="agree", denominator="count", higher_is_better=True),
               "kl": RatioMetric(numerator="kl", denominator="count")}
    if labelled:
        metrics["accuracy"] = RatioMetric(numerator="correct", denominator="count",
                                          higher_is_better=True)
    return metrics


class _Sums:
    """Per-sample sums of the metrics, batch by batch (rows in batch order)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.refs: list[torch.Tensor] = []  # encoder embeddings ([B, H], small): kept for retrieval
        self.outs: list[torch.Tensor] = []
        self.cols: dict[str, list[float]] = {}
        self.labelled = True

    def _extend(self, **cols: Any) -> None:
        for name, v in cols.items():
            self.cols.setdefault(name, []).extend(float(x) for x in v.reshape(-1).tolist())

    def add(self, b: Mapping[str, Any], r: torch.Tensor, o: torch.Tensor) -> None:
        if self.kind == "encoder":
            self.refs.append(r)
            self.outs.append(o)
        elif self.kind == ModelKind.CAUSAL_LM:
            self._add_causal(b, r, o)
        else:
            self._add_classifier(b, r, o)

    def _add_causal(self, b: Mapping[str, Any], r: torch.Tensor, o: torch.Tensor) -> None:
        import torch

        mask = b.get("attention_mask")
        nll, targets = next_token_nll_rows(o, b["input_ids"], mask)
        nll_fp, _ = next_token_nll_rows(r, b["input_ids"], mask)
        kl = kl_divergence(r, o)
        valid = mask.bool().to(kl.device) if mask is not None else torch.ones_like(kl, dtype=torch.bool)
        self._extend(kl=torch.where(valid, kl, 0.0).sum(-1), tokens=valid.sum(-1), nll=nll,
                     targets=targets, nll_fp=nll_fp)

    def _add_classifier(self, b: Mapping[str, Any], r: torch.Tensor, o: torch.Tensor) -> None:
        import torch

        r2, o2 = r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1])
        pred = o2.argmax(-1)
        self._extend(agree=pred == r2.argmax(-1), kl=kl_divergence(r2, o2),
                     count=torch.ones(pred.shape[0]))
        y = b.get("labels", b.get("label"))
        self.labelled = self.labelled and y is not None
        if self.labelled:
            self._extend(correct=pred == y.reshape(-1))

    def report(self) -> EvalReport:
        import numpy as np

        cols = {k: np.asarray(v, dtype=np.float64) for k, v in self.cols.items()}
        if self.kind == ModelKind.CAUSAL_LM:
            stats = SampleStats(columns=cols, metrics=_causal_metrics())
            return EvalReport(kind=ModelKind.CAUSAL_LM.value, metrics=stats.values(),
                              error_metric="kl", n_samples=stats.n,
                              n_tokens=int(cols["tokens"].sum()) if stats.n else 0, samples=stats)
        if not self.labelled:
            cols.pop("correct", None)
        stats = SampleStats(columns=cols, metrics=_classifier_metrics(self.labelled))
        return EvalReport(kind="classifier", metrics=stats.values(), error_metric="kl",
                          n_samples=stats.n, samples=stats)


def _encoder_report(refs: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], *, k: int,
                    n_queries: int | None) -> EvalReport:
    import numpy as np
    import torch

    ref, emb = torch.cat(list(refs)), torch.cat(list(outs))
    n = int(ref.shape[0])
    hits = retrieval_hits(ref, emb, k=k, n_queries=n_queries)
    query = np.zeros(n)
    query[:len(hits)] = 1.0
    hit = np.zeros(n)
    hit[:len(hits)] = hits
    stats = SampleStats(columns={"cos_distance": cosine_distance(ref, emb).cpu().numpy(),
                                 "count": np.ones(n), "hit": hit, "query": query},
                        metrics=_encoder_metrics(k))
    return EvalReport(kind="encoder", metrics=stats.values(), error_metric="cos_distance",
                      n_samples=n, samples=stats)
