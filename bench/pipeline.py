"""Pipeline overhead: one training job through the service against a bare peft + Trainer loop.

The same job (model, data, steps, batch, sequence length, seed, adapter) runs several ways:

- bare: a subprocess that loads the model, wraps it with peft's get_peft_model and runs the HF
  Trainer with no callbacks, logging or checkpoints. Tokens are counted in the collator.
- engine: a subprocess calling gralora.pipeline.run_training (what `gralora train` runs):
  dataset validation, preflight, the progress/cancel/checkpoint callbacks, export.
- engine+db: the same, with the worker's own hooks (worker.runner.JobHooks) writing events,
  progress and cancel checks to the service's Postgres database, each call timed: the
  database's share of the training loop, without Celery or the API.
- engine+db-throttled (optional): the same, with "metrics" events passed to the hooks at
  most once per progress interval (what a throttle in worker/ would do).
- service: POST /jobs to `gralora api`, trained by `gralora worker` (Celery, one child per
  job), both real processes on a private Postgres database and the local Redis, polled over
  HTTP until it succeeds. Tokens/s is the last "metrics" event's, as users see it.
- service-preload (optional): the same with a worker whose main process imports torch,
  transformers and peft before forking its children (what a fix in worker/ would do).

Each repeat runs the variants in turn, so a burst of load on the machine hits them all;
the table shows medians. Tokens/s counts non-padding tokens from the first step's start
to the last step's end (model loading and data validation are not in it). Peak memory is the
process's VmHWM (peak RSS): the bare/engine subprocess, and the worker's child that ran the
job (sampled from /proc every 0.2 s). Time to first step: from POST /jobs to the job's first
"metrics" event (event timestamps) for the service; from process start for bare and engine.

    python bench/pipeline.py                     # tiny Llama, 3 repeats
    python bench/pipeline.py --quick             # CI-sized, under 2 minutes
    python bench/pipeline.py --model /models/SmolLM2-135M --steps 30 --batch-size 4
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

# Run as a script (python bench/x.py): the repository root must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import describe_machine, format_table, machine_summary, median, write_json
from bench.service_stack import (
    ManagedProcess,
    ServiceStack,
    child_pids,
    peak_rss_bytes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.95  # the service's tokens/s must stay within 5% of the bare loop's
MIB = 2**20
VARIANTS = ("bare", "engine", "engine+db", "engine+db-throttled", "service",
            "service-preload")
JOB_TIMEOUT = 1800.0
RSS_SAMPLE_SECONDS = 0.2
POLL_SECONDS = 1.0


@dataclass
class Workload:
    """One training job, identical for every variant (the adapter fully resolved)."""

    model: str
    dataset: str
    rank: int
    k: int
    alpha: float
    dropout: float
    target_modules: list[str]
    steps: int
    batch_size: int
    max_seq_length: int
    seed: int
    learning_rate: float

    def job_body(self) -> dict[str, Any]:
        """The POST /jobs body for this workload."""
        return {
            "base_model": self.model, "dataset_uri": Path(self.dataset).as_uri(),
            "rank": self.rank, "k": self.k, "alpha": self.alpha, "dropout": self.dropout,
            "target_modules": self.target_modules, "max_steps": self.steps,
            "batch_size": self.batch_size, "max_seq_length": self.max_seq_length,
            "seed": self.seed, "learning_rate": self.learning_rate,
        }


# --- the subprocess variants ----------------------------------------------------------------


def _own_peak_rss() -> int:
    return peak_rss_bytes(os.getpid()) or 0


def run_bare(workload: Workload, work_dir: Path) -> dict[str, Any]:
    """peft + Trainer and nothing else; the data tokenized as the engine does it."""
    import torch
    from peft import GraloraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    from gralora.data import load_dataset
    from gralora.encoding import PaddingCollator

    imported = time.time()
    tokenizer = AutoTokenizer.from_pretrained(workload.model)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # as gralora.models.load_tokenizer does
    dataset, _ = load_dataset(Path(workload.dataset), tokenizer,
                              max_seq_length=workload.max_seq_length)
    data_ready = time.time()
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    set_seed(workload.seed)
    config = GraloraConfig(r=workload.rank, gralora_k=workload.k,
                           alpha=workload.alpha,  # type: ignore[arg-type]
                           gralora_dropout=workload.dropout,
                           target_modules=workload.target_modules, task_type="CAUSAL_LM")
    base = AutoModelForCausalLM.from_pretrained(
        workload.model, dtype=torch.bfloat16 if cuda_bf16 else torch.float32)
    model = get_peft_model(base, config)
    model_ready = time.time()

    collate = PaddingCollator.for_tokenizer(tokenizer)
    batch_tokens: list[int] = []

    def counting_collator(features: Any) -> dict[str, Any]:
        batch = collate(features)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class Clock(TrainerCallback):
        """Wall times of train begin and of each step's end (nothing else)."""

        def __init__(self) -> None:
            self.begin = 0.0
            self.step_ends: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begin = time.time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.step_ends.append(time.time())

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(work_dir / "bare"), max_steps=workload.steps,
        learning_rate=workload.learning_rate, lr_scheduler_type="cosine", warmup_steps=0.1,
        weight_decay=0.0, per_device_train_batch_size=workload.batch_size,
        seed=workload.seed, data_seed=workload.seed, bf16=cuda_bf16,
        use_cpu=not torch.cuda.is_available(), logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, label_names=["labels"])
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=counting_collator, callbacks=[clock])
    output = trainer.train()
    steps = len(clock.step_ends)
    tokens = sum(batch_tokens[:steps])  # the loader may have collated one batch ahead
    seconds = clock.step_ends[-1] - clock.begin
    return {
        "tokens_per_second": tokens / seconds, "trained_tokens": tokens, "steps": steps,
        "train_seconds": seconds, "train_loss": float(output.training_loss),
        "first_step_at": clock.step_ends[0], "imported_at": imported,
        "data_ready_at": data_ready, "model_ready_at": model_ready,
        "step_seconds": step_durations(clock.step_ends),
        "peak_rss_bytes": _own_peak_rss(),
    }


def train_request(workload: Workload, work_dir: Path) -> Any:
    """The engine's TrainRequest for the workload (a local file, no exports, no resume)."""
    from gralora.pipeline import SourceOptions, TrainRequest
    from gralora.spec import AdapterSpec, TrainingSpec

    return TrainRequest(
        base_model=workload.model, dataset_uri=workload.dataset,
        adapter=AdapterSpec(rank=workload.rank, k=workload.k, alpha=workload.alpha,
                            dropout=workload.dropout,
                            target_modules=tuple(workload.target_modules)),
        training=TrainingSpec(max_steps=workload.steps, batch_size=workload.batch_size,
                              max_seq_length=workload.max_seq_length, seed=workload.seed,
                              learning_rate=workload.learning_rate),
        output_dir=work_dir / "engine", resume=False,
        sources=SourceOptions(cache_dir=work_dir / "cache"))


def run_engine(workload: Workload, work_dir: Path) -> dict[str, Any]:
    """gralora.pipeline.run_training, as `gralora train` runs it, without the service."""
    from gralora.pipeline import Progress, TrainHooks, run_training

    imported = time.time()
    progress: list[tuple[float, Progress]] = []
    result = run_training(train_request(workload, work_dir), TrainHooks(
        on_progress=lambda p: progress.append((time.time(), p))))
    return _engine_result(result, progress, imported)


def _engine_result(result: Any, progress: Sequence[tuple[float, Any]],
                   imported: float) -> dict[str, Any]:
    last = progress[-1][1]
    return {
        "tokens_per_second": last.tokens_per_second, "trained_tokens": last.trained_tokens,
        "steps": last.step, "train_seconds": last.trained_tokens / last.tokens_per_second,
        "train_loss": result.metrics.get("train_loss"), "first_step_at": progress[0][0],
        "imported_at": imported, "peak_rss_bytes": _own_peak_rss(),
        "step_seconds": step_durations([at for at, _ in progress]),
    }


def run_engine_with_db_hooks(workload: Workload, work_dir: Path, *,
                             throttle_metrics: bool = False) -> dict[str, Any]:
    """run_training with the worker's own JobHooks on the stack's database, each call timed.

    The job row is inserted directly, already running and leased to this process, so the
    hooks write exactly what they write in the worker: a "metrics" event per logged step,
    progress at most every GRALORA_PROGRESS_INTERVAL_SECONDS, a cancel check at most 1/s.
    With `throttle_metrics`, "metrics" events are passed on at most as often as progress
    (and always for the last step): what a throttle in JobHooks.on_event would do.
    """
    from gralora.pipeline import Progress, TrainHooks, run_training
    from service.db import session_scope
    from service.models import Job, utcnow
    from service.settings import get_settings
    from worker.runner import JobHooks, LeaseHeartbeat

    imported = time.time()
    worker_id = f"bench-hooks-{os.getpid()}"
    settings = get_settings()
    now = utcnow()
    with session_scope() as session:
        job = Job(owner="bench-hooks", status="running", spec=workload.job_body(),
                  user_metadata={}, queue=settings.queue, attempt=1, lease_owner=worker_id,
                  lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
                  created_at=now, updated_at=now, queued_at=now, started_at=now)
        session.add(job)
        session.flush()
        job_id = job.id
    heartbeat = LeaseHeartbeat(job_id, worker_id, settings.lease_seconds)
    job_hooks = JobHooks(job_id, worker_id, heartbeat, settings.progress_interval_seconds)
    calls: dict[str, list[float]] = {"on_event(metrics)": [], "on_event(other)": [],
                                     "on_progress": [], "should_cancel": []}
    progress: list[tuple[float, Progress]] = []

    def on_progress(snapshot: Progress) -> None:
        started = time.perf_counter()
        job_hooks.on_progress(snapshot)
        calls["on_progress"].append(time.perf_counter() - started)
        progress.append((time.time(), snapshot))

    last_metrics_write = [float("-inf")]

    def on_event(kind: str, level: str, message: str, data: dict[str, Any]) -> None:
        started = time.perf_counter()
        if throttle_metrics and kind == "metrics":
            final = data.get("step") == data.get("total_steps")
            if not final and started - last_metrics_write[0] < settings.progress_interval_seconds:
                calls["on_event(metrics)"].append(time.perf_counter() - started)
                return
            last_metrics_write[0] = started
        job_hooks.on_event(kind, level, message, data)
        name = "on_event(metrics)" if kind == "metrics" else "on_event(other)"
        calls[name].append(time.perf_counter() - started)

    def should_cancel() -> bool:
        started = time.perf_counter()
        answer = job_hooks.should_cancel()
        calls["should_cancel"].append(time.perf_counter() - started)
        return answer

    heartbeat.start()
    try:
        result = run_training(train_request(workload, work_dir), TrainHooks(
            on_progress=on_progress, on_event=on_event, should_cancel=should_cancel))
    finally:
        heartbeat.stop()
    return {**_engine_result(result, progress, imported), "hook_seconds": calls}


def step_durations(step_ends: Sequence[float]) -> list[float]:
    """Seconds between consecutive step ends (every step but the first)."""
    return [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)]


def child_main(variant: str, workload_path: Path, result_path: Path) -> int:
    """Entry point of a subprocess variant: run once, write the result as JSON."""
    workload = Workload(**json.loads(workload_path.read_text()))
    with tempfile.TemporaryDirectory(prefix=f"bench-{variant}-") as tmp:
        runners: dict[str, Callable[[Workload, Path], dict[str, Any]]] = {
            "bare": run_bare, "engine": run_engine, "engine+db": run_engine_with_db_hooks,
            "engine+db-throttled": functools.partial(run_engine_with_db_hooks,
                                                     throttle_metrics=True)}
        runner = runners[variant]
        result = runner(workload, Path(tmp))
    result_path.write_text(json.dumps(result))
    return 0


# --- measuring from outside ----------------------------------------------------------------


class PeakRssSampler:
    """Samples VmHWM of the processes `pids()` names, every RSS_SAMPLE_SECONDS, in a thread."""

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self.pids = pids
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> PeakRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        """Read every watched process's peak once."""
        for pid in self.pids():
            peak = peak_rss_bytes(pid)
            if peak is not None:
                self.peaks[pid] = max(self.peaks.get(pid, 0), peak)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self.sample()

    def peak(self) -> int:
        """The highest peak of any watched process."""
        return max(self.peaks.values(), default=0)


def run_subprocess_variant(variant: str, workload_path: Path, work_dir: Path,
                           env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a bare/engine variant in a fresh interpreter; its result with timings."""
    result_path = work_dir / f"{variant}-result.json"
    log_path = work_dir / f"{variant}.log"
    started = time.time()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", variant,
             "--workload", str(workload_path), "--result", str(result_path)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            # Its own session, like the service's worker: with autogroup scheduling the
            # kernel shares CPU between sessions, so every variant trains in one of its own.
            start_new_session=True)
        try:
            with PeakRssSampler(lambda: [process.pid]) as sampler:
                code = process.wait(timeout=JOB_TIMEOUT)
        finally:
            if process.poll() is None:  # interrupted or timed out: its own session, so kill it
                process.kill()
                process.wait()
    if code != 0:
        raise RuntimeError(f"the {variant} run exited {code}:\n"
                           f"{log_path.read_text(errors='replace')[-4000:]}")
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result["peak_rss_bytes"] = max(result["peak_rss_bytes"], sampler.peak())
    result["first_step_seconds"] = result["first_step_at"] - started
    result["wall_seconds"] = time.time() - started
    return result


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def fetch_events(client: Any, job_id: str) -> list[dict[str, Any]]:
    """Every event of a job, following the `after` cursor."""
    events: list[dict[str, Any]] = []
    after: int | None = None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if after is not None:
            params["after"] = after
        page = client.get(f"/jobs/{job_id}/events", params=params)
        page.raise_for_status()
        body = page.json()
        events.extend(body["data"])
        if not body["has_more"] or not body["data"]:
            return events
        after = body["data"][-1]["seq"]


def _first(events: Sequence[dict[str, Any]], kind: str,
           status: str | None = None) -> dict[str, Any] | None:
    for event in events:
        if event["type"] == kind and (status is None
                                      or (event.get("data") or {}).get("status") == status):
            return event
    return None


def run_service_job(client: Any, stack: ServiceStack, worker: ManagedProcess,
                    workload: Workload) -> dict[str, Any]:
    """Submit the job over HTTP, poll until it ends, and read its timings from its events."""
    watched: set[int] = set()

    def worker_children() -> list[int]:
        current = child_pids(worker.pid)
        watched.update(current)
        return current

    with PeakRssSampler(worker_children) as sampler:
        submitted = time.time()
        response = client.post("/jobs", json=workload.job_body())
        if response.status_code != 201:
            raise RuntimeError(f"POST /jobs answered {response.status_code}: {response.text}")
        job_id = response.json()["id"]
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            job = client.get(f"/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {JOB_TIMEOUT} s")
            time.sleep(POLL_SECONDS)
        # The child exits after its one job (max_tasks_per_child=1): sample it to the end.
        ran_job = max(sampler.peaks, key=sampler.peaks.__getitem__, default=None)
        settle = time.monotonic() + 10
        while ran_job in child_pids(worker.pid) and time.monotonic() < settle:
            time.sleep(RSS_SAMPLE_SECONDS)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}\n"
                           f"worker log:\n{worker.log()[-4000:]}")
    events = fetch_events(client, job_id)
    metrics = [e for e in events if e["type"] == "metrics"]
    if not metrics:
        raise RuntimeError(f"job {job_id} has no metrics event")
    last = metrics[-1]["data"]
    times = {
        "queued": _first(events, "status", "queued"),
        "running": _first(events, "status", "running"),
        "dataset": _first(events, "dataset"),
        "preflight": _first(events, "preflight"),
        "first_step": metrics[0],
        "succeeded": _first(events, "status", "succeeded"),
    }
    at = {name: _parse_time(event["created_at"]) for name, event in times.items() if event}
    with stack.connect() as conn:  # the job's final metrics are not in the public view
        row = conn.execute("SELECT metrics FROM jobs WHERE id = %s", (job_id,)).fetchone()
    job_metrics = row[0] if row and row[0] else {}
    return {
        "tokens_per_second": last["tokens_per_second"], "trained_tokens": last["trained_tokens"],
        "steps": last["step"], "train_loss": job_metrics.get("train_loss"),
        "peak_rss_bytes": sampler.peak(), "first_step_seconds": at["first_step"] - submitted,
        "wall_seconds": at.get("succeeded", time.time()) - submitted,
        "phases": {
            "submit_to_running": at["running"] - submitted,
            "running_to_dataset": at["dataset"] - at["running"],
            "dataset_to_preflight": at["preflight"] - at["dataset"],
            "preflight_to_first_step": at["first_step"] - at["preflight"],
        },
        "metrics_events": len(metrics),
        "step_seconds": step_durations([_parse_time(e["created_at"]) for e in metrics]),
        "worker_children_seen": len(watched),
    }


# --- the benchmark -----------------------------------------------------------------------


def prepare_dataset(source: Path, rows: int, target: Path) -> Path:
    """`source` repeated until it has `rows` lines, written to `target`."""
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    target.write_text("".join(lines[i % len(lines)] + "\n" for i in range(rows)))
    return target


def resolve_workload(args: argparse.Namespace, model: Path, dataset: Path) -> Workload:
    """The job with k, alpha and the target modules chosen once, by the engine's preflight."""
    from gralora.preflight import preflight
    from gralora.spec import AdapterSpec

    spec = preflight(str(model), AdapterSpec(rank=args.rank)).spec
    assert spec.k is not None and spec.target_modules is not None
    return Workload(model=str(model), dataset=str(dataset), rank=args.rank, k=spec.k,
                    alpha=spec.effective_alpha, dropout=0.05,
                    target_modules=list(spec.target_modules), steps=args.steps,
                    batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                    seed=args.seed, learning_rate=args.learning_rate)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians per variant of tokens/s, peak RSS, time to first step, wall time, loss."""
    out: dict[str, dict[str, float]] = {}
    for variant, results in runs.items():
        if not results:
            continue
        out[variant] = {
            name: median([float(r[name]) for r in results])
            for name in ("tokens_per_second", "peak_rss_bytes", "first_step_seconds",
                         "wall_seconds")
        }
        # Step i trains the same batch in every variant, so pooled medians compare like for
        # like, and a burst of load on the machine moves a median less than a mean.
        out[variant]["median_step_seconds"] = median(
            [t for r in results for t in r["step_seconds"]])
        losses = [float(r["train_loss"]) for r in results if r.get("train_loss") is not None]
        if losses:
            out[variant]["train_loss"] = median(losses)
    return out


def ratio_table(summary: dict[str, dict[str, float]],
                runs: dict[str, list[dict[str, Any]]]) -> str:
    """Each variant against bare: tokens/s, median step time, peak RSS, time to first step."""
    bare = summary["bare"]
    rows = []
    for variant in VARIANTS:
        if variant not in summary:
            continue
        s = summary[variant]
        spread = [r["tokens_per_second"] for r in runs[variant]]
        rows.append([
            variant, f"{s['tokens_per_second']:.0f} ({min(spread):.0f}-{max(spread):.0f})",
            f"{s['tokens_per_second'] / bare['tokens_per_second']:.3f}x",
            f"{s['median_step_seconds'] * 1000:.1f}",
            f"{bare['median_step_seconds'] / s['median_step_seconds']:.3f}x",
            f"{s['peak_rss_bytes'] / MIB:.0f}",
            f"{s['peak_rss_bytes'] / bare['peak_rss_bytes']:.2f}x",
            f"{s['first_step_seconds']:.1f}", f"{s['wall_seconds']:.1f}",
            f"{s['train_loss']:.4f}" if "train_loss" in s else "-",
        ])
    return format_table(["variant", "tokens/s median (min-max)", "tokens/s vs bare",
                         "median step ms", "step rate vs bare", "peak RSS MiB", "RSS vs bare",
                         "to first step s", "wall s", "train loss"], rows)


def phase_table(runs: Sequence[dict[str, Any]]) -> str:
    """Where the service's time to first step goes (medians of the event timestamps)."""
    names = ("submit_to_running", "running_to_dataset", "dataset_to_preflight",
             "preflight_to_first_step")
    labels = {
        "submit_to_running": "POST -> claimed by the worker (broker, claim)",
        "running_to_dataset": "claimed -> dataset validated (tokenizer, fetch, tokenize)",
        "dataset_to_preflight": "validated -> preflight done",
        "preflight_to_first_step": "preflight -> first step logged (model, peft, step 1)",
    }
    return format_table(["phase", "median s"],
                        [[labels[n], f"{median([r['phases'][n] for r in runs]):.2f}"]
                         for n in names])


def hook_table(runs: Sequence[dict[str, Any]]) -> str:
    """Time the worker's hooks take inside the training loop (engine+db runs, medians)."""
    rows = []
    for name in runs[0]["hook_seconds"]:
        per_run = [r["hook_seconds"][name] for r in runs]
        calls = [t for times in per_run for t in times]
        if not calls:
            continue
        totals = [sum(times) for times in per_run]
        shares = [sum(times) / r["train_seconds"] for times, r in zip(per_run, runs, strict=True)]
        rows.append([name, f"{median([len(t) for t in per_run]):.0f}",
                     f"{median(calls) * 1000:.2f}", f"{max(calls) * 1000:.1f}",
                     f"{median(totals):.2f}", f"{median(shares) * 100:.1f}%"])
    return format_table(["hook", "calls per run", "median ms", "max ms", "total s per run",
                         "share of training time"], rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: 8 steps, one round of bare and service")
    parser.add_argument("--model", type=Path,
                        help="a local model folder (safetensors); default: the tiny Llama")
    parser.add_argument("--tiny-hidden", type=int, default=128, help="tiny Llama hidden size")
    parser.add_argument("--tiny-layers", type=int, default=2, help="tiny Llama layers")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "examples" / "chat.jsonl")
    parser.add_argument("--rows", type=int, help="repeat the data to this many rows")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 100; quick 8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 3; quick 1)")
    parser.add_argument("--variants", help="comma separated, bare first: " + ",".join(VARIANTS)
                        + " (default bare,engine,engine+db,service; quick bare,service)")
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS for every training process (default: torch's)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--child", choices=VARIANTS[:4], help=argparse.SUPPRESS)
    parser.add_argument("--workload", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@dataclass
class ServiceUnderTest:
    """A running API + worker pair and an HTTP client holding a key for it."""

    stack: ServiceStack
    worker: ManagedProcess
    client: Any
    cold_post_seconds: float


def start_service(stack: ServiceStack, workload: Workload, *, preload: bool) -> ServiceUnderTest:
    """Start the API and a worker, then warm the API up with a POST that preflight refuses.

    The API imports the engine's preflight (torch, transformers) on the first POST /jobs; a
    long-running service has paid that once, so it is measured apart and kept out of the runs.
    """
    import httpx

    url = stack.start_api()
    worker = stack.start_worker(preload=PRELOAD_MODULES if preload else ())
    key = stack.create_api_key("bench-pipeline")
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    refused = {**workload.job_body(), "target_modules": ["bench_warm_up_matches_nothing"]}
    started = time.monotonic()
    response = client.post("/jobs", json=refused)
    cold = time.monotonic() - started
    if response.status_code != 422:
        raise RuntimeError(f"warm-up POST /jobs answered {response.status_code}: "
                           f"{response.text}")
    return ServiceUnderTest(stack, worker, client, cold)


# Imported by the worker's main process before it forks (the service-preload variant).
PRELOAD_MODULES = ("torch", "transformers", "peft", "gralora.train", "gralora.data",
                   "gralora.models", "gralora.export")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.workload, args.result)
    args.steps = args.steps or (8 if args.quick else 100)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.rows = args.rows or max(args.steps * args.batch_size, 41)
    variants = (args.variants or ("bare,service" if args.quick
                                  else "bare,engine,engine+db,service"))
    variants = [v for v in variants.split(",") if v]
    if not variants or variants[0] != "bare" or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants must start with bare and name only {', '.join(VARIANTS)}")
    if args.threads:
        # Set before torch loads here, and inherited by every subprocess and service process.
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    machine = machine_summary()
    print(f"machine: {describe_machine(machine)}", flush=True)
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    cold_posts: dict[str, float] = {}
    with contextlib.ExitStack() as cleanup:
        stack = cleanup.enter_context(ServiceStack(name="pipe"))
        if args.model is not None:
            model = args.model.resolve()
        else:
            from gralora.tiny import build_tiny_model

            model = build_tiny_model(stack.folders["models"] / "tiny",
                                     hidden_size=args.tiny_hidden, num_layers=args.tiny_layers)
        dataset = prepare_dataset(args.data, args.rows, stack.dataset_root / "train.jsonl")
        workload = resolve_workload(args, model, dataset)
        workload_path = stack.root / "workload.json"
        workload_path.write_text(json.dumps(asdict(workload)))
        print(f"job: {model.name}, rank {workload.rank} k {workload.k}, {workload.steps} steps "
              f"x batch {workload.batch_size}, max_seq_length {workload.max_seq_length}, "
              f"{args.rows} rows of {args.data.name}, seed {workload.seed}; "
              f"{args.repeats} rounds of {', '.join(variants)}", flush=True)
        services: dict[str, ServiceUnderTest] = {}
        for variant in variants:
            if not variant.startswith("service"):
                continue
            # One stack per service variant: each has its own worker on its own queue.
            own = stack if not services else cleanup.enter_context(ServiceStack(name="pipe"))
            # The service trains only models under its model roots and data under its roots.
            own.env["GRALORA_MODEL_ROOTS"] = str(model.parent)
            own.env["GRALORA_DATASET_ROOTS"] = str(dataset.parent)
            services[variant] = start_service(own, workload,
                                              preload=variant == "service-preload")
            cleanup.callback(services[variant].client.close)
            cold_posts[variant] = services[variant].cold_post_seconds
        for round_index in range(args.repeats):
            for variant in variants:
                if variant in services:
                    service = services[variant]
                    result = run_service_job(service.client, service.stack, service.worker,
                                             workload)
                else:
                    # engine+db writes to the first stack's database, as its worker would.
                    env = stack.env if variant.startswith("engine+db") else None
                    result = run_subprocess_variant(variant, workload_path, stack.root, env)
                runs[variant].append(result)
                print(f"round {round_index + 1} {variant}: "
                      f"{result['tokens_per_second']:.0f} tokens/s, peak RSS "
                      f"{result['peak_rss_bytes'] / MIB:.0f} MiB, first step after "
                      f"{result['first_step_seconds']:.1f} s", flush=True)
    summary = summarize(runs)
    print(f"\nmedians of {args.repeats} interleaved rounds; tokens/s from the first step's start "
          "to the last step's end; peak RSS = VmHWM of the training process (the worker's "
          "child for the service)")
    print(ratio_table(summary, runs))
    for variant in ("engine+db", "engine+db-throttled"):
        if runs.get(variant):
            print(f"\n{variant}: time spent in the worker's hooks (JobHooks writing to "
                  "Postgres), inside the training loop")
            print(hook_table(runs[variant]))
    for variant in services:
        print(f"\n{variant}: time from POST /jobs to the first logged step")
        print(phase_table(runs[variant]))
        print(f"(the API's first POST /jobs, before these runs, took {cold_posts[variant]:.1f} s: "
              "it imports the engine's preflight)")
    if "service" in summary:
        ratio = summary["service"]["tokens_per_second"] / summary["bare"]["tokens_per_second"]
        verdict = "meets" if ratio >= TARGET else "misses"
        print(f"\nservice/bare tokens/s {ratio:.3f}x: {verdict} the {TARGET:.2f}x target")
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        write_json(args.json, {"machine": machine, "workload": asdict(workload),
                               "repeats": args.repeats, "threads": args.threads,
                               "target": TARGET, "runs": runs, "summary": summary,
                               "cold_post_seconds": cold_posts})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
