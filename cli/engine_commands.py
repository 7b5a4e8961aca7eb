"""Engine commands: train, validate-data, check, make-tiny-model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the engine subcommands to the `gralora` parser."""
    train = subparsers.add_parser("train", help="train a GraLoRA adapter on this machine")
    train.add_argument("--base-model", required=True, help="local model folder or hub id")
    train.add_argument("--dataset", required=True,
                       help="JSONL dataset: path, file://, http(s)://, s3:// or hf://datasets/...")
    _add_adapter_arguments(train)
    steps = train.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float, default=1.0)
    steps.add_argument("--max-steps", type=int, default=None)
    train.add_argument("--output", required=True, help="folder for adapter/ and the exports")
    train.add_argument("--learning-rate", type=float, default=2e-4)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--max-seq-length", type=int, default=1024)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--warmup-ratio", type=float, default=0.1)
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--checkpoint-every-steps", type=int, default=None)
    train.add_argument("--validation", default=None, help="validation dataset URI")
    train.add_argument("--validation-split", type=float, default=0.0,
                       help="fraction of the data held out for eval loss (no --validation)")
    train.add_argument("--export", default="",
                       help="comma-separated extra exports: merged, lora")
    train.add_argument("--resume", action="store_true",
                       help="resume from the latest complete checkpoint in OUTPUT/checkpoints")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--peft-forward", action="store_true",
                       help="train with peft's own GraLoRA forward instead of the faster one")
    train.set_defaults(handler=_train)

    validate = subparsers.add_parser("validate-data", help="check a JSONL dataset and report")
    validate.add_argument("uri")
    validate.add_argument("--base-model", default=None,
                          help="tokenize with this model's tokenizer for token statistics")
    validate.add_argument("--max-seq-length", type=int, default=1024)
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.set_defaults(handler=_validate_data)

    check = subparsers.add_parser("check", help="preflight an adapter against a model's config")
    check.add_argument("--base-model", required=True)
    _add_adapter_arguments(check)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(handler=_check)

    tiny = subparsers.add_parser("make-tiny-model", help="write a tiny random Llama (demos, tests)")
    tiny.add_argument("output_dir")
    tiny.set_defaults(handler=_make_tiny_model)


def _add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, required=True, help="GraLoRA rank r")
    parser.add_argument("--k", type=int, default=None,
                        help="grid size (default: 2 below rank 64, else 4, if it divides)")
    parser.add_argument("--hybrid-rank", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=None, help="default: 2 * rank")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--target-modules", default=None,
                        help="comma-separated module names (default: every attention/MLP linear)")


def _adapter_spec(args: argparse.Namespace) -> Any:
    from gralora.spec import AdapterSpec

    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] \
        if args.target_modules else None
    return AdapterSpec(rank=args.rank, k=args.k, hybrid_rank=args.hybrid_rank, alpha=args.alpha,
                       dropout=args.dropout, target_modules=tuple(targets) if targets else None)


def _train(args: argparse.Namespace) -> int:
    from gralora.pipeline import SourceOptions, TrainRequest, run_training
    from gralora.spec import TrainingSpec

    output = Path(args.output)
    training = TrainingSpec(
        epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.learning_rate,
        batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_seq_length=args.max_seq_length, seed=args.seed, warmup_ratio=args.warmup_ratio,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every_steps=args.checkpoint_every_steps,
        validation_split=args.validation_split,
    )
    request = TrainRequest(
        base_model=args.base_model, dataset_uri=args.dataset, adapter=_adapter_spec(args),
        training=training, output_dir=output, validation_uri=args.validation,
        exports=tuple(e.strip() for e in args.export.split(",") if e.strip()),
        resume=args.resume, sources=SourceOptions(cache_dir=output / ".cache"),
        show_progress_bar=not args.no_progress, fast_forward=not args.peft_forward,
    )
    result = run_training(request)
    metrics = result.metrics
    print(f"adapter written to {result.adapter_dir}")
    for name, path in sorted(result.artifacts.items()):
        if name != "adapter":
            print(f"{name} written to {path}")
    summary = {k: metrics.get(k) for k in ("steps", "train_loss", "eval_loss", "trained_tokens",
                                           "runtime_seconds")}
    print(json.dumps(summary))
    return 0


def _validate_data(args: argparse.Namespace) -> int:
    from gralora.data import validate_file
    from gralora.pipeline import SourceOptions
    from gralora.sources import fetch_dataset

    fetched = fetch_dataset(args.uri, SourceOptions(cache_dir=Path(".gralora-cache")))
    tokenizer = None
    if args.base_model:
        from gralora.models import load_tokenizer

        tokenizer = load_tokenizer(args.base_model)
    report = validate_file(fetched.path, tokenizer, max_seq_length=args.max_seq_length)
    if args.json:
        print(json.dumps({**report.to_dict(), "sha256": fetched.sha256}, indent=2))
    else:
        print(report.summary())
        print(f"sha256: {fetched.sha256}")
    if not report.ok:
        print("error (invalid_dataset): the dataset has errors; fix the lines listed above",
              file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    from gralora.preflight import preflight

    report = preflight(args.base_model, _adapter_spec(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from gralora.tiny import build_tiny_model

    path = build_tiny_model(args.output_dir)
    print(f"tiny model written to {path}")
    return 0
