"""An oracle for peft's GraLoRA layer, written from the paper's block formula, not peft's code.

dW is a k x k grid of blocks; block (j, n) (output block j, input block n) is B_jn @ A_jn of rank
rank/k, and the whole update is scaled by alpha / (rank + hybrid_rank).
"""

from __future__ import annotations

import pytest
import torch
from peft import GraloraConfig, LoraConfig, get_peft_model
from torch import nn


class OneLinear(nn.Module):
    """A model holding one linear layer, so peft adapts exactly that layer."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def adapted(in_f: int, out_f: int, rank: int, k: int, hybrid: int = 0, alpha: float = 7.0,
            seed: int = 0) -> nn.Module:
    """A GraLoRA-adapted OneLinear with random A and B (init_weights=False), eval mode."""
    torch.manual_seed(seed)
    config = GraloraConfig(r=rank, gralora_k=k, hybrid_r=hybrid, alpha=alpha,
                           gralora_dropout=0.0, target_modules=["proj"], init_weights=False)
    model = get_peft_model(OneLinear(in_f, out_f), config)
    model.eval()
    return model


def layer_of(model: nn.Module) -> nn.Module:
    return model.base_model.model.proj


def oracle_delta(layer: nn.Module) -> torch.Tensor:
    """dW from the block formula: dW[j, n] = B_jn @ A_jn, times alpha / (rank + hybrid)."""
    a = layer.gralora_A["default"].detach()  # [k, in/k, rank]: input block n's A, all j's
    b = layer.gralora_B["default"].detach()  # [k, rank, out/k]: output block j's B, all n's
    k, in_block, rank = a.shape
    out_block, s = b.shape[2], rank // k
    hybrid = layer.hybrid_r["default"]
    delta = torch.zeros(k * out_block, k * in_block)
    for j in range(k):
        for n in range(k):
            a_jn = a[n, :, j * s:(j + 1) * s].T  # (rank/k) x (in/k)
            b_jn = b[j, n * s:(n + 1) * s, :].T  # (out/k) x (rank/k)
            delta[j * out_block:(j + 1) * out_block, n * in_block:(n + 1) * in_block] = b_jn @ a_jn
    if hybrid:
        delta += (layer.gralora_B_general["default"].weight
                  @ layer.gralora_A_general["default"].weight).detach()
    return delta * layer.alpha["default"] / (rank + hybrid)


def functional_delta(model: nn.Module) -> torch.Tensor:
    """dW measured through the unmerged forward: feed the identity, subtract the base output."""
    layer = layer_of(model)
    in_f = layer.in_features
    with torch.no_grad():
        eye = torch.eye(in_f).unsqueeze(0)  # [1, in, in]: every input unit once
        adapted_out = model(eye)[0]
        base_out = layer.base_layer(eye)[0]
    return (adapted_out - base_out).T  # [out, in]


@pytest.mark.parametrize(("in_f", "out_f", "rank", "k", "hybrid"), [
    (64, 64, 8, 2, 0), (64, 96, 16, 4, 0), (96, 64, 8, 4, 4), (32, 32, 8, 8, 0),
    (48, 48, 6, 3, 2),
])
def test_block_formula_equals_peft_merged_delta_and_forward(in_f: int, out_f: int, rank: int,
                                                            k: int, hybrid: int) -> None:
    model = adapted(in_f, out_f, rank, k, hybrid)
    layer = layer_of(model)
    expected = oracle_delta(layer)
    assert expected.abs().max() > 0  # random B: a non-trivial update
    torch.testing.assert_close(layer.get_delta_weight("default"), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(functional_delta(model), expected, atol=1e-5, rtol=1e-5)


def test_merged_forward_equals_unmerged_forward() -> None:
    model = adapted(64, 96, 16, 4, hybrid=4)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        unmerged = model(x)
        merged = model.merge_and_unload()(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("in_f", "out_f", "rank", "k"), [(64, 64, 16, 2), (128, 64, 32, 4),
                                                          (64, 128, 8, 8)])
def test_trainable_parameters_equal_lora_at_the_same_rank(in_f: int, out_f: int, rank: int,
                                                          k: int) -> None:
    gralora = adapted(in_f, out_f, rank, k)
    lora = get_peft_model(OneLinear(in_f, out_f),
                          LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]))

    def trainable(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    assert trainable(gralora) == trainable(lora) == rank * (in_f + out_f)


@pytest.mark.parametrize(("rank", "k", "hybrid", "expected_rank"), [
    (8, 1, 0, 8), (8, 2, 0, 16), (8, 4, 0, 32), (16, 4, 0, 64), (8, 4, 4, 36), (32, 4, 0, 64),
])
def test_rank_of_update_reaches_k_times_rank(rank: int, k: int, hybrid: int,
                                             expected_rank: int) -> None:
    # 64 x 64 caps the rank at 64: rank 32 with k = 4 would be 128 in a larger layer.
    delta = oracle_delta(layer_of(adapted(64, 64, rank, k, hybrid, seed=3)))
    assert int(torch.linalg.matrix_rank(delta, rtol=1e-4)) == expected_rank


def test_k_equal_one_is_lora() -> None:
    rank, alpha = 8, 16.0
    gralora = adapted(48, 40, rank, 1, alpha=alpha)
    g_layer = layer_of(gralora)
    torch.manual_seed(1)
    lora = get_peft_model(OneLinear(48, 40), LoraConfig(r=rank, lora_alpha=alpha,
                                                        target_modules=["proj"]))
    lora.eval()
    l_layer = lora.base_model.model.proj
    with torch.no_grad():
        l_layer.base_layer.weight.copy_(g_layer.base_layer.weight)
        # With one block, A is [1, in, rank] and B is [1, rank, out]: LoRA's A^T and B^T.
        l_layer.lora_A["default"].weight.copy_(g_layer.gralora_A["default"][0].T)
        l_layer.lora_B["default"].weight.copy_(g_layer.gralora_B["default"][0].T)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(gralora(x), lora(x), atol=1e-5, rtol=1e-5)


def test_default_initialisation_starts_from_the_base_model() -> None:
    torch.manual_seed(0)
    config = GraloraConfig(r=8, gralora_k=2, alpha=16, target_modules=["proj"])
    model = get_peft_model(OneLinear(32, 32), config)
    assert torch.count_nonzero(layer_of(model).get_delta_weight("default")) == 0
