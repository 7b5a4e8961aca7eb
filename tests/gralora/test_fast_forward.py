"""gralora.fast_forward must compute exactly what peft's GraLoRA forward computes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import GraloraConfig, PeftModel, get_peft_model
from torch import nn

from gralora import fast_forward
from gralora.fast_forward import disable_fast_forward, enable_fast_forward

IN, OUT, RANK = 48, 24, 8


class TwoLinears(nn.Module):
    """Two adapted layers in a row, so the first one's input gradient flows through the second."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, OUT, bias=True)
        self.down = nn.Linear(OUT, IN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _pair(k: int, hybrid: int, dropout: float = 0.0,
          dtype: torch.dtype = torch.float64) -> tuple[Any, Any]:
    """A peft GraLoRA model with random (non-zero) A and B, and a fast copy of it."""
    torch.manual_seed(0)
    config = GraloraConfig(r=RANK, gralora_k=k, hybrid_r=hybrid, alpha=2 * RANK,
                           gralora_dropout=dropout, target_modules=["up", "down"],
                           init_weights=False)
    reference = get_peft_model(TwoLinears(), config).to(dtype)
    fast = copy.deepcopy(reference)
    assert enable_fast_forward(fast) == 2
    return reference, fast


def _run(model: nn.Module, x: torch.Tensor, grad: torch.Tensor | None = None,
         seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    y.backward(torch.ones_like(y) if grad is None else grad)
    assert x.grad is not None
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.fixture
def count_fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the fast kernel, so a silent fallback to peft's forward cannot pass."""
    calls: list[int] = []
    original = fast_forward._GraloraUpdate.forward

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fast_forward._GraloraUpdate, "forward", staticmethod(spy))
    return calls


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("hybrid", [0, 4])
@pytest.mark.parametrize("shape", [(3, 5), (7,)], ids=["3d", "2d"])
def test_outputs_and_gradients_equal_peft(k: int, hybrid: int, shape: tuple[int, ...],
                                          count_fast_calls: list[int]) -> None:
    reference, fast = _pair(k, hybrid, dropout=0.1)
    reference.eval()
    fast.eval()  # dropout is the identity in eval mode
    x = torch.randn(*shape, IN, dtype=torch.float64)
    grad = torch.randn(*shape, IN, dtype=torch.float64)
    y_ref, gx_ref, grads_ref = _run(reference, x, grad)
    y_fast, gx_fast, grads_fast = _run(fast, x, grad)
    assert len(count_fast_calls) == 2  # both layers took the fast path
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-12, atol=1e-12)
    assert grads_fast.keys() == grads_ref.keys()
    assert any("gralora_A" in n for n in grads_ref) and any("gralora_B" in n for n in grads_ref)
    if hybrid:
        assert any("gralora_A_general" in n for n in grads_ref)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_fast[name], g, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("k,hybrid", [(2, 0), (4, 4)])
def test_float32_training_dropout_draws_the_same_masks(k: int, hybrid: int) -> None:
    # peft calls the dropout module once for the blocks and once for the hybrid branch; the
    # fast path makes the same calls in the same order, so a seeded run matches exactly.
    reference, fast = _pair(k, hybrid, dropout=0.3, dtype=torch.float32)
    reference.train()
    fast.train()
    x = torch.randn(4, 6, IN)
    y_ref, gx_ref, grads_ref = _run(reference, x, seed=123)
    y_fast, gx_fast, grads_fast = _run(fast, x, seed=123)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-5, atol=1e-5)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_fast[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_a_wrong_block_mapping_would_be_caught() -> None:
    # The check above has teeth: swapping two output blocks of B changes the output.
    reference, fast = _pair(2, 0)
    with torch.no_grad():
        b = fast.base_model.model.up.gralora_B["default"]
        b.copy_(b.flip(0))
    x = torch.randn(3, IN, dtype=torch.float64)
    assert not torch.allclose(fast(x), reference(x))


def test_saved_adapter_is_peft_loadable_and_names_unchanged(tmp_path: Path) -> None:
    reference, fast = _pair(4, 4)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in reference.named_parameters()]
    fast.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TwoLinears().to(torch.float64), tmp_path / "adapter")
    x = torch.randn(2, IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))


def test_no_grad_merged_and_disabled_adapters_match_peft() -> None:
    reference, fast = _pair(2, 4)
    x = torch.randn(2, 3, IN, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x))
        with fast.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(fast(x), reference(x))
        fast.merge_adapter()
        reference.merge_adapter()
        torch.testing.assert_close(fast(x), reference(x))


def test_mixed_dtypes_fall_back_to_peft(count_fast_calls: list[int]) -> None:
    # A bf16 base with fp32 adapters: peft computes the adapter in fp32; the fast path declines.
    reference, fast = _pair(2, 0, dtype=torch.float32)
    for model in (reference, fast):
        for name, module in model.named_modules():
            if name.endswith(("up.base_layer", "down.base_layer")):
                module.to(torch.bfloat16)
    x = torch.randn(2, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x))
    assert count_fast_calls == []


def test_cpu_autocast_matches_peft_closely() -> None:
    reference, fast = _pair(4, 0, dtype=torch.float32)
    x = torch.randn(2, 8, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, gx_ref, _ = _run(reference, x)
        y_fast, gx_fast, _ = _run(fast, x)
    assert y_fast.dtype == y_ref.dtype
    torch.testing.assert_close(y_fast, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=2e-2, atol=2e-2)


def test_disable_fast_forward_restores_peft() -> None:
    _, fast = _pair(2, 0)
    assert disable_fast_forward(fast) == 2
    assert disable_fast_forward(fast) == 0
    assert all("forward" not in m.__dict__ for m in fast.modules())
