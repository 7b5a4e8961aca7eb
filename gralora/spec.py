"""Adapter and training specs: validated dataclasses, k chosen by the paper's rule, peft config."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gralora.errors import InvalidSpec

# The paper keeps r/k^2 near 8: k = 2 for r = 16 or 32, k = 4 for r = 64 or 128.
SMALL_RANK_K = 2
LARGE_RANK_K = 4
LARGE_RANK_THRESHOLD = 64


def preferred_k(rank: int) -> int:
    """The paper's k for this rank, before divisibility is considered."""
    return LARGE_RANK_K if rank >= LARGE_RANK_THRESHOLD else SMALL_RANK_K


def valid_ks(rank: int, sizes: Iterable[int]) -> list[int]:
    """Every k (1..rank) that divides the rank and every given layer size, ascending."""
    size_list = list(sizes)
    return [k for k in range(1, rank + 1) if rank % k == 0 and all(s % k == 0 for s in size_list)]


def choose_k(rank: int, sizes: Iterable[int]) -> int:
    """Pick k by the paper's rule, falling back to the nearest k that divides everything."""
    candidates = valid_ks(rank, sizes)
    target = preferred_k(rank)
    # Nearest to the preferred k; on a tie prefer the smaller k (closer to LoRA, safer).
    return min(candidates, key=lambda k: (abs(k - target), k))


@dataclass(frozen=True)
class AdapterSpec:
    """What adapter to train: GraLoRA rank, grid size k, hybrid LoRA rank, scaling and targets."""

    rank: int
    k: int | None = None  # None: chosen by the paper's rule at preflight
    hybrid_rank: int = 0
    alpha: float | None = None  # None: 2 * rank, as in the paper
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: every linear of attention and MLP

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise InvalidSpec(f"rank must be a positive integer, got {self.rank!r}", field="rank")
        if self.k is not None:
            if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
                raise InvalidSpec(f"k must be a positive integer, got {self.k!r}", field="k")
            if self.rank % self.k != 0:
                ks = [k for k in range(1, self.rank + 1) if self.rank % k == 0]
                raise InvalidSpec(
                    f"rank {self.rank} is not divisible by k={self.k}; "
                    f"k must divide the rank (for rank {self.rank}: {', '.join(map(str, ks))})",
                    field="k",
                )
        if (not isinstance(self.hybrid_rank, int) or isinstance(self.hybrid_rank, bool)
                or self.hybrid_rank < 0):
            raise InvalidSpec(
                f"hybrid_rank must be a non-negative integer, got {self.hybrid_rank!r}",
                field="hybrid_rank",
            )
        if self.alpha is not None and not self.alpha > 0:
            raise InvalidSpec(f"alpha must be positive, got {self.alpha!r}", field="alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidSpec(f"dropout must be in [0, 1), got {self.dropout!r}", field="dropout")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(
                isinstance(m, str) and m for m in self.target_modules
            ):
                raise InvalidSpec("target_modules must be a list of module names",
                                  field="target_modules")
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise InvalidSpec("target_modules must not be empty", field="target_modules")

    @property
    def effective_alpha(self) -> float:
        """alpha, defaulting to 2 * rank."""
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank

    @property
    def effective_rank(self) -> int | None:
        """Upper bound on rank(dW): k * rank + hybrid_rank (None until k is known)."""
        return None if self.k is None else self.k * self.rank + self.hybrid_rank

    @property
    def scaling(self) -> float:
        """alpha / (rank + hybrid_rank), the factor applied to dW."""
        return self.effective_alpha / (self.rank + self.hybrid_rank)

    def with_k(self, k: int) -> AdapterSpec:
        """A copy with k set (and validated)."""
        return dataclasses.replace(self, k=k)

    def resolved(self, k: int, target_modules: Sequence[str]) -> AdapterSpec:
        """A copy with every default filled in: k, alpha and the explicit target list."""
        return dataclasses.replace(
            self, k=k, alpha=self.effective_alpha, target_modules=tuple(target_modules)
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules) if self.target_modules else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterSpec:
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidSpec(f"unknown adapter field(s): {', '.join(unknown)}", field=unknown[0])
        kwargs = dict(data)
        if kwargs.get("target_modules") is not None:
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        return cls(**kwargs)

    def to_peft_config(self) -> Any:
        """The peft GraloraConfig for a resolved spec (k and target_modules must be set)."""
        from peft import GraloraConfig

        if self.k is None or self.target_modules is None:
            raise InvalidSpec("resolve the spec (k, target_modules) before building a peft config")
        return GraloraConfig(
            r=self.rank,
            gralora_k=self.k,
            hybrid_r=self.hybrid_rank,
            # peft annotates alpha as int but scales by it as a number; fractional alphas work.
            alpha=self.effective_alpha,  # type: ignore[arg-type]
            gralora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class TrainingSpec:
    """How to train: schedule, batch, sequence length, seed, checkpoints."""

    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    learning_rate: float = 2e-4
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 1024
    seed: int = 42
    warmup_ratio: float = 0.1
    lr_scheduler_type: str = "cosine"
    weight_decay: float = 0.0
    checkpoint_every_steps: int | None = None
    gradient_checkpointing: bool = False
    validation_split: float = 0.0  # fraction of the training set held out when no validation URI
    logging_steps: int = 1
    eval_steps: int | None = None  # None: evaluate once per epoch and at the end

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidSpec(f"{name} must be a positive integer, got {value!r}", field=name)

        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise InvalidSpec(f"epochs must be positive, got {self.epochs!r}", field="epochs")
        if self.max_steps is not None:
            positive_int("max_steps", self.max_steps)
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            raise InvalidSpec(f"learning_rate must be in (0, 1), got {self.learning_rate!r}",
                              field="learning_rate")
        positive_int("batch_size", self.batch_size)
        positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        positive_int("max_seq_length", self.max_seq_length)
        positive_int("logging_steps", self.logging_steps)
        if self.checkpoint_every_steps is not None:
            positive_int("checkpoint_every_steps", self.checkpoint_every_steps)
        if self.eval_steps is not None:
            positive_int("eval_steps", self.eval_steps)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InvalidSpec(f"seed must be a non-negative integer, got {self.seed!r}",
                              field="seed")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InvalidSpec(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}",
                              field="warmup_ratio")
        if not 0.0 <= self.validation_split < 1.0:
            raise InvalidSpec(
                f"validation_split must be in [0, 1), got {self.validation_split!r}",
                field="validation_split",
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSpec:
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidSpec(f"unknown training field(s): {', '.join(unknown)}", field=unknown[0])
        return cls(**data)


EXPORT_KINDS = ("merged", "lora")


@dataclass(frozen=True)
class ExportSpec:
    """Which extra artifacts to write beside the adapter."""

    kinds: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in EXPORT_KINDS]
        if bad:
            raise InvalidSpec(
                f"unknown export kind(s) {bad}; choose from {list(EXPORT_KINDS)}", field="exports"
            )
