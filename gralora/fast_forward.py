"""A faster forward and backward for peft's GraLoRA linear layers, over the same parameters.

peft computes the k x k blocks with two einsums. Each one permutes a full activation
(x going in, the adapter output coming out) into a block-major copy, the output is then scaled
and added to the base output in two more full passes, and the backward pass repeats the copies.
On a CPU these memory passes cost about as much as the adapter's matrix products.

Here every block product is a matrix multiply on a strided view of the activation itself:
the input blocks are column slices of x, and the output blocks are accumulated straight into
column slices of the base layer's output (`addmm_`, scaling folded in). Only the small
intermediate (tokens x k x r) is regrouped. Parameter names and shapes are peft's, so adapters
save and load exactly as before, and outputs equal peft's to float rounding.

    from gralora.fast_forward import enable_fast_forward
    enable_fast_forward(peft_model)   # returns how many layers now use it
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

__all__ = ["enable_fast_forward", "disable_fast_forward", "gralora_fast_forward"]


def _gralora_linear_class() -> type[nn.Module]:
    from peft.tuners.gralora.layer import Linear

    return Linear


class _GraloraUpdate(torch.autograd.Function):
    """result += scaling * (GraLoRA(x) + hybrid LoRA(x_hybrid)), in place, with its backward.

    Shapes (T tokens, k blocks, r rank, h hybrid rank):
      result [..., out]   x [..., in]   x_hybrid [..., in] or None (then x is used)
      A [k, in/k, r]      input block n; column chunk j (r/k wide) feeds output block j
      B [k, r, out/k]     output block j; row chunk n (r/k tall) comes from input block n
      A_hybrid [h, in]    B_hybrid [out, h]   (nn.Linear weights), or None
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, result: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
        lora_b: torch.Tensor, x_hybrid: torch.Tensor | None, a_hybrid: torch.Tensor | None,
        b_hybrid: torch.Tensor | None, scaling: float,
    ) -> torch.Tensor:
        k, sub_in, r = lora_a.shape
        sub_out = lora_b.shape[2]
        sub_r = r // k
        x2 = x.reshape(-1, k * sub_in)  # [T, in]
        out2 = result.view(-1, k * sub_out)  # [T, out], shares storage with result
        tokens = x2.shape[0]

        # h[n] = x_n @ A_n, one matmul per input block straight from the column slice of x.
        h = x2.new_empty(k, tokens, r)  # [k(n), T, k(j) * sub_r]
        for n in range(k):
            torch.mm(x2[:, n * sub_in:(n + 1) * sub_in], lora_a[n], out=h[n])
        # Regroup by output block: hj[j] = [h_0[:, chunk j], ..., h_{k-1}[:, chunk j]].
        hj = h.view(k, tokens, k, sub_r).permute(2, 1, 0, 3).reshape(k, tokens, r)
        for j in range(k):
            out2[:, j * sub_out:(j + 1) * sub_out].addmm_(hj[j], lora_b[j], alpha=scaling)

        hybrid_mid = None
        xh2 = None
        if a_hybrid is not None and b_hybrid is not None:
            xh2 = x2 if x_hybrid is None else x_hybrid.reshape(-1, k * sub_in)
            hybrid_mid = xh2 @ a_hybrid.t()  # [T, h]
            out2.addmm_(hybrid_mid, b_hybrid.t(), alpha=scaling)

        ctx.mark_dirty(result)
        ctx.save_for_backward(x2, hj, lora_a, lora_b, xh2 if x_hybrid is not None else None,
                              hybrid_mid, a_hybrid, b_hybrid)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        ctx.x_hybrid_shape = None if x_hybrid is None else x_hybrid.shape
        return result

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x2, hj, lora_a, lora_b, xh2, hybrid_mid, a_hybrid, b_hybrid = ctx.saved_tensors
        needs = ctx.needs_input_grad  # (result, x, A, B, x_hybrid, A_hybrid, B_hybrid, scaling)
        scaling = ctx.scaling
        k, sub_in, r = lora_a.shape
        sub_out = lora_b.shape[2]
        sub_r = r // k
        g2 = grad_out.reshape(-1, k * sub_out)  # [T, out]
        tokens = g2.shape[0]
        grad_x = grad_a = grad_b = grad_xh = grad_ah = grad_bh = None

        # d(hj[j]) = scaling * g_j @ B_j^T: [k(j), T, r]
        grad_hj = g2.new_empty(k, tokens, r)
        for j in range(k):
            torch.mm(g2[:, j * sub_out:(j + 1) * sub_out], lora_b[j].t(), out=grad_hj[j])
        grad_hj.mul_(scaling)
        if needs[3]:
            grad_b = torch.empty_like(lora_b)
            for j in range(k):
                torch.mm(hj[j].t(), g2[:, j * sub_out:(j + 1) * sub_out], out=grad_b[j])
            grad_b.mul_(scaling)
        # Back to input-block order: [k(n), T, k(j) * sub_r]
        grad_h = grad_hj.view(k, tokens, k, sub_r).permute(2, 1, 0, 3).reshape(k, tokens, r)
        if needs[2]:
            grad_a = torch.empty_like(lora_a)
            for n in range(k):
                torch.mm(x2[:, n * sub_in:(n + 1) * sub_in].t(), grad_h[n], out=grad_a[n])

        grad_mid = None
        if hybrid_mid is not None:
            grad_mid = (g2 @ b_hybrid).mul_(scaling)  # [T, h]
            if needs[6]:
                grad_bh = (g2.t() @ hybrid_mid).mul_(scaling)
            if needs[5]:
                grad_ah = grad_mid.t() @ (x2 if xh2 is None else xh2)

        if needs[1]:
            grad_x2 = g2.new_empty(tokens, k * sub_in)
            for n in range(k):
                torch.mm(grad_h[n], lora_a[n].t(), out=grad_x2[:, n * sub_in:(n + 1) * sub_in])
            if grad_mid is not None and xh2 is None:
                grad_x2.addmm_(grad_mid, a_hybrid)  # the hybrid branch read the same x
            grad_x = grad_x2.view(ctx.x_shape)
        if needs[4] and grad_mid is not None:
            grad_xh = (grad_mid @ a_hybrid).view(ctx.x_hybrid_shape)
        return grad_out, grad_x, grad_a, grad_b, grad_xh, grad_ah, grad_bh, None


def _active(layer: Any) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.gralora_A]


def _compute_dtype(layer: Any, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fast path computes in, or None where it must leave the layer to peft."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # peft's matmuls run in the autocast dtype too; the base output already has it.
        return torch.get_autocast_dtype(device_type)
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear) or base.weight.dtype != x.dtype:
        return None
    for name in _active(layer):
        if layer.gralora_A[name].dtype != x.dtype or layer.gralora_B[name].dtype != x.dtype:
            return None  # peft computes the adapter in its own dtype, then casts: keep that
    return x.dtype


def gralora_fast_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's GraLoRA Linear.forward, computed block by block without activation copies."""
    peft_forward = type(self).forward
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return peft_forward(self, x, *args, **kwargs)
    dtype = _compute_dtype(self, x)
    if dtype is None:
        return peft_forward(self, x, *args, **kwargs)
    previous_dtype = x.dtype
    result = self.base_layer(x, *args, **kwargs)
    if result.dtype != dtype or not result.is_contiguous():
        return peft_forward(self, x, *args, **kwargs)  # unusual base output: peft's own path
    for name in _active(self):
        lora_a, lora_b = self.gralora_A[name], self.gralora_B[name]
        dropout = self.gralora_dropout[name]
        hybrid = self.hybrid_r[name] > 0
        x_cast = x.to(dtype)
        # Same calls in the same order as peft, so a seeded dropout draws the same masks.
        x_blocks = dropout(x_cast)
        x_hybrid = dropout(x_cast) if hybrid else None
        if x_hybrid is x_blocks:
            x_hybrid = None  # no dropout: one input, one gradient buffer
        a_hybrid = self.gralora_A_general[name].weight.to(dtype) if hybrid else None
        b_hybrid = self.gralora_B_general[name].weight.to(dtype) if hybrid else None
        with torch.autocast(x.device.type, enabled=False):
            result = _GraloraUpdate.apply(result, x_blocks, lora_a.to(dtype), lora_b.to(dtype),
                                          x_hybrid, a_hybrid, b_hybrid, self.scaling[name])
    return result.to(previous_dtype)


def enable_fast_forward(model: nn.Module) -> int:
    """Give every peft GraLoRA Linear in `model` the fast forward; returns how many."""
    linear = _gralora_linear_class()
    count = 0
    for module in model.modules():
        if isinstance(module, linear):
            module.forward = types.MethodType(gralora_fast_forward, module)
            count += 1
    return count


def disable_fast_forward(model: nn.Module) -> int:
    """Restore peft's forward on every layer `enable_fast_forward` changed; returns how many."""
    count = 0
    for module in model.modules():
        bound = module.__dict__.get("forward")
        if isinstance(bound, types.MethodType) and bound.__func__ is gralora_fast_forward:
            del module.forward
            count += 1
    return count
