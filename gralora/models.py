"""Load a base model's config, tokenizer and weights safely: no remote code, safetensors only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from gralora.errors import ModelUnavailable, UnsafeModel

# Weight files that unpickle on load: a malicious file runs code, so they are never read.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFE_WEIGHT_SUFFIX = ".safetensors"


def is_local_reference(base_model: str) -> bool:
    """True when `base_model` names a local folder rather than a hub id."""
    return (
        base_model.startswith(("/", "./", "../", "~", "file://"))
        or base_model in (".", "..")
        or Path(base_model).expanduser().is_dir()
    )


def resolve_local_model(base_model: str, model_roots: Sequence[Path] | None) -> Path:
    """The resolved folder of a local model, checked to lie under `model_roots` if given."""
    raw = base_model[len("file://"):] if base_model.startswith("file://") else base_model
    path = Path(unquote(raw)).expanduser().resolve()
    if model_roots is not None and not any(
        path.is_relative_to(Path(root).expanduser().resolve()) for root in model_roots
    ):
        raise UnsafeModel(
            f"base model {base_model!r} is outside the allowed model folders; "
            "put it under one of GRALORA_MODEL_ROOTS", code="model_refused", field="base_model")
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"base model folder {str(path)!r} has no config.json",
                               field="base_model")
    return path


def check_local_weights(folder: Path) -> None:
    """Refuse a model folder whose weights exist only in pickle formats."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.name.endswith(SAFE_WEIGHT_SUFFIX) for p in files):
        return
    pickled = sorted(p.name for p in files if p.name.endswith(PICKLE_WEIGHT_SUFFIXES))
    if pickled:
        raise UnsafeModel(
            f"the base model has only pickle weights ({', '.join(pickled[:3])}); pickle can run "
            "arbitrary code, so only safetensors are accepted. Convert it with "
            "`model.save_pretrained(dir, safe_serialization=True)` on a trusted machine.",
            field="base_model")
    raise ModelUnavailable(f"the base model folder {str(folder)!r} has no .safetensors weights",
                           field="base_model")


def model_source(base_model: str, model_roots: Sequence[Path] | None) -> str:
    """What to pass to `from_pretrained`: a checked local folder, or the hub id."""
    if is_local_reference(base_model):
        return str(resolve_local_model(base_model, model_roots))
    return base_model


def _unavailable(base_model: str, exc: Exception) -> ModelUnavailable:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = (" The hub is unreachable (HF_HUB_OFFLINE is set); use a local model folder."
            if offline else " Check the name, or use a local model folder.")
    return ModelUnavailable(
        f"base model {base_model!r} could not be loaded: {type(exc).__name__}.{hint}",
        field="base_model")


def load_config(base_model: str, model_roots: Sequence[Path] | None = None) -> Any:
    """The model's config (no weights), never running remote code."""
    from transformers import AutoConfig

    source = model_source(base_model, model_roots)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UnsafeModel(f"base model {base_model!r} needs remote code, which is disabled",
                              field="base_model") from exc
        raise _unavailable(base_model, exc) from exc
    except OSError as exc:
        raise _unavailable(base_model, exc) from exc


def load_tokenizer(base_model: str, model_roots: Sequence[Path] | None = None) -> Any:
    """The model's tokenizer with a pad token (eos when it has none)."""
    from transformers import AutoTokenizer

    source = model_source(base_model, model_roots)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise _unavailable(base_model, exc) from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def training_dtype() -> Any:
    """bfloat16 on a GPU that supports it, else float32 (CPU training is float32)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(base_model: str, model_roots: Sequence[Path] | None = None,
               dtype: Any = None) -> Any:
    """The causal LM with its weights, from safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    source = model_source(base_model, model_roots)
    if is_local_reference(base_model):
        check_local_weights(Path(source))
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, trust_remote_code=False, use_safetensors=True,
            dtype=dtype if dtype is not None else training_dtype(),
        )
    except OSError as exc:
        if "safetensors" in str(exc).lower():
            raise UnsafeModel(
                f"base model {base_model!r} has no safetensors weights; only safetensors are "
                "accepted", field="base_model") from exc
        raise _unavailable(base_model, exc) from exc


def build_on_meta(config: Any) -> Any:
    """The model's module tree on the meta device: shapes without memory or weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
