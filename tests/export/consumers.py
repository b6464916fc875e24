"""Each tool's name-matching rule, copied from its source (see export-formats.md), to read an
export back the way the consumer would. Where the tool's own library installs, tests use it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

BASE = "base"  # marker: the tool's top-level / global setting applies


def gptqmodel_resolve(cfg: Mapping[str, Any], name: str) -> Any:
    """GPTQModel: strip +:/-:, negatives first (``__post_init__``), pcre ``match`` (start-anchored),
    first match wins; ``-:`` → None (skip); no match → the top-level setting."""
    dyn = cfg.get("dynamic") or {}
    keys = [k for k in dyn if k.startswith("-:")] + [k for k in dyn if not k.startswith("-:")]
    for key in keys:
        pat = key[2:] if key[:2] in ("+:", "-:") else key
        if re.match(pat, name):
            if key.startswith("-:"):
                return None
            ov = dyn[key]
            return (ov.get("bits", cfg["bits"]), ov.get("group_size", cfg["group_size"]),
                    ov.get("sym", cfg["sym"]))
    return BASE


def vllm_gptq_override(cfg: Mapping[str, Any], prefix: str) -> Any:
    """vLLM ``gptq_utils.get_dynamic_override``: dict order (no reordering), ``re.match``."""
    for key, ov in (cfg.get("dynamic") or {}).items():
        pat = key[2:] if key[:2] in ("+:", "-:") else key
        if re.match(pat, prefix):
            return None if key.startswith("-:") else (ov.get("bits"), ov.get("group_size"), ov.get("sym"))
    return BASE


def autoround_standard_regex(pattern: str) -> str:
    """``auto_round/utils/common.py::to_standard_regex``."""
    meta_chars = {".*", "^", "$", "|", "(", ")", "[", "]", "?", "+"}
    if not any(tok in pattern for tok in meta_chars):
        return f".*{re.escape(pattern)}.*"
    tmp, i = [], 0
    while i < len(pattern):
        if pattern[i] == "." and i + 1 < len(pattern) and pattern[i + 1] == "*":
            tmp.append(".*")
            i += 2
            continue
        tmp.append("\\." if pattern[i] == "." else pattern[i])
        i += 1
    regex = "".join(tmp)
    if not regex.startswith("^") and not regex.startswith(".*"):
        regex = ".*" + regex
    if not regex.endswith("$") and not regex.endswith(".*"):
        regex = regex + ".*"
    return regex


def autoround_expand(layer_config: Mapping[str, Any], layer_names: Iterable[str]) -> dict[str, Any]:
    """AutoRound ``_traverse_and_expand_layer_config``: exact names as-is; other keys expand with
    ``re.search`` in dict order and overwrite; layers without an entry take the global scheme."""
    names = list(layer_names)
    out: dict[str, Any] = {}
    for key, val in layer_config.items():
        if key in names:
            out[key] = val
            continue
        rx = re.compile(autoround_standard_regex(key))
        for n in names:
            if rx.search(n):
                out[n] = val
    return {n: out.get(n, BASE) for n in names}


def llamacpp_rules(text: str) -> list[tuple[str, str]]:
    """``--tensor-type-file``: whitespace-separated tokens, split at the first ``=``, NAME lower-cased."""
    rules = []
    for token in text.split():
        name, sep, ggml_type = token.partition("=")
        assert sep, token
        rules.append((name.lower(), ggml_type))
    return rules


def llamacpp_type(rules: list[tuple[str, str]], tensor: str) -> tuple[str | None, int]:
    """``llama-quant.cpp``: ``regex_search`` (unanchored), first match; also how many matched."""
    hits = [t for pat, t in rules if re.search(pat, tensor)]
    return (hits[0] if hits else None), len(hits)


def torchao_resolve(fqn_to_config: Mapping[str, Any], module_fqn: str, param_names: Iterable[str]) -> Any:
    """``FqnToConfig``: exact param FQN > exact module FQN > re: on param FQN > re: on module FQN
    (``re.fullmatch``, insertion order) > ``_default``; a missing key leaves the module alone."""
    params = [f"{module_fqn}.{p}" for p in param_names]
    for p in params:
        if p in fqn_to_config:
            return fqn_to_config[p]
    if module_fqn in fqn_to_config:
        return fqn_to_config[module_fqn]
    for p in params:
        for key, cfg in fqn_to_config.items():
            if key.startswith("re:") and re.fullmatch(key[3:], p):
                return cfg
    for key, cfg in fqn_to_config.items():
        if key.startswith("re:") and re.fullmatch(key[3:], module_fqn):
            return cfg
    return fqn_to_config.get("_default", BASE)
