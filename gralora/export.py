"""Exports of a trained GraLoRA model: the PEFT adapter, a merged model, an exact LoRA, a manifest.

peft stores a GraLoRA layer's factors as (N = k, s = rank / k):

    gralora_A: [N, in/N, rank]   input block n; its rank columns split in N chunks of s,
                                 chunk j feeding output block j
    gralora_B: [N, rank, out/N]  output block j; its rank rows split in N chunks of s,
                                 chunk n coming from input block n

so block (j, n) of dW is B_jn @ A_jn with B_jn = gralora_B[j, n*s:(n+1)*s, :].T and
A_jn = gralora_A[n, :, j*s:(j+1)*s].T. Stacking the k^2 pairs side by side gives a LoRA of rank
k * rank whose factors are block-sparse; the hybrid branch appends hybrid_rank more.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ADAPTER_DIRNAME = "adapter"
MERGED_DIRNAME = "merged"
LORA_DIRNAME = "lora"
MANIFEST_NAME = "manifest.json"
ADAPTER_NAME = "default"


def gralora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """(module name, layer) for every GraLoRA layer of a PeftModel."""
    from peft.tuners.gralora.layer import GraloraLayer

    for name, module in model.named_modules():
        if isinstance(module, GraloraLayer) and ADAPTER_NAME in module.gralora_A:
            yield name, module


def block_factors(layer: Any) -> tuple[Any, Any]:
    """The exact LoRA factors of one GraLoRA layer: A [R, in], B [out, R], R = k*rank + hybrid."""
    import torch

    a = layer.gralora_A[ADAPTER_NAME].detach().float()  # [N, in/N, rank]
    b = layer.gralora_B[ADAPTER_NAME].detach().float()  # [N, rank, out/N]
    n_blocks, in_block, rank = a.shape
    out_block = b.shape[2]
    s = rank // n_blocks
    hybrid = layer.hybrid_r[ADAPTER_NAME]
    total = n_blocks * rank + hybrid
    lora_a = torch.zeros(total, n_blocks * in_block)
    lora_b = torch.zeros(n_blocks * out_block, total)
    for j in range(n_blocks):  # output block
        for n in range(n_blocks):  # input block
            first = (j * n_blocks + n) * s  # this block's s columns of the stacked rank
            lora_a[first:first + s, n * in_block:(n + 1) * in_block] = a[n, :, j * s:(j + 1) * s].T
            rows = slice(j * out_block, (j + 1) * out_block)
            lora_b[rows, first:first + s] = b[j, n * s:(n + 1) * s, :].T
    if hybrid:
        lora_a[n_blocks * rank:] = layer.gralora_A_general[ADAPTER_NAME].weight.detach().float()
        lora_b[:, n_blocks * rank:] = layer.gralora_B_general[ADAPTER_NAME].weight.detach().float()
    return lora_a, lora_b


def save_adapter(model: Any, out_dir: Path) -> Path:
    """Write the PEFT adapter (safetensors + adapter_config.json) to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def export_lora(model: Any, out_dir: Path, base_model: str) -> Path:
    """Write a plain peft LoRA adapter whose outputs equal the GraLoRA adapter's."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    ranks: set[int] = set()
    scalings: set[float] = set()
    targets: set[str] = set()
    dtype = None
    for name, layer in gralora_layers(model):
        lora_a, lora_b = block_factors(layer)
        dtype = layer.gralora_A[ADAPTER_NAME].dtype
        # PeftModel keys: "base_model.model.<module path>.lora_A.weight" (adapter name dropped).
        tensors[f"{name}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = lora_b.to(dtype).contiguous()
        ranks.add(lora_a.shape[0])
        scalings.add(float(layer.scaling[ADAPTER_NAME]))
        targets.add(name.rsplit(".", 1)[-1])
    if not tensors:
        raise ValueError("the model has no GraLoRA layers to export")
    if len(ranks) != 1 or len(scalings) != 1:
        raise ValueError("layers differ in rank or scaling; one LoRA config cannot express them")
    rank, scaling = ranks.pop(), scalings.pop()
    config = LoraConfig(
        r=rank,
        # LoRA scales by lora_alpha / r: choose lora_alpha so that equals GraLoRA's scaling.
        lora_alpha=scaling * rank,  # type: ignore[arg-type]  # peft says int; floats work
        target_modules=sorted(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def export_merged(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Fold the adapter into the base weights and save a plain model folder (safetensors).

    This modifies `model` in place (the adapter layers are unloaded): call it last.
    """
    merged = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path) -> list[dict[str, Any]]:
    """Every file under `folder` with its size and sha256, sorted by path."""
    return [
        {"path": p.relative_to(folder).as_posix(), "size_bytes": p.stat().st_size,
         "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file()
    ]


def write_manifest(output_dir: Path, *, base_model: str, adapter_spec: dict[str, Any],
                   training_spec: dict[str, Any], dataset: dict[str, Any],
                   metrics: dict[str, Any], artifacts: dict[str, Path]) -> Path:
    """Write manifest.json: what was trained on what, its metrics, and every file's sha256."""
    import peft
    import torch
    import transformers

    manifest = {
        "format": "gralora-manifest/1",
        "base_model": base_model,
        "adapter": adapter_spec,
        "training": training_spec,
        "dataset": dataset,
        "metrics": metrics,
        "artifacts": {
            name: {"path": os.path.relpath(path, output_dir), "files": describe_files(path)}
            for name, path in sorted(artifacts.items()) if path.is_dir()
        },
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
        },
    }
    path = output_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
                    encoding="utf-8")
    return path
