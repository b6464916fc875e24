"""llm-compressor recipe (YAML) with one ``config_groups`` entry per distinct setting.

Consumer rule (compressed-tensors ``utils/match.py`` + ``lifecycle/apply.py``): a target is an
exact name, ``re:<regex>`` (``re.match``, start-anchored only, so every pattern ends in ``$``) or a
class name; a module matching several targets takes the first after sorting. Targets here are
disjoint anchored regexes (no ``Linear`` catch-all), so every compressed-tensors version gives
each planned module exactly its group, and modules outside the plan match nothing. ``weights:``
args are always explicit (preset names changed meaning across versions). YAML strings are
single-quoted, so backslashes are literal.
"""

from __future__ import annotations

from typing import Any

from allocator.export._exporter import ExportContext, ExportResult
from allocator.export._grouping import enforce_fusion, module_settings
from allocator.export._patterns import anchored_patterns
from allocator.export._report import needs_shape, plan_header, weighted_bpw
from allocator.export._settings import Setting, group_by_setting, int_of

__all__ = ["EXPORTER", "LlmCompressorExporter", "config_groups", "pack_quantized_bpw", "weights_args"]


def pack_quantized_bpw(s: Setting, shape: tuple[int, int] | None) -> float:
    """compressed-tensors ``pack-quantized``: 32/⌊32/b⌋ + 16/g (sym) or + (16 + 32/⌊32/b⌋)/g (asym)."""
    if s.skip:
        return 16.0
    stored = 32.0 / (32 // int(s.bits or 8))
    g = float(needs_shape(shape)[1] if s.group_size == -1 else s.group_size or 1)
    return stored + (16.0 if s.symmetric else 16.0 + stored) / g


def weights_args(s: Setting) -> dict[str, Any]:
    """Explicit ``QuantizationArgs`` fields of a setting (never a preset name)."""
    args: dict[str, Any] = {"num_bits": s.bits, "type": "int", "symmetric": bool(s.symmetric)}
    if s.group_size == -1:
        args["strategy"] = "channel"
    else:
        args["strategy"] = "group"
        args["group_size"] = s.group_size
    return args


def config_groups(settings: dict[str, Setting]) -> dict[str, dict[str, Any]]:
    """group name → {targets: ['re:^…$', ...], weights: {...}}; disjoint by construction."""
    groups: dict[str, dict[str, Any]] = {}
    for s, names in group_by_setting({n: s for n, s in settings.items() if not s.skip}):
        name = s.label.replace("-", "_")
        groups[name] = {"targets": [f"re:{p}" for p in anchored_patterns(names)],
                        "weights": weights_args(s)}
    return groups


def _yaml_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class LlmCompressorExporter:
    NAME = "llmcompressor"
    SUFFIX = ".yaml"
    BASE_HELP = None

    def export(self, ctx: ExportContext, base: str | None) -> ExportResult:
        settings = module_settings(ctx, lambda u, f: int_of(ctx, u, f))
        settings = enforce_fusion(ctx, settings)
        groups = config_groups(settings)
        if not groups:
            raise ctx.fail("every unit of the plan is unquantized; there is nothing to quantize")
        notes = plan_header(ctx, "compressed-tensors pack-quantized 32/floor(32/b) + 16/g sym, "
                            "+ (16 + 32/floor(32/b))/g asym: "
                            + weighted_bpw(ctx, settings, pack_quantized_bpw))
        notes.append(f"{len(groups)} config group(s) with disjoint anchored targets; modules not "
                     "in the plan (and fp16 units) match no target and stay unquantized")
        notes.append("QuantizationModifier is round-to-nearest; rename it to GPTQModifier or "
                     "AutoRoundModifier (same fields) for those algorithms")
        bits = {int(s.bits or 0) for s in settings.values() if not s.skip}
        if bits - {4, 8}:
            notes.append(f"bits {sorted(bits - {4, 8})}: most vLLM versions run only 4/8-bit WNA16 "
                         "kernels (the newest run 2-8)")
        notes.extend(ctx.notes)
        lines = [f"# {n}" for n in notes]
        lines += ["quant_stage:", "  quant_modifiers:", "    QuantizationModifier:",
                  "      config_groups:"]
        for gname, g in groups.items():
            lines.append(f"        {gname}:")
            lines.append("          targets:")
            lines += [f"          - {_yaml_str(t)}" for t in g["targets"]]
            w = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in g["weights"].items())
            lines.append(f"          weights: {{{w}}}")
        return ExportResult(target=self.NAME, text="\n".join(lines) + "\n", suffix=self.SUFFIX,
                            notes=tuple(notes), changed=dict(ctx.changed))


EXPORTER = LlmCompressorExporter()
