"""Step time and memory of ONE adapted linear layer: GraLoRA (peft, and fast_forward) vs LoRA.

Every layer is built through peft (get_peft_model on a module holding one nn.Linear), so this
measures what users run. A step is forward + backward of y = layer(x) for `tokens` tokens, with
x requiring grad as it does for every layer but the first in a model. Variants of one
(shape, rank) are run round-robin (the starting variant rotates each round) and each time is
the median over the rounds, so a burst of load on the machine hits every variant alike.

Memory on a CPU: bytes held for backward (unique storages packed by
torch.autograd.graph.saved_tensors_hooks, parameters excluded) + parameter bytes + gradient
bytes of the trainable parameters; transient buffers freed within forward or backward are not
seen. On CUDA: the peak of torch.cuda.max_memory_allocated during the step above what was
allocated before it, + parameter and gradient bytes.

    python bench/layer.py                        # full: 2 shapes x 4 ranks, 4096 tokens
    python bench/layer.py --quick                # CI-sized
    python bench/layer.py --shapes 576x1536 --ranks 64 --repeats 15 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Run as a script (python bench/x.py): the repository root must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    describe_machine,
    format_table,
    machine_summary,
    median,
    write_json,
)

TARGET = 1.10  # the bound on GraLoRA's step time relative to LoRA's at the same rank
MIB = 2**20


class OneLinear(nn.Module):
    """The smallest model peft can wrap: one linear layer named `proj`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class Variant:
    """One model to time; `label` is what the tables call it."""

    label: str
    model: nn.Module
    times: list[float] = field(default_factory=list)  # wall seconds per step
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per step
    memory_bytes: int = 0
    max_abs_diff: float | None = None  # fast variants: vs peft's forward on the same weights


def build_variants(in_features: int, out_features: int, rank: int, ks: Sequence[int],
                   device: torch.device, seed: int) -> list[Variant]:
    """Frozen layer, LoRA, and per k GraLoRA through peft and the same model with fast_forward."""
    from peft import GraloraConfig, LoraConfig, get_peft_model

    from gralora.fast_forward import enable_fast_forward

    torch.manual_seed(seed)
    base = OneLinear(in_features, out_features).to(device)
    base.requires_grad_(False)

    def wrap(config: Any) -> nn.Module:
        model = get_peft_model(copy.deepcopy(base), config)
        # B starts at zero in peft; small random values make the equality check meaningful
        # (the cost of a step does not depend on the values).
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or "gralora_B" in name):
                nn.init.normal_(param, std=0.02)
        return model

    variants = [
        Variant("frozen", copy.deepcopy(base)),
        Variant("LoRA", wrap(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]))),
    ]
    for k in ks:
        if rank % k or in_features % k or out_features % k:
            continue
        peft_model = wrap(GraloraConfig(r=rank, alpha=2 * rank, gralora_k=k,
                                        target_modules=["proj"]))
        fast_model = copy.deepcopy(peft_model)
        enable_fast_forward(fast_model)
        variants.append(Variant(f"GraLoRA k{k} peft", peft_model))
        variants.append(Variant(f"GraLoRA k{k} fast", fast_model))
    return variants


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _param_and_grad_bytes(model: nn.Module) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in _trainable(model))
    return params + grads


def _step(model: nn.Module, x_data: torch.Tensor, grad_y: torch.Tensor) -> None:
    for p in _trainable(model):
        p.grad = None
    x = x_data.detach().requires_grad_(True)
    model(x).backward(grad_y)


def time_step(model: nn.Module, x_data: torch.Tensor,
              grad_y: torch.Tensor) -> tuple[float, float]:
    """(wall, CPU) seconds for one forward + backward; on CUDA wall time from events, CPU nan.

    CPU time is what this process's threads used: other processes on the machine barely move
    it, so with one torch thread it is a steadier measure of the work than wall time.
    """
    if x_data.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        _step(model, x_data, grad_y)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0, math.nan
    wall, cpu = time.perf_counter(), time.process_time()
    _step(model, x_data, grad_y)
    return time.perf_counter() - wall, time.process_time() - cpu


def saved_for_backward_bytes(model: nn.Module, x_data: torch.Tensor) -> int:
    """Unique storages autograd keeps between forward and backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    x = x_data.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    del y
    return sum(storages.values())


def step_memory_bytes(model: nn.Module, x_data: torch.Tensor, grad_y: torch.Tensor) -> int:
    """Memory a training step of this layer needs (see the module docstring for what counts)."""
    if x_data.device.type == "cuda":
        for p in _trainable(model):
            p.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(model, x_data, grad_y)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return peak + _param_and_grad_bytes(model)
    return saved_for_backward_bytes(model, x_data) + _param_and_grad_bytes(model)


def _fast_matches_peft(variants: Sequence[Variant], x_data: torch.Tensor) -> None:
    """Fill max_abs_diff of each fast variant: its output vs the peft variant's, same weights."""
    by_label = {v.label: v for v in variants}
    probe = x_data[..., :64, :]
    with torch.no_grad():
        for v in variants:
            if v.label.endswith(" fast"):
                reference = by_label[v.label.replace(" fast", " peft")].model(probe)
                v.max_abs_diff = float((v.model(probe) - reference).abs().max())


def run_group(in_features: int, out_features: int, rank: int, ks: Sequence[int], tokens: int,
              repeats: int, warmup: int, device: torch.device, seed: int,
              progress: Callable[[str], None]) -> list[Variant]:
    """Every variant of one (shape, rank), interleaved; returns them with times and memory."""
    variants = build_variants(in_features, out_features, rank, ks, device, seed)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x_data = torch.randn(1, tokens, in_features, generator=generator).to(device)
    grad_y = torch.randn(1, tokens, out_features, generator=generator).to(device)
    _fast_matches_peft(variants, x_data)
    for v in variants:
        v.memory_bytes = step_memory_bytes(v.model, x_data, grad_y)
    for round_index in range(warmup + repeats):
        shift = round_index % len(variants)
        for v in variants[shift:] + variants[:shift]:
            wall, cpu = time_step(v.model, x_data, grad_y)
            if round_index >= warmup:
                v.times.append(wall)
                v.cpu_times.append(cpu)
    progress(f"  {in_features}x{out_features} r{rank}: " + ", ".join(
        f"{v.label} {median(v.times) * 1e3:.1f} ms" for v in variants))
    return variants


CLOCKS = ("wall", "cpu")


def _median_ms(variant: Variant, clock: str) -> float:
    return median(variant.times if clock == "wall" else variant.cpu_times) * 1e3


def group_rows(in_features: int, out_features: int, rank: int,
               variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """One row per k: median times per clock, memory deltas to LoRA, fast-vs-peft agreement."""
    by_label = {v.label: v for v in variants}
    frozen, lora = by_label["frozen"], by_label["LoRA"]
    fast_k1 = by_label.get("GraLoRA k1 fast")
    rows = []
    for label in by_label:
        if not label.endswith(" peft"):
            continue
        peft_v, fast_v = by_label[label], by_label[label.replace(" peft", " fast")]
        row: dict[str, Any] = {"in": in_features, "out": out_features, "rank": rank,
                               "k": int(label.split()[1][1:])}
        for clock in CLOCKS:
            row[clock] = {
                "frozen_ms": _median_ms(frozen, clock), "lora_ms": _median_ms(lora, clock),
                "peft_ms": _median_ms(peft_v, clock), "fast_ms": _median_ms(fast_v, clock),
                "fast_k1_ms": _median_ms(fast_k1, clock) if fast_k1 else math.nan,
            }
        row.update(
            lora_mib=lora.memory_bytes / MIB,
            peft_mem_delta_mib=(peft_v.memory_bytes - lora.memory_bytes) / MIB,
            fast_mem_delta_mib=(fast_v.memory_bytes - lora.memory_bytes) / MIB,
            fast_max_abs_diff=fast_v.max_abs_diff,
            times_s={v.label: v.times for v in variants},
            cpu_times_s={v.label: v.cpu_times for v in variants},
        )
        rows.append(row)
    return rows


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}x"


def time_table(rows: Sequence[dict[str, Any]], clock: str) -> str:
    """Median step times on one clock and GraLoRA's ratios to LoRA."""
    headers = ["in x out", "rank", "k", "frozen ms", "LoRA ms", "GraLoRA peft ms", "peft/LoRA",
               "GraLoRA fast ms", "fast/LoRA", "fast speedup", "fast k/fast k1"]
    out = []
    for r in rows:
        t = r[clock]
        out.append([
            f"{r['in']}x{r['out']}", r["rank"], r["k"], f"{t['frozen_ms']:.1f}",
            f"{t['lora_ms']:.1f}", f"{t['peft_ms']:.1f}", _ratio(t["peft_ms"] / t["lora_ms"]),
            f"{t['fast_ms']:.1f}", _ratio(t["fast_ms"] / t["lora_ms"]),
            _ratio(t["peft_ms"] / t["fast_ms"]), _ratio(t["fast_ms"] / t["fast_k1_ms"]),
        ])
    return format_table(headers, out)


def memory_table(rows: Sequence[dict[str, Any]]) -> str:
    """Step memory of LoRA, GraLoRA's extra over it, and how far fast strays from peft."""
    headers = ["in x out", "rank", "k", "LoRA MiB", "peft vs LoRA", "fast vs LoRA",
               "fast-peft max |diff|"]
    out = [[f"{r['in']}x{r['out']}", r["rank"], r["k"], f"{r['lora_mib']:.1f}",
            f"{r['peft_mem_delta_mib']:+.2f} MiB", f"{r['fast_mem_delta_mib']:+.2f} MiB",
            f"{r['fast_max_abs_diff']:.1e}"] for r in rows]
    return format_table(headers, out)


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """How many (shape, rank, k) meet the 1.10x target, per forward and clock."""
    lines = []
    for clock in CLOCKS:
        for key, name in (("peft_ms", "peft forward"), ("fast_ms", "fast_forward")):
            ratios = [(r[clock][key] / r[clock]["lora_ms"], r) for r in rows]
            if any(math.isnan(v) for v, _ in ratios):
                continue
            within = sum(1 for v, _ in ratios if v <= TARGET)
            worst, at = max(ratios, key=lambda item: item[0])
            lines.append(f"{name} ({clock} clock): {within}/{len(rows)} within {TARGET:.2f}x "
                         f"LoRA; worst {worst:.3f}x at {at['in']}x{at['out']} r{at['rank']} "
                         f"k{at['k']}")
    return "\n".join(lines)


def plot_ratios(rows: Sequence[dict[str, Any]], path: Path, clock: str) -> None:
    """Bars of GraLoRA/LoRA step time per (shape, rank, k), peft's forward beside the fast one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["in"], r["out"]) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.2), squeeze=False)
    for ax, (in_features, out_features) in zip(axes[0], shapes, strict=True):
        group = [r for r in rows if (r["in"], r["out"]) == (in_features, out_features)]
        labels = [f"r{r['rank']}\nk{r['k']}" for r in group]
        xs = range(len(group))
        peft = [r[clock]["peft_ms"] / r[clock]["lora_ms"] for r in group]
        fast = [r[clock]["fast_ms"] / r[clock]["lora_ms"] for r in group]
        ax.bar([x - 0.2 for x in xs], peft, width=0.4, label="GraLoRA, peft forward")
        ax.bar([x + 0.2 for x in xs], fast, width=0.4, label="GraLoRA, fast_forward")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(TARGET, color="red", linestyle="--", linewidth=0.8,
                   label=f"{TARGET:.2f}x target")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set(title=f"{in_features}x{out_features} (in x out)",
               ylabel=f"step time / LoRA's ({clock} clock)")
        ax.set_ylim(0, max(peft + fast + [TARGET]) + 0.2)
        ax.legend(fontsize=8, ncol=3, loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shape(text: str) -> tuple[int, int]:
    in_features, out_features = (int(v) for v in text.lower().split("x"))
    return in_features, out_features


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI (seconds)")
    parser.add_argument("--tokens", type=int, help="tokens per step (default 4096)")
    parser.add_argument("--shapes", type=lambda s: [_shape(t) for t in s.split(",")],
                        help="in x out, comma separated (default 2048x2048,576x1536)")
    parser.add_argument("--ranks", type=lambda s: [int(t) for t in s.split(",")],
                        help="default 16,32,64,128")
    parser.add_argument("--ks", type=lambda s: [int(t) for t in s.split(",")],
                        help="GraLoRA k values (default 1,2,4,8)")
    parser.add_argument("--repeats", type=int, help="timed rounds per (shape, rank) (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="clock of the printed table: wall, or process CPU time (steadier "
                             "on a busy machine, with --threads 1); the JSON has both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the time ratios here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    tokens = args.tokens or (256 if quick else 4096)
    shapes = args.shapes or ([(64, 96)] if quick else [(2048, 2048), (576, 1536)])
    ranks = args.ranks or ([8] if quick else [16, 32, 64, 128])
    ks = args.ks or ([1, 2, 4] if quick else [1, 2, 4, 8])
    repeats = args.repeats or (3 if quick else 7)
    device = torch.device(args.device)
    machine = machine_summary()
    memory_note = ("peak CUDA allocation during the step + parameters and grads"
                   if device.type == "cuda" else
                   "saved-for-backward tensors (saved_tensors_hooks) + parameters and grads")
    print(f"machine: {describe_machine(machine)}")
    print(f"device {device}, fp32, {tokens} tokens per step, {repeats} interleaved rounds "
          f"(+{args.warmup} warm-up), median; memory = {memory_note}", flush=True)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for in_features, out_features in shapes:
        for rank in ranks:
            variants = run_group(in_features, out_features, rank, ks, tokens, repeats,
                                 args.warmup, device, args.seed,
                                 progress=lambda line: print(line, flush=True))
            rows.extend(group_rows(in_features, out_features, rank, variants))
    clock = "wall" if device.type == "cuda" else args.clock
    print(f"\nGraLoRA step time relative to LoRA at the same rank, {clock} clock (target <= "
          f"{TARGET:.2f}x):")
    print(time_table(rows, clock))
    print(f"\nStep memory ({memory_note}):")
    print(memory_table(rows))
    print()
    print(verdict(rows))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.plot:
        plot_ratios(rows, args.plot, clock)
    if args.json:
        write_json(args.json, {
            "machine": machine, "device": str(device), "dtype": "float32", "tokens": tokens,
            "repeats": repeats, "warmup": args.warmup, "memory": memory_note, "target": TARGET,
            "rows": rows,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
