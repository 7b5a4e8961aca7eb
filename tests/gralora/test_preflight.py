"""Preflight from the config alone: targets, k, parameter counts, errors that name layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gralora.errors import InvalidSpec, PreflightFailed
from gralora.preflight import preflight
from gralora.spec import AdapterSpec, choose_k, preferred_k

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(("rank", "k"), [(8, 2), (16, 2), (32, 2), (64, 4), (128, 4)])
def test_the_paper_rule_for_k(rank: int, k: int) -> None:
    assert preferred_k(rank) == k
    assert choose_k(rank, [4096, 11008]) == k


def test_choose_k_falls_back_to_a_k_that_divides_everything() -> None:
    assert choose_k(64, [4096, 1026]) == 2  # 1026 is not divisible by 4
    assert choose_k(16, [4097]) == 1


def test_defaults_target_every_attention_and_mlp_linear(tiny_model_dir: Path) -> None:
    report = preflight(str(tiny_model_dir), AdapterSpec(rank=16))
    assert report.spec.target_modules == ALL_LINEAR
    assert report.spec.k == 2 and report.spec.effective_alpha == 32
    assert len(report.modules) == 14  # 7 per layer, 2 layers, lm_head left out
    # LoRA's count at the same rank: rank * (in + out) per layer.
    expected = sum(16 * (m.in_features + m.out_features) for m in report.modules)
    assert report.trainable_parameters == expected
    assert report.effective_rank == 32


def test_preflight_counts_match_the_real_peft_model(tiny_model_dir: Path) -> None:
    from peft import get_peft_model

    report = preflight(str(tiny_model_dir), AdapterSpec(rank=16, k=4, hybrid_rank=4))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           report.spec.to_peft_config())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report.trainable_parameters


def test_preflight_loads_no_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(torch, "load", no_weights)
    monkeypatch.setattr("safetensors.torch.load_file", no_weights)
    monkeypatch.setattr("safetensors.safe_open", no_weights)
    assert preflight(str(tiny_model_dir), AdapterSpec(rank=8)).modules


def test_a_k_that_does_not_divide_a_layer_names_it_and_suggests_ks(tiny_model_dir: Path) -> None:
    with pytest.raises(PreflightFailed) as caught:
        preflight(str(tiny_model_dir), AdapterSpec(rank=48, k=3))
    error = caught.value
    assert error.field == "k"
    assert "model.layers.0.mlp.gate_proj (128 in, 256 out)" in error.message
    assert "2, 4, 8, 16" in error.message
    assert error.details["valid_k"] == [2, 4, 8, 16]


def test_unknown_target_modules_are_named(tiny_model_dir: Path) -> None:
    with pytest.raises(PreflightFailed) as caught:
        preflight(str(tiny_model_dir), AdapterSpec(rank=8, target_modules=("q_proj", "qkv")))
    assert "['qkv']" in caught.value.message and "q_proj" in caught.value.message


def test_rank_not_divisible_by_k_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpec) as caught:
        AdapterSpec(rank=10, k=4)
    assert caught.value.field == "k" and "1, 2, 5, 10" in caught.value.message
