"""The Hugging Face Trainer run, with progress, cancellation and atomic checkpoint callbacks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from gralora.checkpoints import AtomicCheckpointCallback, clear_staging, staging_dir
from gralora.encoding import EncodedDataset, PaddingCollator
from gralora.pipeline import Progress, TrainHooks
from gralora.spec import TrainingSpec


def bf16_supported() -> bool:
    """True when a CUDA GPU that computes in bfloat16 is present."""
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _emit(hooks: TrainHooks, kind: str, level: str, message: str, data: dict[str, Any]) -> None:
    if hooks.on_event is not None:
        hooks.on_event(kind, level, message, data)


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class ProgressReporter(TrainerCallback):
    """Turn Trainer logs into `Progress` snapshots, "metrics" and "eval" events, and a tqdm bar."""

    def __init__(self, hooks: TrainHooks, *, show_progress_bar: bool = False) -> None:
        self.hooks = hooks
        self.show_progress_bar = show_progress_bar
        self.last: Progress | None = None
        self.eval_metrics: dict[str, float] = {}
        self._bar: Any = None
        self._t0 = 0.0
        self._start_step = 0
        self._start_tokens = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        """Remember where this session starts (a resumed run starts mid-way)."""
        self._t0 = time.monotonic()
        self._start_step = state.global_step
        self._start_tokens = int(state.num_input_tokens_seen or 0)
        if self.show_progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step",
                             dynamic_ncols=True)

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        """Advance the progress bar."""
        if self._bar is not None:
            self._bar.update(state.global_step - self._bar.n)

    def snapshot(self, state: TrainerState, logs: dict[str, Any]) -> Progress:
        """The progress right now, from the Trainer state and the latest train logs."""
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        steps_done = state.global_step - self._start_step
        tokens = int(state.num_input_tokens_seen or 0)
        eta = None
        if steps_done > 0:
            eta = elapsed / steps_done * max(state.max_steps - state.global_step, 0)
        return Progress(
            step=state.global_step,
            total_steps=state.max_steps,
            epoch=float(state.epoch or 0.0),
            loss=_finite_or_none(logs.get("loss")),
            learning_rate=_finite_or_none(logs.get("learning_rate")),
            tokens_per_second=(tokens - self._start_tokens) / elapsed if steps_done else None,
            eta_seconds=eta,
            trained_tokens=tokens,
        )

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Report a training-loss log as progress; eval logs go out as "eval" events."""
        logs = logs or {}
        if "eval_loss" in logs:
            self.eval_metrics = {k: float(v) for k, v in logs.items()
                                 if isinstance(v, (int, float))}
            _emit(self.hooks, "eval", "info",
                  f"step {state.global_step}: eval loss {float(logs['eval_loss']):.4f}",
                  {"step": state.global_step, **self.eval_metrics})
            return
        if "loss" not in logs:
            return  # the end-of-training summary log
        progress = self.snapshot(state, logs)
        self.last = progress
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{progress.loss:.4f}" if progress.loss is not None
                                  else "n/a")
        if self.hooks.on_progress is not None:
            self.hooks.on_progress(progress)
        loss_text = f"{progress.loss:.4f}" if progress.loss is not None else "n/a"
        _emit(self.hooks, "metrics", "info",
              f"step {progress.step}/{progress.total_steps}: loss {loss_text}",
              progress.to_dict())

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        """Close the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CancelWatcher(TrainerCallback):
    """Ask `should_cancel` after every optimizer step; on True save a checkpoint and stop."""

    def __init__(self, hooks: TrainHooks) -> None:
        self.hooks = hooks
        self.cancelled_at: int | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        """Stop cleanly: the Trainer saves (control.should_save) before it leaves its loop."""
        if self.hooks.should_cancel is not None and self.hooks.should_cancel():
            self.cancelled_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


@dataclass
class TrainOutcome:
    """What `train_adapter` produced: the trained model and what happened on the way."""

    model: Any  # the PeftModel, trained (or partly trained when cancelled)
    metrics: dict[str, Any]
    resumed_from_step: int | None
    cancelled_at_step: int | None
    checkpoints: list[Path] = field(default_factory=list)


def training_arguments(training: TrainingSpec, checkpoint_dir: Path, *,
                       has_eval: bool) -> TrainingArguments:
    """TrainingArguments for a spec: deterministic, no reporters, CPU unless CUDA is present."""
    import torch

    use_cpu = not torch.cuda.is_available()
    if training.eval_steps is not None and has_eval:
        eval_strategy, eval_steps = "steps", training.eval_steps
    else:
        eval_strategy, eval_steps = ("epoch" if has_eval else "no"), None
    every = training.checkpoint_every_steps
    return TrainingArguments(
        # The Trainer writes into staging; AtomicCheckpointCallback moves complete ones out.
        output_dir=str(staging_dir(checkpoint_dir)),
        num_train_epochs=float(training.epochs),
        max_steps=training.max_steps if training.max_steps is not None else -1,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=training.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
        weight_decay=training.weight_decay,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        seed=training.seed,
        data_seed=training.seed,
        # transformers 5 renamed gradient_checkpointing. Non-reentrant checkpointing works with
        # frozen embeddings (PEFT) without extra hooks.
        activation_checkpointing=training.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=bf16_supported(),
        use_cpu=use_cpu,
        logging_strategy="steps",
        logging_steps=training.logging_steps,
        save_strategy="steps" if every else "no",
        save_steps=every or 500,
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        report_to=[],
        disable_tqdm=True,  # our own bar (ProgressReporter) when asked for
        # Workers would fork RNG streams; 0 keeps data order reproducible across resume.
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        label_names=["labels"],
    )


def train_adapter(*, model: Any, tokenizer: Any, train_dataset: EncodedDataset,
                  eval_dataset: EncodedDataset | None, training: TrainingSpec,
                  checkpoint_dir: Path, resume_from: Path | None = None,
                  hooks: TrainHooks | None = None,
                  show_progress_bar: bool = False) -> TrainOutcome:
    """Train the PEFT-wrapped `model` with the HF Trainer; resumes from `resume_from` if given."""
    hooks = hooks or TrainHooks()
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    clear_staging(checkpoint_dir)  # leftovers of an interrupted save are never resumed from

    def announce(path: Path, step: int) -> None:
        _emit(hooks, "checkpoint", "info", f"checkpoint saved at step {step}",
              {"step": step, "path": str(path)})

    reporter = ProgressReporter(hooks, show_progress_bar=show_progress_bar)
    canceller = CancelWatcher(hooks)
    saver = AtomicCheckpointCallback(checkpoint_dir, on_checkpoint=announce)
    args = training_arguments(training, checkpoint_dir, has_eval=eval_dataset is not None)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PaddingCollator.for_tokenizer(tokenizer),
        processing_class=tokenizer,
        callbacks=[reporter, canceller, saver],
    )
    # With disable_tqdm the Trainer prints every log dict; ProgressReporter reports instead.
    trainer.remove_callback(PrinterCallback)
    resumed_from_step = None
    if resume_from is not None:
        resumed_from_step = TrainerState.load_from_json(
            str(Path(resume_from) / "trainer_state.json")
        ).global_step
        _emit(hooks, "message", "info", f"resuming from checkpoint at step {resumed_from_step}",
              {"step": resumed_from_step, "path": str(resume_from)})
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    state = trainer.state
    metrics: dict[str, Any] = {
        "train_loss": _finite_or_none(output.training_loss),
        "final_loss": reporter.last.loss if reporter.last else None,
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "epochs": float(state.epoch or 0.0),
        "trained_tokens": int(state.num_input_tokens_seen or 0),
        "runtime_seconds": time.monotonic() - started,
        "train_examples": len(train_dataset),
    }
    if canceller.cancelled_at is None and eval_dataset is not None:
        eval_out = trainer.evaluate()  # logs it, so the reporter emits the "eval" event
        metrics["eval_loss"] = _finite_or_none(eval_out.get("eval_loss"))
        metrics["eval_examples"] = len(eval_dataset)
    return TrainOutcome(
        model=trainer.model,
        metrics=metrics,
        resumed_from_step=resumed_from_step,
        cancelled_at_step=canceller.cancelled_at,
        checkpoints=list(saver.saved),
    )
