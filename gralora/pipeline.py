"""One training run end to end: fetch -> validate -> preflight -> train -> export.

The CLI and the worker both call `run_training`; they differ only in the hooks they pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gralora.spec import AdapterSpec, TrainingSpec


@dataclass
class Progress:
    """A progress snapshot passed to `TrainHooks.on_progress` (also stored on the job)."""

    step: int
    total_steps: int
    epoch: float
    loss: float | None
    learning_rate: float | None
    tokens_per_second: float | None
    eta_seconds: float | None
    trained_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return dict(self.__dict__)


@dataclass
class TrainHooks:
    """Callbacks from the run to its caller. Every hook is optional."""

    # Called every logging step with the latest progress.
    on_progress: Callable[[Progress], None] | None = None
    # Typed events: ("dataset", msg, report), ("preflight", ...), ("metrics", ...), ("eval", ...),
    # ("checkpoint", ...), ("artifact", ...), ("message", ...). Level is "info"/"warning"/"error".
    on_event: Callable[[str, str, str, dict[str, Any]], None] | None = None  # (type, level, msg, data)
    # Checked every step; True stops training cleanly (a checkpoint is kept), then
    # run_training raises TrainingCancelled.
    should_cancel: Callable[[], bool] | None = None


@dataclass
class SourceOptions:
    """Where datasets may come from and how they are fetched (see gralora.sources)."""

    cache_dir: Path = Path("gralora-data/cache")
    dataset_roots: list[Path] | None = None  # None: any local path (CLI); a list: only under these
    allow_private_urls: bool = True  # the CLI trusts its user; the service sets False
    max_bytes: int = 1 << 30
    s3_endpoint_url: str | None = None


@dataclass
class TrainRequest:
    """Everything one training run needs."""

    base_model: str  # hub id or local folder
    dataset_uri: str
    adapter: AdapterSpec
    training: TrainingSpec = field(default_factory=TrainingSpec)
    output_dir: Path = Path("out")  # adapter goes to output_dir/adapter, exports beside it
    checkpoint_dir: Path | None = None  # default: output_dir/checkpoints
    validation_uri: str | None = None
    exports: tuple[str, ...] = ()  # subset of ("merged", "lora")
    resume: bool = True  # resume from the latest complete checkpoint if there is one
    sources: SourceOptions = field(default_factory=SourceOptions)
    model_roots: list[Path] | None = None  # None: any local path (CLI); a list: only under these
    show_progress_bar: bool = False


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_dir: Path
    artifacts: dict[str, Path]  # name -> path: "adapter", "merged", "lora", "manifest"
    metrics: dict[str, Any]  # train_loss, eval_loss, steps, trained_tokens, runtime_seconds...
    adapter: AdapterSpec  # resolved: k, alpha and target_modules filled in
    resumed_from_step: int | None
    dataset_sha256: str


def run_training(request: TrainRequest, hooks: TrainHooks | None = None) -> TrainResult:
    """Train a GraLoRA adapter as `request` says and write its artifacts."""
    raise NotImplementedError  # implemented in the engine issue
