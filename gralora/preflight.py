"""Preflight: from a model's config alone, which layers get adapters and whether k fits them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gralora.errors import PreflightFailed
from gralora.models import build_on_meta, load_config
from gralora.spec import AdapterSpec, choose_k, valid_ks

# Output heads are never adapted: they map to the vocabulary, not inside a block.
EXCLUDED_LEAF_NAMES = ("lm_head", "score", "classifier")
MAX_NAMED_OFFENDERS = 5


@dataclass(frozen=True)
class TargetModule:
    """One linear layer that gets an adapter, with its sizes."""

    name: str
    in_features: int
    out_features: int


@dataclass
class PreflightReport:
    """What training would adapt and what it costs, computed without loading weights."""

    spec: AdapterSpec  # resolved: k, alpha and target_modules filled in
    modules: list[TargetModule] = field(default_factory=list)
    trainable_parameters: int = 0
    base_parameters: int = 0
    effective_rank: int = 0  # k * rank + hybrid_rank, before capping at a layer's sizes
    model_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (module list included)."""
        return {
            "spec": self.spec.to_dict(),
            "model_type": self.model_type,
            "num_modules": len(self.modules),
            "modules": [m.__dict__ for m in self.modules],
            "trainable_parameters": self.trainable_parameters,
            "base_parameters": self.base_parameters,
            "trainable_percent": (100.0 * self.trainable_parameters / self.base_parameters
                                  if self.base_parameters else None),
            "effective_rank": self.effective_rank,
        }

    def summary(self) -> str:
        """A few human-readable lines."""
        spec = self.spec
        names = ", ".join(spec.target_modules or ())
        return "\n".join([
            f"model type: {self.model_type}",
            f"adapter: GraLoRA rank {spec.rank}, k {spec.k}, hybrid rank {spec.hybrid_rank}, "
            f"alpha {spec.effective_alpha:g} (scaling {spec.scaling:g})",
            f"targets: {names} ({len(self.modules)} layers)",
            f"trainable parameters: {self.trainable_parameters:,} "
            f"(same as LoRA at rank {spec.rank + spec.hybrid_rank})",
            f"effective rank: up to {self.effective_rank} (LoRA at this rank: "
            f"{spec.rank + spec.hybrid_rank})",
        ])


def _linear_sizes(module: Any) -> tuple[int, int] | None:
    """(in, out) of an nn.Linear or a transformers Conv1D, else None."""
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    # transformers.pytorch_utils.Conv1D (GPT-2 style) stores weight as (in, out).
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return int(module.nx), int(module.nf)
    return None


def linear_layers(model: Any) -> list[TargetModule]:
    """Every linear layer inside the model's blocks (output heads left out)."""
    found = []
    for name, module in model.named_modules():
        sizes = _linear_sizes(module)
        if sizes is None or name.rsplit(".", 1)[-1] in EXCLUDED_LEAF_NAMES:
            continue
        found.append(TargetModule(name, sizes[0], sizes[1]))
    return found


def matches_target(module_name: str, target: str) -> bool:
    """peft's rule: a target names the module exactly or is a suffix after a dot."""
    return module_name == target or module_name.endswith("." + target)


def default_targets(layers: Iterable[TargetModule]) -> tuple[str, ...]:
    """The distinct leaf names of the layers, in model order (q_proj, k_proj, ...)."""
    seen: dict[str, None] = {}
    for layer in layers:
        seen.setdefault(layer.name.rsplit(".", 1)[-1], None)
    return tuple(seen)


def select_targets(layers: Sequence[TargetModule],
                   targets: Sequence[str]) -> list[TargetModule]:
    """The layers matched by `targets`; a target that matches nothing is an error."""
    unmatched = [t for t in targets if not any(matches_target(m.name, t) for m in layers)]
    if unmatched:
        known = ", ".join(default_targets(layers))
        raise PreflightFailed(
            f"target_modules {unmatched} match no linear layer of this model; "
            f"its linear layers are: {known}", field="target_modules")
    return [m for m in layers if any(matches_target(m.name, t) for t in targets)]


def _check_divisible(adapter: AdapterSpec, modules: Sequence[TargetModule]) -> None:
    """Every targeted size must split into k blocks; name the offenders and the k that work."""
    k = adapter.k
    assert k is not None
    offenders = [m for m in modules if m.in_features % k or m.out_features % k]
    if not offenders:
        return
    sizes = {s for m in modules for s in (m.in_features, m.out_features)}
    working = [c for c in valid_ks(adapter.rank, sizes) if c > 1] or [1]
    named = "; ".join(f"{m.name} ({m.in_features} in, {m.out_features} out)"
                      for m in offenders[:MAX_NAMED_OFFENDERS])
    more = len(offenders) - MAX_NAMED_OFFENDERS
    raise PreflightFailed(
        f"k={k} does not divide the sizes of {len(offenders)} targeted layer(s): {named}"
        + (f" and {more} more" if more > 0 else "")
        + f". Values of k that work with rank {adapter.rank}: {', '.join(map(str, working))}",
        field="k", details={"offenders": [m.__dict__ for m in offenders], "valid_k": working})


def preflight_model(model: Any, adapter: AdapterSpec) -> PreflightReport:
    """Check `adapter` against a built model (weights may be on the meta device)."""
    layers = linear_layers(model)
    if not layers:
        raise PreflightFailed("the model has no linear layers to adapt")
    targets = adapter.target_modules or default_targets(layers)
    modules = select_targets(layers, targets)
    sizes = [s for m in modules for s in (m.in_features, m.out_features)]
    k = adapter.k if adapter.k is not None else choose_k(adapter.rank, sizes)
    resolved = adapter.resolved(k, targets)
    _check_divisible(resolved, modules)
    per_layer_rank = resolved.rank + resolved.hybrid_rank
    trainable = sum(per_layer_rank * (m.in_features + m.out_features) for m in modules)
    config = getattr(model, "config", None)
    return PreflightReport(
        spec=resolved,
        modules=modules,
        trainable_parameters=trainable,
        base_parameters=sum(p.numel() for p in model.parameters()),
        effective_rank=k * resolved.rank + resolved.hybrid_rank,
        model_type=getattr(config, "model_type", None),
    )


def preflight(base_model: str, adapter: AdapterSpec, *,
              model_roots: Sequence[Path] | None = None) -> PreflightReport:
    """Preflight a model by name from its config alone (built on the meta device)."""
    config = load_config(base_model, model_roots)
    return preflight_model(build_on_meta(config), adapter)
