"""Consumer palettes: the options and tie groups a quantization tool stores exactly (``--for``).

A :class:`Palette` names one export target (``allocator.export.EXPORTERS``) and gives

* ``options`` — catalogue labels (``allocator.core.formats``) that the target's exporter accepts
  without ``--lossy`` and whose size in the bitalloc catalogue equals the target's own accounting
  (GPTQModel adds its ``g_idx``, 32/out bits per weight, when the shapes are known);
* a tie rule (unit name → tie id) for settings the target holds once for several modules (HQQ:
  one per linear tag; llama.cpp: one per GGUF tensor), combined with the runtime-fusion ties
  (q/k/v, gate/up) where the target enforces them;
* a drop rule (unit name → why the target never quantizes it) and a per-unit option filter
  (block / group divisibility), applied when the weight shapes are known.

:func:`apply_palette` turns a cost table into the target's table: rows restricted to the
palette, sizes in the target's accounting, ``tie`` column, ``metadata["consumer"]``. A plan
solved on it exports to the target exactly, within the budget of the target's own accounting.
User documentation: ``docs/exports.md`` ("Plans made for a consumer").
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError, UnknownNameError
from allocator.core.formats import GGUF_TYPES, FormatKind, QuantFormat, parse_format
from allocator.core.table import CostTable
from allocator.export import EXPORTERS, fused_name, gguf_setting, int_setting, model_info, skip_setting
from allocator.export.hqq import name_to_linear_tag
from allocator.export.llamacpp import detect_arch, gguf_tensor_name

if TYPE_CHECKING:
    from allocator.core.table import CostTable
    from allocator.export import Setting

__all__ = ["PALETTES", "Palette", "apply_palette", "palette_for", "palette_options", "table_for",
           "table_for_model"]

#: (out_features, in_features) of a unit's weight
Shape = tuple[int, int]
_EXPERT = re.compile(r"\.experts\.\d+\.")
_GROUP_UNIT = re.compile(r"\[g=\d+\]$")


@dataclass(frozen=True, kw_only=True)
class Palette:
    """What one consumer stores exactly; see the module docstring."""

    name: str
    options: tuple[str, ...]
    doc: str  #: one line: what the options are and why others are left out
    tie_doc: str  #: one line: the tie rule
    accounting: str  #: the consumer's bits-per-weight formula, as the exporter reports it
    #: runtime fusion (q/k/v, gate/up share one setting) is enforced by the exporter
    fused: bool = False
    #: the accounting needs each unit's shape (``apply_palette`` refuses a table without them)
    needs_shapes: bool = False
    tie: Callable[[str, frozenset[str]], str | None] = lambda unit, units: None
    drop: Callable[[str, frozenset[str]], str | None] = lambda unit, units: None
    allowed: Callable[[QuantFormat, Shape | None], bool] = lambda fmt, shape: True

    def bits_per_weight(self, option: str, shape: Shape | None) -> float:
        """The consumer's own bits per weight of ``option`` (the exporter's accounting)."""
        import importlib

        module = importlib.import_module(EXPORTERS[self.name])
        bpw: Callable[[Setting, Shape | None], float] = getattr(module, _BPW[self.name])
        return bpw(_setting(parse_format(option)), shape)


_BPW = {"gptqmodel": "gptq_bpw", "autoround": "autoround_bpw", "hqq": "hqq_bpw",
        "llamacpp": "gguf_bpw", "llmcompressor": "pack_quantized_bpw",
        "torchao": "torchao_bpw"}


def _setting(fmt: QuantFormat) -> Setting:
    if fmt.kind is FormatKind.FLOAT:
        return skip_setting(fmt.name)
    if fmt.kind is FormatKind.GGUF:
        return gguf_setting(fmt.name)
    return int_setting(fmt.bits, fmt.group_size or -1, fmt.symmetric)


def _ints(bits: tuple[int, ...], groups: tuple[str, ...], kind: str) -> tuple[str, ...]:
    return tuple(f"int{b}-{g}-{kind}" for b in bits for g in groups)


def _group_divides(fmt: QuantFormat, shape: Shape | None) -> bool:
    g = fmt.group_size
    return shape is None or fmt.kind is not FormatKind.INT or g in (None, -1) or shape[1] % g == 0


def _gguf_rows(fmt: QuantFormat, shape: Shape | None) -> bool:
    """llama.cpp falls back to another type when a row is not a multiple of the block."""
    if shape is None or fmt.kind is not FormatKind.GGUF:
        return True
    return shape[1] % GGUF_TYPES[fmt.name].block == 0


def _hqq_tie(unit: str, units: frozenset[str]) -> str | None:
    return "hqq:" + name_to_linear_tag(unit)


def _hqq_drop(unit: str, units: frozenset[str]) -> str | None:
    if unit.split(".")[-1] == "lm_head":
        return "HQQ never quantizes lm_head"
    return None


def _gguf_arch(units: frozenset[str]) -> tuple[str, int]:
    n_blocks = 1 + max((int(m) for n in units for m in re.findall(r"\.(\d+)\.", n)), default=0)
    return detect_arch(units), n_blocks


def _gguf_tensor(unit: str, units: frozenset[str]) -> str | None:
    arch, n_blocks = _gguf_arch(units)
    return gguf_tensor_name(unit, arch, n_blocks)


def _llamacpp_tie(unit: str, units: frozenset[str]) -> str | None:
    t = _gguf_tensor(unit, units)
    return None if t is None else "gguf:" + t


def _llamacpp_drop(unit: str, units: frozenset[str]) -> str | None:
    if _EXPERT.search(unit):
        return "GGUF stacks all experts of a layer in one tensor"
    if _gguf_tensor(unit, units) is None:
        return f"no GGUF tensor in the {_gguf_arch(units)[0]!r} name map"
    return None


_GROUPS = ("g32", "g64", "g128")
#: Int4WeightOnlyConfig's group sizes (allocator.export.torchao.INT4_GROUP_SIZES); Intx takes
#: any PerGroup, offered at the same four
_TORCHAO_INT4_GROUPS = ("g32", "g64", "g128", "g256")

#: consumer name → palette (one per export target)
PALETTES: dict[str, Palette] = {p.name: p for p in (
    Palette(
        name="gptqmodel",
        options=(*_ints((2, 3, 4, 8), _GROUPS, "sym-gptq"), "fp16"),
        doc="int2/3/4/8 at group 32/64/128, symmetric, GPTQ checkpoint storage (5-7 bits need "
            "format gptq_p, which only GPTQModel loads; asymmetric is left to vLLM-free setups)",
        tie_doc="q/k/v and gate/up share one setting (vLLM qkv_proj / gate_up_proj)",
        accounting="b + (16 + b)/g + 32/out (fp16 scales, b-bit zeros, int32 g_idx)",
        fused=True, needs_shapes=True),
    Palette(
        name="autoround",
        options=(*_ints((2, 3, 4, 8), _GROUPS, "sym-gptq"), "fp16"),
        doc="int2/3/4/8 at group 32/64/128, symmetric (AutoScheme counts a b-bit zero: -gptq)",
        tie_doc="q/k/v and gate/up share one setting (vLLM fusion)",
        accounting="b + (16 + b)/g", fused=True),
    Palette(
        name="llmcompressor",
        options=(*_ints((2, 4, 8), _GROUPS, "sym"), *_ints((2, 4, 8), _GROUPS, "asym-gptq"),
                 "int4-ch-sym", "int8-ch-sym", "fp16"),
        doc="int2/4/8 per group 32/64/128 (symmetric; asymmetric with the packed b-bit zero = "
            "-gptq) and int4/int8 per channel; 3/5/6/7 bits pack into 3.2/5.33/6.4/8 bits",
        tie_doc="q/k/v and gate/up share one setting (vLLM fusion)",
        accounting="32/floor(32/b) + 16/g sym, + (16 + 32/floor(32/b))/g asym", fused=True),
    Palette(
        name="hqq",
        options=(*_ints((2, 4, 8), (*_GROUPS, "ch"), "asym"), "fp16"),
        doc="nbits 2/4/8 at group 32/64/128 or per channel, always with a zero point (3 bits "
            "pack as 3.2, 5/6 as 8); lm_head is left out (HQQ never quantizes it)",
        tie_doc="one setting per linear tag: every layer's self_attn.q_proj shares one setting",
        accounting="packed nbits + 32/g", tie=_hqq_tie, drop=_hqq_drop),
    Palette(
        name="llamacpp",
        options=("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0",
                 "fp16"),
        doc="K-quants q2_K..q6_K (rows a multiple of 256) and legacy q4_0..q8_0 (rows a multiple "
            "of 32) with their block bpw; codebook types (iq*, tq*) have no RTN emulation",
        tie_doc="one setting per GGUF tensor; units with no GGUF tensor (BERT pooler) and "
                "per-expert units are left out",
        accounting="fixed bpw of the ggml type (q4_K 4.5, q8_0 8.5, ...)",
        tie=_llamacpp_tie, drop=_llamacpp_drop, allowed=_gguf_rows),
    Palette(
        name="torchao",
        options=(*_ints((4,), _TORCHAO_INT4_GROUPS, "asym"), "int8-ch-sym", "int8-ch-asym",
                 *_ints((8,), _TORCHAO_INT4_GROUPS, "sym"),
                 *_ints((8,), _TORCHAO_INT4_GROUPS, "asym"), "fp16"),
        doc="Int4WeightOnlyConfig int4 at group 32/64/128/256 (packed, asymmetric: the only int4 "
            "it has) and IntxWeightOnlyConfig int8 per channel or per group 32/64/128/256 (group "
            "dividing the input features); Intx's default layout stores int1-int7 unpacked in "
            "int8, so they would cost 8 bits",
        tie_doc="q/k/v and gate/up share one setting (vLLM fusion)",
        accounting="int4: 4 + 32/g (bf16 scale and zero); int8: 8 + 16/g (+16/g asym)",
        fused=True, allowed=_group_divides),
)}


def palette_for(name: str) -> Palette:
    """The palette of consumer ``name``.

    Raises:
        UnknownNameError: not a consumer.
    """
    try:
        return PALETTES[name]
    except KeyError:
        raise UnknownNameError(f"unknown consumer {name!r} for --for; choose one of "
                               f"{', '.join(PALETTES)}") from None


def _ties(palette: Palette, units: list[str]) -> dict[str, str]:
    """unit → tie id: the consumer's groups joined with runtime fusion where it applies."""
    present = frozenset(units)
    keys: dict[str, list[str]] = defaultdict(list)
    for u in units:
        t = palette.tie(u, present)
        if t is not None:
            keys[t].append(u)
        f = fused_name(u) if palette.fused else None
        if f is not None:
            keys["fused:" + f].append(u)
    parent = {u: u for u in units}

    def root(u: str) -> str:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    group_key: dict[str, str] = {}
    for members in keys.values():
        for m in members[1:]:
            a, b = root(members[0]), root(m)
            if a != b:
                parent[b] = a
    members_of: dict[str, list[str]] = defaultdict(list)
    for u in units:
        members_of[root(u)].append(u)
    for key, members in sorted(keys.items()):
        group_key.setdefault(root(members[0]), key)
    return {u: group_key[root(u)] for u in units if len(members_of[root(u)]) > 1}


def _outside_groups(palette: Palette, kept: list[str], others: frozenset[str]) -> dict[str, str]:
    """Units whose tie group (consumer rule or fusion) also holds a module outside the table: the
    consumer would need that module at the unit's setting, which no plan of the table sets."""
    if not others:
        return {}
    ties = _ties(palette, kept + sorted(others))
    outside: dict[str, str] = {}
    for m in sorted(others):
        if m in ties:
            outside.setdefault(ties[m], m)
    return {u: f"shares one {palette.name} setting with {outside[ties[u]]!r}, which is not in the "
               "table" for u in kept if u in ties and ties[u] in outside}


def apply_palette(table: CostTable, name: str, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                  model_names: Iterable[str] | None = None) -> CostTable:
    """``table`` as consumer ``name`` stores it (see the module docstring).

    ``shapes`` maps units to weight shapes (out, in, ...): with them, sizes follow the
    consumer's accounting exactly and per-unit constraints (block/group divisibility) apply.
    ``model_names`` (the model's weight modules): units whose tie group also holds a module
    left out of the table (``--include``/``--exclude``) are left out too, since the consumer
    would need that module at their setting.

    Raises:
        UnknownNameError: unknown consumer.
        InvalidParameterError: the table was made for another consumer, has column-group
            units, lacks shapes the accounting needs, or holds none of the palette's options.
    """
    palette = palette_for(name)
    made_for = table.metadata.get("consumer")
    if made_for is not None and made_for != name:
        raise InvalidParameterError(f"the table was built --for {made_for}, not {name}; rebuild "
                                    f"it with estimate --for {name}, or solve it --for {made_for}")
    groups = [u for u in table.units if _GROUP_UNIT.search(u)]
    if groups:
        raise InvalidParameterError(f"unit {groups[0]!r} is a column group; {name} sets one "
                                    "setting per module: estimate without --groups")
    if palette.needs_shapes and shapes is None:
        raise InvalidParameterError(f"{name}'s accounting ({palette.accounting}) needs each unit's "
                                    f"shape; build the table with estimate --for {name}")
    units = frozenset(table.units)
    dropped = {u: why for u in table.units if (why := palette.drop(u, units)) is not None}
    if model_names is not None:
        dropped.update(_outside_groups(palette, [u for u in table.units if u not in dropped],
                                       frozenset(model_names) - units))
    if len(dropped) == len(units):
        first = next(iter(dropped.items()))
        raise InvalidParameterError(f"{name} can hold none of the table's units ({first[0]!r}: "
                                    f"{first[1]})")
    df = table.df[~table.df["unit"].isin(list(dropped)) & table.df["option"].isin(palette.options)]
    if df.empty or not any(parse_format(str(o)).is_quantized for o in df["option"].unique()):
        raise InvalidParameterError(f"the table has none of {name}'s quantized options "
                                    f"({', '.join(palette.options[:4])}, ...); estimate it "
                                    f"--for {name}")
    shape2: dict[str, Shape] = {}
    for u, s in (shapes or {}).items():
        if len(s) >= 2:
            n_in = 1
            for d in s[1:]:
                n_in *= int(d)
            shape2[u] = (int(s[0]), n_in)
    missing = sorted(set(df["unit"]) - set(shape2)) if shapes is not None else []
    if missing:
        raise InvalidParameterError(f"no weight shape for unit {missing[0]!r}; pass the shapes "
                                    "of the model the table was estimated on")
    keep = [palette.allowed(parse_format(str(o)), shape2.get(str(u)))
            for u, o in zip(df["unit"], df["option"], strict=True)]
    df = df[keep].copy()
    kept_units = list(dict.fromkeys(df["unit"]))
    ties = _ties(palette, kept_units)
    df["tie"] = [ties.get(str(u), "") for u in df["unit"]]
    # a tie group offers only the options all its members can take
    opts = df.groupby("unit")["option"].agg(frozenset)
    common: dict[str, frozenset[str]] = {}
    for u, t in ties.items():
        common[t] = common[t] & opts[u] if t in common else opts[u]
    df = df[[t == "" or o in common[t] for t, o in zip(df["tie"], df["option"], strict=True)]]
    if shapes is not None:
        df = df.copy()
        df["size_bits"] = [palette.bits_per_weight(str(o), shape2[str(u)]) * float(p)
                           for u, o, p in zip(df["unit"], df["option"], df["params"], strict=True)]
    meta: dict[str, Any] = {**table.metadata, "consumer": name}
    if dropped:
        meta["consumer_dropped"] = dropped
    return CostTable(df, meta)


def table_for(table: CostTable, name: str | None) -> CostTable:
    """The table a ``--for NAME`` solve uses: itself when made for ``name`` (or no ``--for``),
    refused when made for another consumer, else restricted by :func:`apply_palette`."""
    if name is None or table.metadata.get("consumer") == name:
        return table
    return apply_palette(table, name)


def palette_options(name: str | None, options: str | None, groups: int | None = None) -> str | None:
    """The option spec an estimate uses: ``options``, or consumer ``name``'s palette.

    Raises:
        InvalidParameterError: ``--for`` with ``--options`` or ``--groups`` (the consumer fixes
            the options and sets one setting per module).
    """
    if name is None:
        return options
    palette = palette_for(name)
    if options is not None:
        raise InvalidParameterError(f"--for {name} sets the options ({', '.join(palette.options[:3])}"
                                    ", ...); drop --options")
    if groups is not None:
        raise InvalidParameterError(f"--for {name}: {name} sets one setting per module; drop --groups")
    return ",".join(palette.options)


def table_for_model(table: CostTable, name: str | None, model: str) -> CostTable:
    """:func:`apply_palette` with the shapes of ``model`` (a local HF dir, ``minilm``,
    ``tiny-llama``), built on the meta device; ``table`` unchanged when ``name`` is None."""
    if name is None:
        return table

    info = model_info(model, table.units)
    return apply_palette(table, name, shapes=info.shapes, model_names=info.names)
