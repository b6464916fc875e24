"""The format catalogue: what an option label means and how many bits it stores.

Option labels are the strings in a cost table's ``option`` column:

* ``fp16`` / ``bf16`` — kept unquantized (16 bits per weight, no overhead).
* ``int{b}-g{g}-{sym|asym}`` — integer RTN/GPTQ formats, ``b`` in 2..8, per-group of ``g`` input
  channels; ``int{b}-ch-{sym|asym}`` is per output channel. A ``-gptq`` suffix selects the GPTQ
  checkpoint storage convention instead of the default fp16 scale (+ fp16 zero).
* GGUF tensor types (``q4_K``, ``q8_0``, ``iq2_xs`` ...) with the exact bits per weight of their
  ``ggml-common.h`` block structs.

Storage accounting (bits per weight, b = payload bits, g = group size, ``in`` = input features):

========================  =======================  ==============================================
convention                symmetric                asymmetric
========================  =======================  ==============================================
``scale-zero-fp16``       b + 16/g                 b + 32/g   (fp16 scale, fp16 zero per group)
``gptq``                  b + (16 + b)/g           b + (16 + b)/g (zeros packed at b bits, stored
                                                   even when symmetric)
per channel (``ch``)      b + 16/in                b + 32/in
GGUF                      fixed per type (e.g. q4_K = 144 bytes / 256 weights = 4.5)
========================  =======================  ==============================================

``size_bits`` of an option for a unit is ``params × bits_per_weight``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from allocator.core.errors import InvalidParameterError, UnknownNameError

__all__ = [
    "DEFAULT_OPTIONS",
    "DENSE_OPTIONS",
    "GGUF_TYPES",
    "FormatKind",
    "QuantFormat",
    "StorageConvention",
    "check_group_columns",
    "parse_format",
    "parse_options",
]


class FormatKind(StrEnum):
    """What family an option belongs to."""

    FLOAT = "float"  #: unquantized (fp16/bf16)
    INT = "int"  #: uniform integer grid, per group or per channel
    GGUF = "gguf"  #: a llama.cpp tensor type with fixed bits per weight


class StorageConvention(StrEnum):
    """How scale/zero overhead is counted for integer formats (see the module docstring)."""

    SCALE_ZERO_FP16 = "scale-zero-fp16"
    GPTQ = "gptq"


@dataclass(frozen=True, kw_only=True)
class GgufType:
    """A ggml tensor type: ``block`` weights stored in ``block_bytes`` bytes."""

    name: str
    block: int
    block_bytes: int
    payload_bits: int
    #: RTN emulation used to fake-quantize with this type: (bits, group, symmetric), or None
    #: where the type is a codebook/trellis format that a uniform grid does not model.
    emulation: tuple[int, int, bool] | None

    @property
    def bpw(self) -> float:
        return self.block_bytes * 8 / self.block


def _g(name: str, block: int, nbytes: int, bits: int, emu: tuple[int, int, bool] | None) -> GgufType:
    return GgufType(name=name, block=block, block_bytes=nbytes, payload_bits=bits, emulation=emu)


#: Exact block layouts from ggml-common.h. K-quant emulations use the sub-block size as the group.
GGUF_TYPES: dict[str, GgufType] = {
    t.name: t
    for t in (
        _g("q4_0", 32, 18, 4, (4, 32, True)),
        _g("q4_1", 32, 20, 4, (4, 32, False)),
        _g("q5_0", 32, 22, 5, (5, 32, True)),
        _g("q5_1", 32, 24, 5, (5, 32, False)),
        _g("q8_0", 32, 34, 8, (8, 32, True)),
        _g("q2_K", 256, 84, 2, (2, 16, False)),
        _g("q3_K", 256, 110, 3, (3, 16, True)),
        _g("q4_K", 256, 144, 4, (4, 32, False)),
        _g("q5_K", 256, 176, 5, (5, 32, False)),
        _g("q6_K", 256, 210, 6, (6, 16, True)),
        _g("iq4_nl", 32, 18, 4, None),
        _g("iq4_xs", 256, 136, 4, None),
        _g("mxfp4", 32, 17, 4, None),
        _g("iq3_s", 256, 110, 3, None),
        _g("iq3_xxs", 256, 98, 3, None),
        _g("iq2_s", 256, 82, 2, None),
        _g("iq2_xs", 256, 74, 2, None),
        _g("iq2_xxs", 256, 66, 2, None),
        _g("iq1_m", 256, 56, 1, None),
        _g("iq1_s", 256, 50, 1, None),
        _g("tq1_0", 256, 54, 1, None),
        _g("tq2_0", 256, 66, 2, None),
        _g("f16", 1, 2, 16, None),
        _g("bf16", 1, 2, 16, None),
    )
}


@dataclass(frozen=True, kw_only=True)
class QuantFormat:
    """A parsed option label (see the module docstring for the grammar and the accounting)."""

    name: str
    kind: FormatKind
    bits: int  #: payload bits per weight (16 for float formats)
    group_size: int | None = None  #: input channels per group; -1 = per channel; None = n/a
    symmetric: bool = True
    convention: StorageConvention = StorageConvention.SCALE_ZERO_FP16

    @property
    def is_quantized(self) -> bool:
        return self.kind is not FormatKind.FLOAT and self.name not in ("f16", "bf16")

    @property
    def emulation(self) -> tuple[int, int, bool] | None:
        """(bits, group_size, symmetric) of the RTN grid that fake-quantizes this format."""
        if self.kind is FormatKind.INT:
            return (self.bits, self.group_size or -1, self.symmetric)
        if self.kind is FormatKind.GGUF:
            return GGUF_TYPES[self.name].emulation
        return None

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Storage bits per weight, overhead included; ``in_features`` is needed per channel."""
        if self.kind is FormatKind.FLOAT:
            return 16.0
        if self.kind is FormatKind.GGUF:
            return GGUF_TYPES[self.name].bpw
        b = float(self.bits)
        if self.group_size == -1:
            if not in_features:
                raise InvalidParameterError(
                    f"option {self.name!r} is per channel: its size needs the unit's input "
                    "features (pass in_features)"
                )
            return b + (16.0 if self.symmetric else 32.0) / in_features
        g = float(self.group_size or 1)
        if self.convention is StorageConvention.GPTQ:
            return b + (16.0 + b) / g
        return b + (16.0 if self.symmetric else 32.0) / g

    def size_bits(self, params: int, in_features: int | None = None) -> float:
        """Total storage of ``params`` weights in this format."""
        return params * self.bits_per_weight(in_features)


_INT_RE = re.compile(r"^int(?P<b>[2-8])-(?:g(?P<g>\d+)|(?P<ch>ch))-(?P<s>sym|asym)(?P<gptq>-gptq)?$")


@functools.lru_cache(maxsize=4096)
def parse_format(label: str) -> QuantFormat:
    """Parse an option label into a :class:`QuantFormat`.

    Raises:
        UnknownNameError: the label matches no grammar of the catalogue.
    """
    if label in ("fp16", "bf16"):
        return QuantFormat(name=label, kind=FormatKind.FLOAT, bits=16)
    if label in GGUF_TYPES:
        t = GGUF_TYPES[label]
        return QuantFormat(name=label, kind=FormatKind.GGUF, bits=t.payload_bits, group_size=t.block)
    m = _INT_RE.match(label)
    if m is None:
        raise UnknownNameError(
            f"unknown option label {label!r}: use fp16, int<2-8>-g<size>-<sym|asym>[-gptq], "
            f"int<2-8>-ch-<sym|asym>, or a GGUF type such as {', '.join(list(GGUF_TYPES)[:6])}"
        )
    group = -1 if m["ch"] else int(m["g"])
    if group == 0:
        raise UnknownNameError(f"option {label!r}: group size must be positive (e.g. g128)")
    conv = StorageConvention.GPTQ if m["gptq"] else StorageConvention.SCALE_ZERO_FP16
    return QuantFormat(
        name=label, kind=FormatKind.INT, bits=int(m["b"]), group_size=group,
        symmetric=m["s"] == "sym", convention=conv,
    )


#: Default candidates of estimators: int2..int8 at group 128, asymmetric, plus fp16.
DEFAULT_OPTIONS: tuple[str, ...] = (
    *(f"int{b}-g128-asym" for b in range(2, 9)),
    "fp16",
)


#: The dense palette (Q-Palette idea): g64 and symmetric variants between the integer widths, so
#: the size frontier has a step every ⅛–¼ bpw. The default of ``run`` / ``demo``: on the quality
#: benchmark it lowered the held-out error at equal size at 7 of 9 (model, budget) points
#: (docs/quality.md). Named ``dense`` in option specs.
DENSE_OPTIONS: tuple[str, ...] = (
    "int2-g64-asym", "int2-g128-asym", "int3-g64-asym", "int3-g128-sym", "int3-g128-asym",
    "int4-g64-asym", "int4-g128-sym", "int4-g128-asym", "int5-g128-asym", "int6-g128-asym",
    "int8-g128-asym", "fp16",
)


def check_group_columns(columns: int, options: Sequence[QuantFormat]) -> None:
    """Refuse column-group units of ``columns`` inputs that split an option's quantization groups.

    A unit of 64 columns quantized as ``int3-g128`` really gets groups of 64 (twice the scales)
    while its size is counted at g128, so the plan and the uniform baseline would both be smaller
    on paper than on disk. ``columns`` must be a multiple of every option's group size.
    """
    bad = list(dict.fromkeys(f.name for f in options
                             if f.group_size and f.group_size > 0 and columns % f.group_size))
    if bad:
        raise InvalidParameterError(
            f"groups={columns} splits the quantization groups of {', '.join(bad)}; use a multiple "
            f"of their group size (e.g. --groups {max(f.group_size or 1 for f in options)}) or "
            "options with smaller groups")


def parse_options(spec: str | None) -> tuple[QuantFormat, ...]:
    """Parse a comma-separated option spec (``"int2-g128-asym,int4-g128-asym,fp16"``).

    ``None`` or ``"default"`` gives :data:`DEFAULT_OPTIONS`, ``"dense"`` :data:`DENSE_OPTIONS`.
    A shorthand ``int2..8-g64-sym`` expands to every bit width in the range.
    """
    if spec is None or spec.strip() in ("", "default"):
        labels: list[str] = list(DEFAULT_OPTIONS)
    elif spec.strip() == "dense":
        labels = list(DENSE_OPTIONS)
    else:
        labels = []
        for raw in spec.split(","):
            item = raw.strip()
            rng = re.match(r"^int(\d)\.\.(\d)(-.*)$", item)
            if rng:
                lo, hi = int(rng[1]), int(rng[2])
                labels.extend(f"int{b}{rng[3]}" for b in range(lo, hi + 1))
            elif item:
                labels.append(item)
    if len(set(labels)) != len(labels):
        raise InvalidParameterError(f"option spec {spec!r} lists an option twice; list each once")
    return tuple(parse_format(x) for x in labels)
