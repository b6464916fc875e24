"""llama.cpp ``llama-quantize --tensor-type-file``: one ``^gguf-name$=type`` token per line.

Consumer rule (``tools/quantize/quantize.cpp`` + ``src/llama-quant.cpp``): each token splits at
the first ``=``; the NAME is lower-cased (so ``\\D \\W \\S \\B`` would silently change meaning;
only ``\\.``, ``(…|…)``, ``^``, ``$`` are emitted and NAME is checked to be lower-case) and
``std::regex_search``-ed, unanchored, over GGUF tensor names; which of several matches wins has
changed across versions, so every tensor is matched by exactly one anchored pattern. TYPE is a
ggml type name (``q4_K``), not an ftype (``Q4_K_M``). No comment syntax: notes stay out of the
file. HF → GGUF names: the llama-family table of ``export-formats.md`` (verified against gguf-py),
or gguf-py's ``TensorNameMap`` for other architectures (BERT ...) when ``gguf`` is installed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

from allocator.core.formats import GGUF_TYPES, FormatKind, QuantFormat, StorageConvention
from allocator.export._exporter import ExportContext, ExportResult
from allocator.export._grouping import merge_groups, module_settings
from allocator.export._patterns import anchored_patterns
from allocator.export._report import plan_header, weighted_bpw
from allocator.export._settings import INT_EXACT_GGUF, Setting, gguf_setting, skip_setting

__all__ = ["EXPORTER", "LOSSY_INT_TO_GGUF", "LlamaCppExporter", "gguf_bpw", "gguf_tensor_name",
           "tensor_settings"]

#: lossy only: integer option → the K-quant with at least its payload bits (7 → q8_0)
LOSSY_INT_TO_GGUF = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 7: "q8_0", 8: "q8_0"}

_LLAMA: list[tuple[str, str]] = [
    (r"^model\.embed_tokens$", "token_embd"),
    (r"^lm_head$", "output"),
    (r"^model\.norm$", "output_norm"),
    (r"^model\.layers\.(\d+)\.input_layernorm$", r"blk.\1.attn_norm"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm$", r"blk.\1.ffn_norm"),
    (r"^model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj$", r"blk.\1.attn_\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj$", r"blk.\1.attn_output"),
    (r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj$", r"blk.\1.ffn_\2"),
]
#: architectures whose HF names follow the llama table
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_EXPERT = re.compile(r"\.experts\.\d+\.")


def gguf_bpw(s: Setting, shape: tuple[int, int] | None) -> float:
    """Fixed per ggml type (block bytes × 8 / block weights), f16/bf16 = 16."""
    return 16.0 if s.gguf is None else GGUF_TYPES[s.gguf].bpw


def _llama_name(name: str) -> str | None:
    for pattern, repl in _LLAMA:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return None


def detect_arch(names: Iterable[str]) -> str:
    names = list(names)
    if all(_llama_name(n) is not None for n in names):
        return "llama"
    if any(n.startswith(("encoder.layer.", "embeddings.")) for n in names):
        return "bert"
    return "unknown"


def gguf_tensor_name(name: str, arch: str, n_blocks: int) -> str | None:
    """The GGUF tensor (without ``.weight``) of an HF module, or None when it has none."""
    if arch in LLAMA_FAMILY:
        return _llama_name(name)
    try:
        import gguf
    except ImportError:
        return None
    archs = {a.name.lower(): a for a in gguf.MODEL_ARCH}
    if arch not in archs:
        return None
    got: str | None = gguf.get_tensor_name_map(archs[arch], n_blocks).get_name(name)
    return got


def _convert(ctx: ExportContext, unit: str, fmt: QuantFormat) -> Setting:
    if fmt.kind is FormatKind.FLOAT:
        return skip_setting(fmt.name)
    if fmt.kind is FormatKind.GGUF:
        return gguf_setting(fmt.name)
    key = (fmt.bits, fmt.group_size or -1, fmt.symmetric)
    if key in INT_EXACT_GGUF and fmt.convention is StorageConvention.SCALE_ZERO_FP16:
        return gguf_setting(INT_EXACT_GGUF[key])
    if not ctx.lossy:
        raise ctx.fail(f"unit {unit!r} takes {fmt.name!r}, which no ggml type stores exactly (exact: "
                       "int4-g32-sym=q4_0, int4-g32-asym=q4_1, int5-g32-sym=q5_0, int5-g32-asym=q5_1, "
                       "int8-g32-sym=q8_0)", lossy_hint="use the K-quant with at least its bits")
    s = gguf_setting(LOSSY_INT_TO_GGUF[fmt.bits])
    ctx.changed[unit] = (fmt.name, s.label)
    return s


def tensor_settings(ctx: ExportContext, *, tied: bool = False
                    ) -> tuple[dict[str, Setting], dict[str, list[str]], str]:
    """The plan's settings per module, made equal within each GGUF tensor (refused, or raised
    to the highest with ``--lossy``), with GGUF tensor → its modules and the architecture.

    ``tied``: the model ties ``lm_head`` to the embedding, so both are the one ``token_embd``.
    """
    settings = module_settings(ctx, lambda u, f: _convert(ctx, u, f))
    experts = sorted(n for n in settings if _EXPERT.search(n))
    if experts:
        raise ctx.fail(f"unit {experts[0]!r} is one expert; GGUF stacks all experts of a layer in "
                       "one tensor (ffn_*_exps), so per-expert settings cannot be expressed")
    names = set(settings) | (ctx.model_names or frozenset())
    arch = ctx.arch or detect_arch(names)
    n_blocks = 1 + max((int(m) for n in names for m in re.findall(r"\.(\d+)\.", n)), default=0)
    tensors: dict[str, list[str]] = defaultdict(list)
    for n in sorted(settings):
        t = gguf_tensor_name(n, arch, n_blocks)
        if t is None:
            hint = ("" if arch == "llama" else
                    " (non-llama names need `pip install gguf` for gguf-py's name map)")
            raise ctx.fail(f"unit {n!r} has no GGUF tensor in the {arch!r} name map{hint}")
        tensors["token_embd" if tied and t == "output" else t].append(n)
    settings = merge_groups(ctx, settings, {t: ms for t, ms in tensors.items() if len(ms) > 1},
                            "GGUF tensor")
    return settings, dict(tensors), arch


class LlamaCppExporter:
    NAME = "llamacpp"
    SUFFIX = ".txt"
    BASE_HELP = "llama-quantize ftype for tensors not in the file (default Q8_0; must be quantized)"

    def export(self, ctx: ExportContext, base: str | None) -> ExportResult:
        settings, tensors, arch = tensor_settings(ctx)
        self._check_rows(ctx, settings)
        by_type: dict[str, list[str]] = defaultdict(list)
        for t, ms in tensors.items():
            s = settings[ms[0]]
            by_type[s.gguf or s.float_dtype.replace("fp16", "f16")].append(t)
        lines: list[str] = []
        for ggml_type in sorted(by_type):
            for pat in anchored_patterns(by_type[ggml_type], suffix=".weight"):
                if pat != pat.lower() or re.search(r"\\[DWSB]", pat):
                    raise ctx.fail(f"pattern {pat!r} would change when llama-quantize lower-cases it")
                if re.search(r"\s", pat):
                    raise ctx.fail(f"pattern {pat!r} has whitespace; the file is whitespace-separated")
                lines.append(f"{pat}={ggml_type}")
        ftype = base or "Q8_0"
        if ftype.upper() in {"F16", "BF16", "F32", "COPY"}:
            raise ctx.fail(f"base ftype {ftype!r} is not quantized; llama-quantize applies "
                           "--tensor-type overrides only under a quantized ftype (e.g. Q8_0)")
        notes = plan_header(ctx, "fixed bpw per ggml type (q4_K 4.5, q8_0 8.5, ...): "
                            + weighted_bpw(ctx, settings, gguf_bpw))
        notes.append(f"arch {arch}; {len(lines)} rule(s) for {len(tensors)} tensor(s); run: "
                     f"llama-quantize --tensor-type-file FILE model-f16.gguf out.gguf {ftype}")
        notes.append("tensors not in the file follow the ftype's own rules; llama.cpp's reported bpw "
                     "counts every tensor (embeddings and output included)")
        notes.extend(ctx.notes)
        return ExportResult(target=self.NAME, text="\n".join(lines) + "\n", suffix=self.SUFFIX,
                            notes=tuple(notes), changed=dict(ctx.changed))

    @staticmethod
    def _check_rows(ctx: ExportContext, settings: dict[str, Setting]) -> None:
        """A row not divisible by the type's block makes llama.cpp fall back to another type."""
        for n, s in sorted(settings.items()):
            in_f = ctx.in_features(n)
            if s.gguf is None or in_f is None or in_f % GGUF_TYPES[s.gguf].block == 0:
                continue
            msg = (f"{n!r} has rows of {in_f} weights, not a multiple of {s.gguf}'s block of "
                   f"{GGUF_TYPES[s.gguf].block}: llama.cpp would fall back to another type")
            if not ctx.lossy:
                raise ctx.fail(msg + "; choose a type with a smaller block", lossy_hint=False)
            ctx.notes.append("lossy: " + msg)


EXPORTER = LlamaCppExporter()
