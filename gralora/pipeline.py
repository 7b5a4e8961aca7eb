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
    # Called as on_event(type, level, message, data).
    on_event: Callable[[str, str, str, dict[str, Any]], None] | None = None
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
    s3_buckets: list[str] | None = None  # None: any bucket (CLI); a list: only these


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
    max_dataset_rows: int | None = None  # refuse files with more rows (checked while reading)
    # Train through gralora.fast_forward (same parameters and outputs as peft's forward, fewer
    # activation copies); False keeps peft's own forward.
    fast_forward: bool = True
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


def _emit(hooks: TrainHooks, kind: str, level: str, message: str,
          data: dict[str, Any] | None = None) -> None:
    if hooks.on_event is not None:
        hooks.on_event(kind, level, message, data or {})


def _split_validation(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Hold out a seeded random fraction of the encoded examples for evaluation."""
    import random

    from gralora.encoding import EncodedDataset
    from gralora.errors import InvalidDataset

    examples = list(dataset.examples)
    held = max(1, round(len(examples) * fraction))
    if held >= len(examples):
        raise InvalidDataset(
            f"validation_split {fraction} of {len(examples)} examples leaves none to train on")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:held])
    train = EncodedDataset(examples=[e for i, e in enumerate(examples) if i not in held_out],
                           num_records=len(examples) - held)
    evaluation = EncodedDataset(examples=[e for i, e in enumerate(examples) if i in held_out],
                                num_records=held)
    return train, evaluation


def _load_data(request: TrainRequest, tokenizer: Any, hooks: TrainHooks) -> tuple[Any, Any, Any]:
    """Fetch and validate the data: (train, eval or None, dataset info)."""
    from gralora.data import load_dataset
    from gralora.sources import fetch_dataset

    max_len = request.training.max_seq_length
    _emit(hooks, "message", "info", "fetching the dataset", {"uri": request.dataset_uri})
    fetched = fetch_dataset(request.dataset_uri, request.sources)
    train, report = load_dataset(fetched.path, tokenizer, max_seq_length=max_len,
                                 max_rows=request.max_dataset_rows)
    info: dict[str, Any] = {"uri": request.dataset_uri, "sha256": fetched.sha256,
                            "size_bytes": fetched.size_bytes, "report": report.to_dict()}
    _emit(hooks, "dataset", "info", f"training data: {report.summary()}", info)
    evaluation = None
    if request.validation_uri:
        fetched_eval = fetch_dataset(request.validation_uri, request.sources)
        evaluation, eval_report = load_dataset(fetched_eval.path, tokenizer,
                                               max_seq_length=max_len,
                                               max_rows=request.max_dataset_rows)
        info["validation"] = {"uri": request.validation_uri, "sha256": fetched_eval.sha256,
                              "report": eval_report.to_dict()}
        _emit(hooks, "dataset", "info", f"validation data: {eval_report.summary()}",
              info["validation"])
    elif request.training.validation_split > 0:
        train, evaluation = _split_validation(train, request.training.validation_split,
                                              request.training.seed)
        info["validation"] = {"split": request.training.validation_split,
                              "num_examples": len(evaluation)}
    return train, evaluation, info


def _export(request: TrainRequest, model: Any, tokenizer: Any, hooks: TrainHooks
            ) -> dict[str, Path]:
    """Write the adapter and the requested exports; the merged model last (it unloads)."""
    from gralora import export

    out = Path(request.output_dir)
    artifacts = {"adapter": export.save_adapter(model, out / export.ADAPTER_DIRNAME)}
    tokenizer.save_pretrained(str(artifacts["adapter"]))  # so the folder is self-contained
    if "lora" in request.exports:
        artifacts["lora"] = export.export_lora(model, out / export.LORA_DIRNAME,
                                               request.base_model)
    if "merged" in request.exports:
        artifacts["merged"] = export.export_merged(model, tokenizer, out / export.MERGED_DIRNAME)
    for name, path in artifacts.items():
        _emit(hooks, "artifact", "info", f"wrote {name}", {"name": name, "path": str(path)})
    return artifacts


def run_training(request: TrainRequest, hooks: TrainHooks | None = None) -> TrainResult:
    """Train a GraLoRA adapter as `request` says and write its artifacts."""
    from peft import get_peft_model
    from transformers import set_seed

    from gralora import export
    from gralora.checkpoints import latest_complete_checkpoint
    from gralora.errors import TrainingCancelled
    from gralora.models import load_model, load_tokenizer
    from gralora.preflight import preflight
    from gralora.spec import ExportSpec
    from gralora.train import train_adapter

    hooks = hooks or TrainHooks()
    ExportSpec(kinds=tuple(request.exports))
    roots = request.model_roots
    # Cheap checks first: the data is validated and the layers checked before weights load.
    tokenizer = load_tokenizer(request.base_model, roots)
    train_data, eval_data, dataset_info = _load_data(request, tokenizer, hooks)
    checked = preflight(request.base_model, request.adapter, model_roots=roots)
    _emit(hooks, "preflight", "info", checked.summary().replace("\n", "; "), checked.to_dict())
    adapter = checked.spec

    set_seed(request.training.seed)  # adapter init (A's kaiming draw) is reproducible
    model = get_peft_model(load_model(request.base_model, roots), adapter.to_peft_config())
    if request.fast_forward:
        from gralora.fast_forward import enable_fast_forward

        layers = enable_fast_forward(model)
        _emit(hooks, "message", "info", f"fast GraLoRA forward on {layers} layers",
              {"fast_forward_layers": layers})
    checkpoint_dir = Path(request.checkpoint_dir or Path(request.output_dir) / "checkpoints")
    resume_from = latest_complete_checkpoint(checkpoint_dir) if request.resume else None
    outcome = train_adapter(
        model=model, tokenizer=tokenizer, train_dataset=train_data, eval_dataset=eval_data,
        training=request.training, checkpoint_dir=checkpoint_dir, resume_from=resume_from,
        hooks=hooks, show_progress_bar=request.show_progress_bar,
    )
    if outcome.cancelled_at_step is not None:
        raise TrainingCancelled(
            f"training was cancelled at step {outcome.cancelled_at_step}; "
            f"the checkpoint of that step is kept in {checkpoint_dir}")
    metrics = {**outcome.metrics, "trainable_parameters": checked.trainable_parameters,
               "effective_rank": checked.effective_rank}
    artifacts = _export(request, outcome.model, tokenizer, hooks)
    artifacts["manifest"] = export.write_manifest(
        Path(request.output_dir), base_model=request.base_model,
        adapter_spec=adapter.to_dict(), training_spec=request.training.to_dict(),
        dataset=dataset_info, metrics=metrics, artifacts=artifacts)
    return TrainResult(
        output_dir=Path(request.output_dir),
        adapter_dir=artifacts["adapter"],
        artifacts=artifacts,
        metrics=metrics,
        adapter=adapter,
        resumed_from_step=outcome.resumed_from_step,
        dataset_sha256=dataset_info["sha256"],
    )
