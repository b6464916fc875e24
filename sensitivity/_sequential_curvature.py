"""``gauss-newton`` and ``fisher`` block by block: one backward per (row, probe), factored over the
transformer blocks, for models read one block at a time and for models already in memory.

The whole-model estimators (:mod:`sensitivity._curvature`) take, per calibration row s and
output probe k, one backward ``g_{s,k} = Jᵀ v_{s,k}`` and reduce each unit's block of it. A
backward factors over the blocks: the cotangent at block i's output, ``δ_{i+1}``, gives block i's
weight gradients and the cotangent at its input, ``δ_i = (∂ block_i / ∂ x)ᵀ δ_{i+1}``. So on a
:class:`~allocator.model.sequential.BlockRunner`:

1. a forward sweep runs each block once and keeps its inputs (hidden states of every batch);
2. the head stage, row by row, computes the output the evaluator compares (logits through the
   final norm and head, or the mean-pooled normalised embedding), draws the cotangents exactly as
   the whole-model path does (same per-batch generator, same row order), scores head units and
   keeps ``δ_L`` per (row, probe): only one row's vocabulary-wide cotangents are alive at a time;
3. a reverse sweep re-runs block L−1 … 0 on its cached inputs with gradients and per (row, probe)
   takes ``(δ_i, unit gradients) = vjp(δ_{i+1})``, scores the block's units, then releases it;
4. a head tied to the input embedding (SmolLM2, Llama-3.2-1B) also gets the embedding's share of
   its gradient, ``Σ_t onehot(id_t) δ_0[t]``, when block 0's input is the embedding lookup itself
   (checked): the unit's linear part ``⟨ΔW, g⟩`` is the sum of the head's and the embedding's.

Deltas are held under ``delta_budget_mb``: the units of a stage in groups, one re-run each, and a
unit whose deltas alone exceed it (a large vocabulary head) in output-row pieces whose linear
parts are summed per (row, probe) before the term is finished (:class:`SplitTerm`).

Against the whole-model passes (one forward and backward of the whole model per group of units)
every block runs forward twice and backward once per (row, probe), whatever the number of
groups; the table equals the whole-model one up to float round-off (tests). In memory on top
of the model: every block's cached inputs (calibration rows × tokens × hidden × blocks) and
``δ`` of one boundary (× probes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.core.errors import InvalidParameterError, ModelError
from allocator.core.rss import bound_heap, trim_heap
from allocator.core.units import unit_weight
from allocator.model.kind import ModelKind
from allocator.model.outputs import forward_outputs, mean_pool_normalize
from sensitivity._base import EstimateContext, UnitCosts
from sensitivity._curvature.output_metric import output_metric, row_cotangents
from sensitivity._curvature.sampling import pair_curvature, row_chunks
from sensitivity._curvature.split import SplitTerm, row_pieces
from sensitivity._deltas import delta_bytes, delta_groups, weight_deltas
from sensitivity._loss import differentiable_attention, unit_block, unit_leaves
from sensitivity._progress import progress_bar

if TYPE_CHECKING:
    import torch

    from allocator.core.units import Unit
    from allocator.model.sequential import BlockInputs, BlockRunner

__all__ = ["NotFactorable", "curvature_by_blocks", "curvature_sequential"]

Term = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
#: (batch index, row or None for the whole batch, stage input with grad) → stage output
Stage = Callable[[int, "int | None", "torch.Tensor"], "torch.Tensor"]


class NotFactorable(InvalidParameterError):
    """The model's backward cannot be factored over its blocks (the message says why)."""


def curvature_sequential(seq: BlockRunner, ctx: EstimateContext, by_block: Mapping[int, Sequence[Unit]],
                         tail: Sequence[Unit], *, term: Term, squared: bool, budget_bytes: int,
                         probes: int, split: SplitTerm | None = None, label: str = "curvature") -> UnitCosts:
    """``(1/T) Σ_s mean_k term(g_{s,k,u}, ΔW_u)`` for every unit of ``ctx.units`` (in blocks
    ``by_block`` or the head ``tail``), backward factored over the blocks (module doc).

    Raises:
        NotFactorable: a model kind other than causal LM / encoder, or a tied head whose
            embedding share cannot be added (no additive ``split``, or block 0's input is not the
            embedding lookup).
    """
    import torch

    kind = str(ctx.model_kind)
    if kind not in (ModelKind.CAUSAL_LM, ModelKind.ENCODER):
        raise NotFactorable(f"block-by-block gauss-newton / fisher support causal LMs and encoders, "
                            f"not model kind {kind!r}; run the estimator on the whole model")
    tied = [u for u in tail if seq.tied_head() and u.module == seq.head_name]
    if tied and (split is None or (not split.additive and _linear_head(seq, kind) is None)):
        raise NotFactorable("the output head is tied to the input embedding, this estimator's term "
                            "is not linear in the gradient and the head is not a plain Linear; "
                            "exclude the head or run the whole model")
    bound_heap()  # a stage's deltas are freed block after block: map them, or the heap keeps them
    acc = _Terms(ctx.units, split)
    for u in tied:
        acc.linear_units.add(acc.where[u.name])
    with progress_bar(len(seq.blocks) + 2, f"{label} blocks", ctx.progress) as bar:
        cached = [list(step.inputs) for step in seq.steps(ctx.batches)]  # loads each block once
        if tied:
            _check_embedding_input(seq, ctx.batches, cached[0] if cached else seq.final_inputs)
        bar.update(1)
        token_rows = bool(tied) and split is not None and not split.additive
        stage = _Stage(ctx=ctx, model=seq.model, term=term, squared=squared, budget_bytes=budget_bytes,
                       split=split, acc=acc, token_rows=token_rows)
        with torch.enable_grad():
            cots, pairs, counts = stage.head(seq, [x.hidden for x in seq.final_inputs], tail, probes)
            trim_heap()
            bar.update(1)
            for i in reversed(range(len(seq.blocks))):
                block = seq.load_block(i)
                try:
                    cots = stage.backward(block_stage(block, cached[i]), [x.hidden for x in cached[i]],
                                          cots, pairs, by_block.get(i, ()))
                finally:
                    seq.release_block(i)
                # each block frees thousands of one row's sub-MiB tensors: without this the heap
                # grew ~20 MiB per block on SmolLM2 (+0.7 GB over its 30 blocks)
                trim_heap()
                bar.update(1)
        for u in tied:
            stage.embedding(u, cots, pairs)
    return _costs(acc, counts, probes, output_metric(kind), len(ctx.options), stage.reruns)


def curvature_by_blocks(model: torch.nn.Module, ctx: EstimateContext, *, term: Term, squared: bool,
                        budget_bytes: int, probes: int, split: SplitTerm | None,
                        label: str) -> UnitCosts:
    """:func:`curvature_sequential` on a model in memory (every block stays loaded).

    Raises:
        NotFactorable: the model has no block list, a unit lies outside the blocks and the head,
            a block unit's deltas alone exceed the budget with no ``split``, the blocks and head
            do not reproduce the model's outputs, or a reason of :func:`curvature_sequential`.
    """
    from allocator.model.sequential import ResidentModel

    try:
        seq = ResidentModel(model, kind=str(ctx.model_kind), device=ctx.device)
    except ModelError as e:
        raise NotFactorable(str(e)) from e
    by_block, tail = split_by_block(seq, ctx.units)
    first = _check_head_reproduces(seq, ctx)
    if first is not None and any(u.module == seq.head_name for u in tail) and seq.tied_head():
        # before the forward sweep: a model that fails it would waste one (the sweep checks every batch)
        _check_embedding_input(seq, [row_chunks(ctx.batches[0], 1)[0]], [first])
    return curvature_sequential(seq, ctx, by_block, tail, term=term, squared=squared,
                                budget_bytes=budget_bytes, probes=probes, split=split, label=label)


def split_by_block(seq: BlockRunner, units: Sequence[Unit]) -> tuple[dict[int, list[Unit]], list[Unit]]:
    """Units per block index, and the units of the output head.

    Raises:
        NotFactorable: a unit neither in a block nor the output head.
    """
    by_block: dict[int, list[Unit]] = {}
    tail: list[Unit] = []
    for u in units:
        idx = next((i for i, b in enumerate(seq.block_names) if u.module.startswith(f"{b}.")), None)
        if idx is not None:
            by_block.setdefault(idx, []).append(u)
        elif u.module == seq.head_name:
            tail.append(u)
        else:
            raise NotFactorable(f"unit {u.name!r} is neither in a block nor the output head; "
                                "exclude it (--exclude) or estimate on the whole model")
    return by_block, tail


def block_stage(block: torch.nn.Module, inputs: Sequence[BlockInputs]) -> Stage:
    """Block ``block`` as a stage: batch b's cached positional / keyword arguments (one row's
    slice of them for a row), input ``x``."""
    def run(b: int, row: int | None, x: torch.Tensor) -> torch.Tensor:
        inp = inputs[b]
        args, kwargs = inp.args, inp.kwargs
        if row is not None:
            n = int(inp.hidden.shape[0])
            args = tuple(_row_of(a, row, n) for a in args)
            kwargs = {k: _row_of(v, row, n) for k, v in kwargs.items()}
        out = block(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return run


def _row_of(value: Any, row: int, rows: int) -> Any:
    """One row of a batch-shaped block argument (attention masks [B, 1, T, T], rotary tables
    [B, T, d]); 1-D tensors (cache positions), row-broadcast ones ([1, T, d]) and non-tensors
    stay as they are."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[row:row + 1] if value.dim() >= 2 and value.shape[0] == rows else value
    if isinstance(value, tuple):
        return tuple(_row_of(v, row, rows) for v in value)
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Job:
    """Units whose deltas are held together for one re-run of a stage; ``rows`` set: one output-row
    piece of a single unit (its linear part only)."""

    units: Sequence[Unit]
    rows: tuple[int, int] | None = None


def _jobs(units: Sequence[Unit], options: Sequence[Any], budget: int, split: SplitTerm | None) -> list[_Job]:
    """Groups of units that fit the budget, then the row pieces of every unit over it (with a
    ``split``; without one such a unit is a group of its own, holding all its deltas)."""
    big = [u for u in units if split is not None and delta_bytes(u, options) > budget]
    small = [u for u in units if u not in big]
    jobs = [_Job(units=[small[j] for j in g]) for g in delta_groups(small, options, budget)] if small else []
    jobs += [_Job(units=[u], rows=r) for u in big for r in row_pieces(u, options, budget)]
    return jobs or [_Job(units=[])]


@dataclasses.dataclass(eq=False)
class _Terms:
    """Per unit: finished terms per (row, probe) in order, or (split / tied units) linear parts
    summed per (row, probe) across pieces and stages, finished at the end."""

    units: Sequence[Unit]
    split: SplitTerm | None
    where: dict[str, int] = dataclasses.field(init=False)
    finished: dict[int, list[torch.Tensor]] = dataclasses.field(init=False)
    linear: dict[int, list[torch.Tensor]] = dataclasses.field(init=False)
    linear_units: set[int] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.where = {u.name: i for i, u in enumerate(self.units)}
        self.finished = {i: [] for i in range(len(self.units))}
        self.linear = {}
        self.linear_units = set()

    def add_linear(self, unit: Unit, pair: int, value: torch.Tensor) -> None:
        """Add ``value`` to the unit's linear part of (row, probe) number ``pair``."""
        import torch

        parts = self.linear.setdefault(self.where[unit.name], [])
        v = value.detach().cpu()
        while len(parts) < pair:  # pairs that had no share yet (a token outside a piece)
            parts.append(torch.zeros_like(v))
        if pair == len(parts):
            parts.append(v.clone())
        else:
            parts[pair] += v

    def stacked(self, i: int) -> torch.Tensor:
        import torch

        if i in self.linear_units:
            if self.split is None:  # unreachable: linear units exist only with a split
                raise InvalidParameterError("a linear part without a term to finish it")
            return self.split.finish(torch.stack(self.linear[i]))
        return torch.stack(self.finished[i])


@dataclasses.dataclass(kw_only=True, eq=False)
class _Stage:
    """Backwards through the stages (the head, each block, the tied embedding)."""

    ctx: EstimateContext
    model: torch.nn.Module
    term: Term
    squared: bool
    budget_bytes: int
    split: SplitTerm | None
    acc: _Terms
    reruns: int = 0
    #: keep each (row, probe)'s head gradient at the row's own tokens: a tied head's term that
    #: is not linear in the gradient needs it beside the embedding's share (:meth:`embedding`)
    token_rows: bool = False
    #: per batch, aligned with its (row, probe) pairs: (sorted token ids, head gradient at them)
    head_at_tokens: list[list[tuple[torch.Tensor, torch.Tensor]]] = dataclasses.field(default_factory=list)

    def head(self, seq: BlockRunner, final: Sequence[torch.Tensor], tail: Sequence[Unit],
             probes: int) -> tuple[list[list[torch.Tensor]], list[list[tuple[int, int]]], list[int]]:
        """Row by row: the cotangents drawn at the output, the head units scored, and per batch
        the (row, probe) pairs of rows with counted positions, their cotangents at the head's
        input and the rows' position counts.

        A causal LM's plain linear head gets its gradient rows formed directly,
        ``g[lo:hi] = v[:, lo:hi]ᵀ x`` (:func:`linear_weight_rows`), not by autograd: a job holding
        one row piece then costs that piece, not a vocabulary-wide weight gradient (1.05 GB at a
        128k vocabulary and hidden 2048) per (row, probe)."""
        import torch

        kind, metric = str(self.ctx.model_kind), output_metric(self.ctx.model_kind)
        pairs: list[list[tuple[int, int]]] = [[] for _ in final]
        cots: list[list[torch.Tensor]] = [[] for _ in final]
        counts: list[int] = []
        direct = _linear_head(seq, kind)
        self.head_at_tokens = [[] for _ in final]
        for n, job in enumerate(self._stage_jobs(tail)):
            first = n == 0
            with self._held(job, leaves=direct is None) as (deltas, leaves, index), \
                    torch.set_grad_enabled(first or direct is None):
                pair = 0
                for b, batch in enumerate(self.ctx.batches):
                    gen = self.ctx.batch_generator(b)  # drawn as the whole-model path draws them
                    for r, sub in enumerate(row_chunks(batch, 1)):
                        h = final[b][r:r + 1].detach().requires_grad_(first)
                        x = _head_input(seq, h)
                        out = _outputs(seq, h, sub, kind) if direct is None else direct(x)
                        drawn, row_counts = row_cotangents(out, sub, kind, metric, probes, gen)
                        if row_counts[0] == 0:
                            continue
                        if first:
                            counts.append(row_counts[0])
                        for k in range(probes):
                            cot = drawn[0][k].unsqueeze(0)
                            grads = self._vjp(out, h if first else None, leaves, cot,
                                              retain=k + 1 < probes) if first or direct is None else [None]
                            dh = grads[0]
                            if first and dh is not None:
                                pairs[b].append((r, k))
                                cots[b].append(dh[0].detach())
                                if self.token_rows and direct is not None:
                                    ids = torch.unique(sub["input_ids"][0].to(cot.device))
                                    self.head_at_tokens[b].append(
                                        (ids, linear_weight_at(cot, x.detach(), ids)))
                            if direct is None:
                                self._score(job, grads[1:], index, deltas, pair)
                            else:
                                lo, hi = job.rows if job.rows is not None else (0, int(cot.shape[-1]))
                                g_rows = linear_weight_rows(cot, x.detach(), lo, hi)
                                for u, d in zip(job.units, deltas, strict=True):
                                    self._score_rows(job, u, unit_block(g_rows, u), d, pair)
                            pair += 1
                        del out, drawn, x
            trim_heap()  # before the next piece's deltas
        return cots, pairs, counts

    def backward(self, run: Stage, xs: Sequence[torch.Tensor], cots: Sequence[Sequence[torch.Tensor]],
                 pairs: Sequence[Sequence[tuple[int, int]]],
                 units: Sequence[Unit]) -> list[list[torch.Tensor]]:
        """Per batch and (row, probe): the vjp of the row's cotangent at the stage output gives
        the row's cotangent at the stage input (returned) and the gradients of ``units`` (scored)."""
        import torch

        back: list[list[torch.Tensor]] = [[] for _ in xs]
        for n, job in enumerate(self._stage_jobs(units)):
            with self._held(job) as (deltas, leaves, index):
                pair = 0
                for b, x_b in enumerate(xs):
                    # one row at a time: a backward through a batch's graph costs every row
                    for r in dict.fromkeys(r for r, _ in pairs[b]):
                        mine = [j for j, (rr, _) in enumerate(pairs[b]) if rr == r]
                        x = x_b[r:r + 1].detach().requires_grad_(n == 0)
                        with differentiable_attention():
                            y = run(b, r, x)
                        for m, j in enumerate(mine):
                            grads = self._vjp(y, x if n == 0 else None, leaves,
                                              cots[b][j].reshape(y.shape), retain=m + 1 < len(mine))
                            if n == 0:
                                dx = grads[0]
                                back[b].append(torch.zeros_like(x[0]) if dx is None else dx[0].detach())
                            self._score(job, grads[1:], index, deltas, pair)
                            pair += 1
                        del y
        return back

    def embedding(self, unit: Unit, cots: Sequence[Sequence[torch.Tensor]],
                  pairs: Sequence[Sequence[tuple[int, int]]]) -> None:
        """The tied unit's embedding share: ``⟨ΔW, Σ_t onehot(id_t) δ_0[t]⟩`` per (row, probe),
        added to its linear part. Only the rows of tokens in the calibration data have a share:
        their deltas are taken in chunks under the budget (RTN quantizes rows alone).

        A term that is not linear in the gradient (the diagonal Fisher's ``Σ g² ΔW²``) needs the
        whole gradient ``g = g_head + g_emb`` on those rows: the head stage kept ``g_head`` at each
        row's tokens, and the share added is ``linear(g_head + g_emb) − linear(g_head)`` on the
        rows the lookup reaches (elsewhere ``g_emb = 0`` and the head stage's term stands)."""
        import torch

        if self.split is None:  # unreachable: curvature_sequential refuses a tied head without one
            raise NotFactorable("a tied head needs an additive term")
        linear = self.split.linear
        weight = unit_weight(self.model, unit)
        ids = [batch["input_ids"].to(weight.device) for batch in self.ctx.batches]
        vocab = torch.unique(torch.cat([i.reshape(-1) for i in ids]))  # sorted
        per_row = max(1, delta_bytes(unit, self.ctx.options) // max(1, int(unit.shape[0])))
        step = max(1, self.budget_bytes // per_row)
        for start in range(0, len(vocab), step):
            chunk = vocab[start:start + step]
            delta = weight_deltas(unit, weight, self.ctx.options, self.ctx.quantizer,
                                  squared=self.squared, rows=chunk)
            self.reruns += 1
            pair = 0
            for b, batch_ids in enumerate(ids):
                for j, ((r, _), cot) in enumerate(zip(pairs[b], cots[b], strict=True)):
                    tokens = batch_ids[r]
                    keep = torch.isin(tokens, chunk)
                    if bool(keep.any()):
                        # the lookup's gradient: each token's δ summed on its row of the chunk
                        local = torch.searchsorted(chunk, tokens[keep])
                        seen, where = torch.unique(local, return_inverse=True)
                        g_rows = torch.zeros((len(seen), cot.shape[-1]), dtype=cot.dtype, device=cot.device)
                        g_rows.index_add_(0, where, cot[keep])
                        d = delta[:, seen]
                        if self.token_rows:
                            at, g_head = self.head_at_tokens[b][j]
                            h = g_head[torch.searchsorted(at, chunk[seen])].to(g_rows.dtype)
                            self.acc.add_linear(unit, pair, linear(h + g_rows, d) - linear(h, d))
                        else:
                            self.acc.add_linear(unit, pair, linear(g_rows, d))
                    pair += 1
            del delta

    # --- helpers ------------------------------------------------------------------------------
    def _stage_jobs(self, units: Sequence[Unit]) -> list[_Job]:
        jobs = _jobs(units, self.ctx.options, self.budget_bytes, self.split)
        self.reruns += len(jobs)
        return jobs

    def _held(self, job: _Job, *, leaves: bool = True) -> Any:
        return _HeldDeltas(self, job, leaves=leaves)

    def _vjp(self, out: torch.Tensor, x: torch.Tensor | None, leaves: Sequence[torch.Tensor],
             cot: torch.Tensor, *, retain: bool) -> list[torch.Tensor | None]:
        import torch

        inputs = ([x] if x is not None else []) + list(leaves)
        if not inputs:
            return [None]
        grads: list[torch.Tensor | None] = list(torch.autograd.grad(
            out, inputs, grad_outputs=cot.to(out.dtype), retain_graph=retain, allow_unused=True))
        return grads if x is not None else [None, *grads]

    def _score(self, job: _Job, grads: Sequence[torch.Tensor | None], index: Sequence[int],
               deltas: Sequence[torch.Tensor], pair: int) -> None:
        import torch

        for u, k, d in zip(job.units, index, deltas, strict=True):
            g = grads[k]
            g = torch.zeros_like(unit_weight(self.model, u)) if g is None else g.detach()
            block = unit_block(g, u)
            if job.rows is not None:
                block = block[job.rows[0]:job.rows[1]]
            self._score_rows(job, u, block, d, pair)

    def _score_rows(self, job: _Job, u: Unit, block: torch.Tensor, d: torch.Tensor, pair: int) -> None:
        """Score the unit's gradient ``block``, already cut to the job's rows."""
        i = self.acc.where[u.name]
        if job.rows is not None or i in self.acc.linear_units:
            if self.split is None:  # unreachable: pieces and tied units need a split
                raise NotFactorable("a unit in row pieces needs an additive term")
            self.acc.linear_units.add(i)
            self.acc.add_linear(u, pair, self.split.linear(block, d))
        else:
            self.acc.finished[i].append(self.term(block, d))


class _HeldDeltas:
    """A job's deltas and gradient leaves for one re-run (``requires_grad`` restored after)."""

    def __init__(self, stage: _Stage, job: _Job, *, leaves: bool = True) -> None:
        self.stage, self.job, self.want_leaves = stage, job, leaves

    def __enter__(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        ctx, units = self.stage.ctx, self.job.units
        model = self.stage.model
        self.deltas = [weight_deltas(u, unit_weight(model, u), ctx.options, ctx.quantizer,
                                     squared=self.stage.squared, rows=self.job.rows) for u in units]
        self.leaves, index = unit_leaves(model, units) if units else ([], [])
        if not self.want_leaves:  # gradients formed without autograd: nothing to differentiate
            self.leaves = []
        self.flags = [t.requires_grad for t in self.leaves]
        for t in self.leaves:
            t.requires_grad_(True)
        return self.deltas, self.leaves, index

    def __exit__(self, *exc: object) -> None:
        for t, f in zip(self.leaves, self.flags, strict=True):
            t.requires_grad_(f)
        self.deltas.clear()


def _outputs(seq: BlockRunner, h: torch.Tensor, batch: Mapping[str, Any], kind: str) -> torch.Tensor:
    """What the evaluator compares, from the last block's output ``h``."""
    x = _head_input(seq, h)
    if kind == ModelKind.CAUSAL_LM:
        head = seq.head()
        if head is None:
            raise NotFactorable("the model has no output head to compute logits from")
        return head(x)
    return mean_pool_normalize(x, batch.get("attention_mask"))


def _head_input(seq: BlockRunner, h: torch.Tensor) -> torch.Tensor:
    """The last block's output ``h`` through the final norm, if the model has one."""
    norm = seq.final_norm()
    return norm(h) if norm is not None else h


def _linear_head(seq: BlockRunner, kind: str) -> torch.nn.Linear | None:
    """A causal LM's output head when it is a plain ``nn.Linear`` (logits = ``x Wᵀ + b``, checked
    to be the model's outputs by :func:`_check_head_reproduces`), else None."""
    import torch

    head = seq.head() if kind == ModelKind.CAUSAL_LM else None
    return head if type(head) is torch.nn.Linear else None


def linear_weight_rows(cot: torch.Tensor, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of the weight gradient of ``y = x Wᵀ + b`` for the output cotangent
    ``v``: ``∂⟨v, y⟩/∂W[lo:hi] = v[..., lo:hi]ᵀ x`` summed over tokens ([hi − lo, in])."""
    return cot[..., lo:hi].reshape(-1, hi - lo).t() @ x.reshape(-1, x.shape[-1])


def linear_weight_at(cot: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (indices) of the weight gradient of ``y = x Wᵀ + b`` for the output
    cotangent ``v``: ``v[..., rows]ᵀ x`` summed over tokens ([len(rows), in])."""
    return cot[..., rows].reshape(-1, len(rows)).t() @ x.reshape(-1, x.shape[-1])


def _check_embedding_input(seq: BlockRunner, batches: Sequence[Mapping[str, Any]],
                           first: Sequence[BlockInputs]) -> None:
    """Block 0's input must be the embedding lookup itself for the lookup's gradient to be
    ``Σ_t onehot(id_t) δ_0[t]`` (no scaling, position embeddings or norm in between)."""
    import torch

    emb = seq.input_embedding()
    weight = getattr(emb, "weight", None)
    with torch.no_grad():
        for batch, inp in zip(batches, first, strict=True):
            ids = batch.get("input_ids")
            # the plain lookup of the weight, not the module: an embedding module may scale it
            if not isinstance(weight, torch.Tensor) or not isinstance(ids, torch.Tensor) or not torch.equal(
                    torch.nn.functional.embedding(ids.to(inp.hidden.device), weight), inp.hidden):
                raise NotFactorable("the first block's input is not the tied embedding's lookup, so the "
                                    "head's gradient through it cannot be formed block by block; "
                                    "run the estimator on the whole model")


def _check_head_reproduces(seq: BlockRunner, ctx: EstimateContext) -> BlockInputs | None:
    """The blocks, final norm and head must give the model's own outputs (no soft-capping or
    scaling outside them): checked on the first calibration row, whose block-0 inputs are
    returned (None without calibration data)."""
    import torch

    if not ctx.batches:
        return None
    sub = row_chunks(ctx.batches[0], 1)[0]
    kind = str(ctx.model_kind)
    with torch.no_grad():
        want = forward_outputs(seq.model, sub, kind)
        h = seq.capture([sub])[0]
        x, inp = h.hidden, h
        for block in seq.blocks:
            out = block(x, *inp.args, **inp.kwargs)
            x = out[0] if isinstance(out, tuple) else out
        got = _outputs(seq, x, sub, kind)
    scale = float(want.abs().max()) if want.numel() else 0.0
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * max(scale, 1e-30)):
        raise NotFactorable("the model's blocks, final norm and head do not reproduce its outputs; "
                            "run the estimator on the whole model")
    return h


def _costs(acc: _Terms, counts: Sequence[int], probes: int, metric: str, width: int,
           reruns: int) -> UnitCosts:
    """Per-unit sample means and standard errors (:func:`pair_curvature`)."""
    n_units = len(acc.units)
    mean, sem = np.empty((n_units, width)), np.empty((n_units, width))
    info: dict[str, Any] = {}
    for i in range(n_units):
        est = pair_curvature(acc.stacked(i).reshape(len(counts), probes, width), counts, metric)
        mean[i], sem[i] = est.mean, est.sem
        info = est.info()
    return UnitCosts(cost=mean, cost_std=sem, info={**info, "by_blocks": True, "stage_reruns": reruns})
