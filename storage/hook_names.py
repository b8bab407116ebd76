"""The names other tools give a model and a hookpoint: the hub id a builtin or local model came from,
and TransformerLens' hook for an HF module (the names SAELens' HookedSAETransformer attaches SAEs by)."""

from __future__ import annotations

import json
import re
from pathlib import Path

# the models inside saeflow's builtin sources, by their hub ids (sae/lm.py: BUILTIN_MODELS)
BUILTIN_HUB_IDS = {"builtin:smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# HF module -> TransformerLens hook; {i} is the block. A decoder layer's output is the residual stream
# after it (TransformerLens' hook_resid_post); Llama-family and GPT-2 module names.
_TL_HOOKS = [
    (r"(?:model\.)?layers\.(\d+)|transformer\.h\.(\d+)", "blocks.{i}.hook_resid_post"),
    (r"(?:model\.)?layers\.(\d+)\.mlp|transformer\.h\.(\d+)\.mlp", "blocks.{i}.hook_mlp_out"),
    (r"(?:model\.)?layers\.(\d+)\.self_attn|transformer\.h\.(\d+)\.attn", "blocks.{i}.hook_attn_out"),
    (r"(?:model\.)?embed_tokens|transformer\.wte", "hook_embed"),
]


def transformer_lens_hook(module: str) -> str | None:
    """TransformerLens' name for the output of HF module `module`; None where it has none."""
    for pattern, hook in _TL_HOOKS:
        found = re.fullmatch(pattern, module)
        if found:
            block = next((g for g in found.groups() if g is not None), None)
            return hook.format(i=block)
    return None


def transformer_lens_mlp_hooks(module: str) -> tuple[str | None, str | None]:
    """TransformerLens' hooks on what HF MLP module `module` reads and writes (a transcoder's input
    and target): ln2's output, which the MLP reads, and hook_mlp_out; (None, None) for other modules."""
    out = transformer_lens_hook(module)
    if out is None or not out.endswith(".hook_mlp_out"):
        return None, None
    return out.removesuffix("hook_mlp_out") + "ln2.hook_normalized", out


def hf_module(hook: str) -> str | None:
    """The Llama-family module whose output TransformerLens' `hook` names (the inverse, for imports)."""
    found = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out)", hook)
    if found:
        suffix = {"resid_post": "", "mlp_out": ".mlp", "attn_out": ".self_attn"}[found.group(2)]
        return f"model.layers.{found.group(1)}{suffix}"
    return "model.embed_tokens" if hook == "hook_embed" else None


def hub_id(source: str | None) -> str | None:
    """The hub id of a model source: a builtin's, a hub id itself, or what a local model directory's
    config names (`_name_or_path`, when it is a hub id); None when unknown."""
    if not source:
        return None
    if source in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[source]
    config = Path(source) / "config.json"
    if config.is_file():
        try:
            named = json.loads(config.read_text()).get("_name_or_path", "")
        except (OSError, ValueError):
            return None
        return named if _looks_like_hub_id(named) else None
    return source if _looks_like_hub_id(source) else None


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()
