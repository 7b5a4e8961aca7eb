"""End to end on the tiny model: train, export, reload, resume, cancel."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gralora.checkpoints import complete_checkpoints
from gralora.errors import InvalidDataset, PreflightFailed, TrainingCancelled
from gralora.export import file_sha256
from gralora.pipeline import Progress, SourceOptions, TrainHooks, TrainRequest, run_training
from gralora.spec import AdapterSpec, TrainingSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MAX_LOGIT_DIFF = 1e-4


def request_for(model_dir: Path, out: Path, **changes: Any) -> TrainRequest:
    """A small, fast run on the chat examples; `changes` override TrainRequest fields."""
    base = TrainRequest(
        base_model=str(model_dir),
        dataset_uri=str(EXAMPLES / "chat.jsonl"),
        adapter=AdapterSpec(rank=16, hybrid_rank=4),
        training=TrainingSpec(max_steps=24, batch_size=4, max_seq_length=96,
                              learning_rate=3e-3, warmup_ratio=0.0, seed=7),
        output_dir=out,
        exports=("merged", "lora"),
        sources=SourceOptions(cache_dir=out / "cache"),
    )
    return replace(base, **changes)


def logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One training run with every export, and what its hooks saw."""
    out = tmp_path_factory.mktemp("trained")
    seen: dict[str, Any] = {"progress": [], "events": []}
    hooks = TrainHooks(
        on_progress=seen["progress"].append,
        on_event=lambda kind, level, msg, data: seen["events"].append((kind, level, msg, data)),
    )
    seen["result"] = run_training(request_for(tiny_model_dir, out), hooks)
    return seen


def test_loss_falls_and_progress_is_reported(trained: dict[str, Any]) -> None:
    progress: list[Progress] = trained["progress"]
    assert [p.step for p in progress] == list(range(1, 25))
    assert progress[-1].total_steps == 24
    losses = [p.loss for p in progress]
    assert all(loss is not None for loss in losses)
    # Single batches are noisy: compare the last quarter's mean with the untrained loss.
    assert sum(losses[-6:]) / 6 < losses[0] - 0.2  # type: ignore[operator]
    assert all(p.tokens_per_second and p.tokens_per_second > 0 for p in progress[1:])
    assert progress[-1].eta_seconds == 0
    kinds = {event[0] for event in trained["events"]}
    assert {"dataset", "preflight", "metrics", "artifact"} <= kinds


def test_resolved_spec_and_metrics(trained: dict[str, Any]) -> None:
    result = trained["result"]
    assert result.adapter.k == 2  # the paper's choice below rank 64
    assert result.adapter.effective_alpha == 32.0
    assert result.metrics["steps"] == 24
    assert result.metrics["effective_rank"] == 2 * 16 + 4
    assert result.metrics["trained_tokens"] > 0


def test_reloaded_adapter_merged_model_and_exact_lora_agree(trained: dict[str, Any],
                                                            tiny_model_dir: Path) -> None:
    result = trained["result"]
    ids = torch.randint(5, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        result.artifacts["adapter"])
    with_adapter = logits(adapter, ids)
    # The merged model was made from the in-memory trained model, so agreement with it also
    # shows that saving and reloading the adapter changed nothing.
    merged = logits(AutoModelForCausalLM.from_pretrained(result.artifacts["merged"]), ids)
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     result.artifacts["lora"])
    exact_lora = logits(lora, ids)
    assert (with_adapter - base).abs().max() > 1e-2  # training changed the model
    assert (merged - with_adapter).abs().max() < MAX_LOGIT_DIFF
    assert (exact_lora - with_adapter).abs().max() < MAX_LOGIT_DIFF


def test_exact_lora_is_a_plain_lora_of_rank_k_times_rank_plus_hybrid(
        trained: dict[str, Any]) -> None:
    lora_dir = trained["result"].artifacts["lora"]
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 2 * 16 + 4
    assert config["lora_alpha"] / config["r"] == pytest.approx(32.0 / (16 + 4))
    tensors = load_file(str(lora_dir / "adapter_model.safetensors"))
    a = next(t for name, t in tensors.items() if name.endswith("q_proj.lora_A.weight"))
    assert a.shape == (36, 128)
    # Block-sparse: each of the first k*rank rows reads only one of the k input blocks.
    nonzero_blocks = (a[:32].reshape(32, 2, 64).abs().sum(-1) > 0).sum(-1)
    assert torch.equal(nonzero_blocks, torch.ones(32, dtype=torch.long))


def test_manifest_lists_every_file_with_its_sha256(trained: dict[str, Any]) -> None:
    result = trained["result"]
    manifest = json.loads(result.artifacts["manifest"].read_text())
    assert manifest["dataset"]["sha256"] == file_sha256(EXAMPLES / "chat.jsonl")
    assert manifest["adapter"]["k"] == 2
    assert manifest["metrics"]["steps"] == 24
    for name in ("adapter", "merged", "lora"):
        files = manifest["artifacts"][name]["files"]
        assert files, name
        for entry in files:
            path = result.output_dir / manifest["artifacts"][name]["path"] / entry["path"]
            assert entry["sha256"] == file_sha256(path)
            assert entry["size_bytes"] == path.stat().st_size


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tiny_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    training = TrainingSpec(max_steps=8, batch_size=4, max_seq_length=64, learning_rate=3e-3,
                            seed=11, checkpoint_every_steps=2)
    straight = run_training(request_for(tiny_model_dir, tmp_path / "straight", training=training,
                                        exports=()))

    interrupted = request_for(tiny_model_dir, tmp_path / "interrupted", training=training,
                              exports=())
    steps_seen: list[int] = []

    def cancel_once_step_5_is_logged() -> bool:
        return bool(steps_seen) and steps_seen[-1] >= 5

    hooks = TrainHooks(on_progress=lambda p: steps_seen.append(p.step),
                       should_cancel=cancel_once_step_5_is_logged)
    with pytest.raises(TrainingCancelled):
        run_training(interrupted, hooks)
    checkpoints = complete_checkpoints(tmp_path / "interrupted" / "checkpoints")
    # Progress for step 5 is logged after step 5 ends, so the cancel lands at the end of step 6,
    # which is saved although it is not a multiple of checkpoint_every_steps.
    assert [c.name for c in checkpoints][-1] == "checkpoint-6"

    resumed = run_training(interrupted)
    assert resumed.resumed_from_step == 6
    expected = adapter_weights(straight.adapter_dir)
    actual = adapter_weights(resumed.adapter_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5)


def test_a_partial_checkpoint_is_not_resumed_from(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    fake = out / "checkpoints" / "checkpoint-3"
    fake.mkdir(parents=True)
    (fake / "trainer_state.json").write_text("{}")  # no completion marker: a crash mid-write
    training = TrainingSpec(max_steps=2, batch_size=4, max_seq_length=64)
    result = run_training(request_for(tiny_model_dir, out, training=training, exports=()))
    assert result.resumed_from_step is None
    assert result.metrics["steps"] == 2


def test_bad_dataset_fails_before_the_model_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    events: list[str] = []
    hooks = TrainHooks(on_event=lambda kind, *_: events.append(kind))
    with pytest.raises(InvalidDataset) as caught:
        run_training(request_for(tiny_model_dir, tmp_path,
                                 dataset_uri=str(EXAMPLES / "bad.jsonl")), hooks)
    assert "line 2" in caught.value.message and "line 6" in caught.value.message
    assert "preflight" not in events


def test_k_that_does_not_divide_the_layers_fails_preflight(tiny_model_dir: Path,
                                                           tmp_path: Path) -> None:
    with pytest.raises(PreflightFailed) as caught:
        run_training(request_for(tiny_model_dir, tmp_path, adapter=AdapterSpec(rank=24, k=3)))
    message = caught.value.message
    assert "q_proj (128 in, 128 out)" in message
    assert "Values of k that work with rank 24: 2, 4, 8" in message


def test_a_dataset_over_the_row_limit_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidDataset) as caught:
        run_training(request_for(tiny_model_dir, tmp_path, max_dataset_rows=5))
    assert "line 6" in caught.value.message and "5" in caught.value.message


def test_fast_forward_trains_the_same_adapter_as_peft_forward(tiny_model_dir: Path,
                                                              tmp_path: Path) -> None:
    training = TrainingSpec(max_steps=4, batch_size=4, max_seq_length=64, learning_rate=3e-3,
                            seed=5)
    runs = {
        fast: run_training(request_for(tiny_model_dir, tmp_path / str(fast), training=training,
                                       exports=(), fast_forward=fast))
        for fast in (False, True)
    }
    peft_weights = adapter_weights(runs[False].adapter_dir)
    fast_weights = adapter_weights(runs[True].adapter_dir)
    assert peft_weights.keys() == fast_weights.keys()
    moved = 0
    for name, value in peft_weights.items():
        torch.testing.assert_close(fast_weights[name], value, atol=1e-5, rtol=1e-4)
        moved += int(value.abs().max() > 0)
    assert moved  # training changed B from its zero init, so equality means something
