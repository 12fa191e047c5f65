"""A GGUF model file as an HF folder: what `rlhf-engine convert-gguf FILE OUT` writes.

transformers reads GGUF (with the `gguf` package) and dequantizes it, but the model it returns carries a
GGUF quantization config and refuses `save_pretrained`; the weights are copied into a fresh model of the same
config without it, then written as an HF safetensors folder with the tokenizer (its chat template included)
and a generation config, which transformers and vLLM load as is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_engine.common.checkpoint import atomic_directory
from rlhf_engine.models.end_of_turn import end_of_turn_ids

GGUF_SUFFIX = ".gguf"


class ConversionError(ValueError):
    """A GGUF file that cannot become an HF folder here; the message names the file and why."""


def convert_gguf(gguf_file: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write the model of `gguf_file` as the HF folder `out` (weights in `dtype`, dequantized; tokenizer
    and chat template; `generation_config.json` whose `eos_token_id` is every end-of-turn id the file
    declares). `out` is written atomically and must not exist yet. Returns `out`."""
    gguf_file, out = Path(gguf_file).expanduser(), Path(out).expanduser()
    if not gguf_file.is_file():
        raise ConversionError(f"{gguf_file}: no such file")
    if gguf_file.suffix != GGUF_SUFFIX:
        raise ConversionError(f"{gguf_file}: not a {GGUF_SUFFIX} file")
    if out.exists():
        raise ConversionError(f"{out} exists already: give a new folder")
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as e:
        raise ConversionError(f"{gguf_file}: reading GGUF needs the `gguf` package (pip install gguf)") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (ValueError, KeyError, RuntimeError) as e:  # transformers: "GGUF model with architecture X is not supported"
        raise ConversionError(f"{gguf_file}: transformers cannot load it ({_first_line(e)})") from e
    model = _without_quantization_config(loaded, dtype)
    model.generation_config.eos_token_id = list(end_of_turn_ids(tokenizer, loaded.generation_config.eos_token_id))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def _without_quantization_config(loaded: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A fresh model of `loaded`'s config without its GGUF quantization config, holding its weights."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ConversionError(f"the converted weights do not fit {type(model).__name__}: missing {sorted(missing)[:4]}, "
                              f"unexpected {sorted(unexpected)[:4]}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else 'no message'}"
