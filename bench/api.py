"""The API under load: `gralora api` on real Postgres and Redis, driven over loopback.

The API runs as its own process (the production command) on a private database; this process
is the load generator (asyncio + httpx, one connection per concurrent client).

1. POST /jobs with a valid body (a config-only Llama under the model root, a file:// dataset
   under the dataset root; no worker runs, so jobs stay queued) and GET /jobs/{id}, each at
   concurrency 1, 16 and 64 (a closed loop: a warm-up, then clients start requests for a fixed
   time and every request started is waited for): requests/s, p50, p99, errors, and the API
   process's CPU time per request (from /proc, less sensitive to other load on the machine
   than wall time).
2. GET /jobs?limit=50 for an owner with 1k jobs against an owner with 100k, each in a table of
   its own size (two databases, two API processes; rows bulk-loaded with COPY, then ANALYZE
   as autovacuum would). Requests alternate between the two, so a burst of load hits both;
   the median of many. A page deep in the 100k (cursor at row 50,000) is timed as well.
3. EXPLAIN (ANALYZE, BUFFERS) of the SQL that service.jobs.list_jobs emits (captured from
   SQLAlchemy, not retyped) for those pages, and, for comparison, of the deep page with its
   cursor written as a row comparison `(created_at, id) < (...)`; a table says for each
   whether it is an index scan without a sort and how many rows it read only to filter out.
4. A burst: 64 POST /jobs sent at once to a freshly started API (third database): the answers
   and how long each took.

    python bench/api.py                          # full: 10 s per level, 100k rows
    python bench/api.py --quick                  # CI-sized, well under 2 minutes
    python bench/api.py --duration 20 --concurrency 1,16,64,128 --large-rows 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

# Run as a script (python bench/x.py): the repository root must be importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import describe_machine, format_table, machine_summary, median, write_json
from bench.service_stack import ServiceStack

LIST_OWNER = "bench-list"
LOAD_OWNER = "bench-load"
LIST_LIMIT = 50
TARGET_LIST_RATIO = 1.5  # "near 1": a page of 100k must not cost much more than one of 1k
# Statuses of the bulk-loaded rows: finished jobs do not count against the active-job limit.
BULK_STATUSES = ("succeeded", "succeeded", "succeeded", "failed", "cancelled")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of `values` (fraction in [0, 1])."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


# --- the service under test ----------------------------------------------------------------


def write_config_only_model(model_root: Path) -> Path:
    """A folder with only a small Llama config.json: enough for the API's preflight."""
    folder = model_root / "config-only"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 512,
    }))
    return folder


def write_dataset(dataset_root: Path) -> Path:
    """A small valid chat JSONL file under the dataset root."""
    path = dataset_root / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def job_body(stack: ServiceStack) -> dict[str, Any]:
    """A valid POST /jobs body for the stack's model and dataset roots."""
    return {
        "base_model": str(stack.model_root / "config-only"),
        "dataset_uri": (stack.dataset_root / "chat.jsonl").as_uri(),
        "rank": 16, "max_steps": 10, "batch_size": 4, "max_seq_length": 128,
        "metadata": {"purpose": "api benchmark"},
    }


def start_api_stack(cleanup: contextlib.ExitStack, name: str) -> ServiceStack:
    """A private database and `gralora api` with no active-job limit worth the name."""
    stack = cleanup.enter_context(ServiceStack(
        name=name, extra_env={"GRALORA_MAX_ACTIVE_JOBS_PER_OWNER": "100000000"}))
    write_config_only_model(stack.model_root)
    write_dataset(stack.dataset_root)
    stack.start_api()
    return stack


def api_pid(stack: ServiceStack) -> int:
    """The API process of a stack (started first)."""
    return stack.processes[0].pid


# --- load ----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """What one (endpoint, concurrency) level measured."""

    endpoint: str
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    api_cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    def row(self) -> list[str]:
        """A line of the load table."""
        ok = self.latencies or [float("nan")]
        count = max(self.requests, 1)
        return [self.endpoint, str(self.concurrency), str(self.requests),
                f"{len(self.latencies) / self.seconds:.0f}",
                f"{percentile(ok, 0.50) * 1000:.1f}", f"{percentile(ok, 0.99) * 1000:.1f}",
                str(sum(self.errors.values())),
                f"{self.api_cpu_seconds / count * 1000:.2f}",
                f"{self.client_cpu_seconds / count * 1000:.2f}"]


Request = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


async def drive(base_url: str, headers: dict[str, str], request: Request, expected: int, *,
                concurrency: int, seconds: float, warmup: float
                ) -> tuple[list[float], dict[str, int], float, int]:
    """`concurrency` clients sending `request` back to back (a closed loop), in two phases.

    A warm-up phase (not recorded), then the measured phase: clients start requests until
    `seconds` have passed, and every request started is waited for and counted, however long
    it takes (a stalled server shows as long latencies and a low rate, not as no data).
    Returns the latencies of the expected answers, the other outcomes counted, the measured
    phase's length (up to the last answer), and the number of requests sent in all.
    """
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sent = 0
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=120) as client:
        loop = asyncio.get_running_loop()

        async def phase(length: float) -> tuple[list[float], dict[str, int], float]:
            latencies: list[float] = []
            errors: dict[str, int] = {}
            begin = loop.time()
            stop_at = begin + length

            async def one_client() -> None:
                nonlocal sent
                while (started := loop.time()) < stop_at:
                    sent += 1
                    try:
                        response = await request(client)
                        outcome = None if response.status_code == expected else str(
                            response.status_code)
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    if outcome is None:
                        latencies.append(loop.time() - started)
                    else:
                        errors[outcome] = errors.get(outcome, 0) + 1

            await asyncio.gather(*(one_client() for _ in range(concurrency)))
            return latencies, errors, loop.time() - begin

        if warmup > 0:
            await phase(warmup)
        latencies, errors, elapsed = await phase(seconds)
    return latencies, errors, elapsed, sent


def run_level(stack: ServiceStack, key: str, endpoint: str, request: Request, expected: int,
              concurrency: int, seconds: float, warmup: float) -> LoadResult:
    """One level, with the API's and this process's CPU time over the whole level."""
    pid = api_pid(stack)
    api_before, client_before = process_cpu_seconds(pid), time.process_time()
    assert stack.api_url is not None
    latencies, errors, elapsed, sent = asyncio.run(drive(
        stack.api_url, {"Authorization": f"Bearer {key}"}, request, expected,
        concurrency=concurrency, seconds=seconds, warmup=warmup))
    result = LoadResult(endpoint, concurrency, elapsed, latencies, errors)
    # CPU is read over warm-up and measurement alike: share it over every request sent.
    share = result.requests / max(sent, 1)
    result.api_cpu_seconds = (process_cpu_seconds(pid) - api_before) * share
    result.client_cpu_seconds = (time.process_time() - client_before) * share
    return result


def load_test(stack: ServiceStack, levels: Sequence[int], seconds: float,
              warmup: float) -> list[LoadResult]:
    """POST /jobs, then GET /jobs/{id} of the jobs created, at each concurrency."""
    key = stack.create_api_key(LOAD_OWNER)
    body = job_body(stack)
    created: list[str] = []

    async def post(client: httpx.AsyncClient) -> httpx.Response:
        response = await client.post("/jobs", json=body)
        if response.status_code == 201:
            created.append(response.json()["id"])
        return response

    async def get(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get(f"/jobs/{random.choice(created)}")

    results = []
    for concurrency in levels:
        results.append(run_level(stack, key, "POST /jobs", post, 201, concurrency, seconds,
                                 warmup))
        print(f"  {' | '.join(results[-1].row())}", flush=True)
    if not created:
        raise RuntimeError("no POST /jobs succeeded; see the errors above")
    for concurrency in levels:
        results.append(run_level(stack, key, "GET /jobs/{id}", get, 200, concurrency, seconds,
                                 warmup))
        print(f"  {' | '.join(results[-1].row())}", flush=True)
    return results


async def burst(base_url: str, headers: dict[str, str], request: Request,
                size: int) -> list[tuple[str, float]]:
    """`size` requests sent at once, each on its own connection: (status, seconds) of each."""
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=120) as client:
        loop = asyncio.get_running_loop()

        async def one() -> tuple[str, float]:
            started = loop.time()
            try:
                outcome = str((await request(client)).status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            return outcome, loop.time() - started

        return list(await asyncio.gather(*(one() for _ in range(size))))


def burst_test(cleanup: contextlib.ExitStack, size: int) -> list[tuple[str, float]]:
    """A fresh API (one POST served) hit by `size` simultaneous POST /jobs."""
    stack = start_api_stack(cleanup, "apiburst")
    key = stack.create_api_key(LOAD_OWNER)
    body = job_body(stack)
    headers = {"Authorization": f"Bearer {key}"}
    assert stack.api_url is not None
    httpx.post(f"{stack.api_url}/jobs", json=body, headers=headers,
               timeout=120).raise_for_status()

    async def post(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/jobs", json=body)

    return asyncio.run(burst(stack.api_url, headers, post, size))


def burst_table(results: Sequence[tuple[str, float]]) -> str:
    """Answers of a burst grouped by status: count, fastest, median, slowest."""
    rows = []
    for status in sorted({s for s, _ in results}):
        times = [t for s, t in results if s == status]
        rows.append([status, str(len(times)), f"{min(times):.2f}", f"{median(times):.2f}",
                     f"{max(times):.2f}"])
    return format_table(["answer", "count", "fastest s", "median s", "slowest s"], rows)


# --- listing at 1k and 100k rows -----------------------------------------------------------


def bulk_load_jobs(stack: ServiceStack, owner: str, rows: int, spec: dict[str, Any]) -> None:
    """Add `rows` finished jobs of `owner` with COPY (older than any job made over HTTP)."""
    progress = {"step": 10, "total_steps": 10, "epoch": 1.0, "loss": 1.2345,
                "learning_rate": 0.0, "tokens_per_second": 1234.5, "eta_seconds": 0.0,
                "trained_tokens": 5120}
    spec_text, progress_text = json.dumps(spec), json.dumps(progress)
    metadata_text = json.dumps({"purpose": "api benchmark"})
    newest = datetime.now(UTC) - timedelta(minutes=1)
    columns = ("id, owner, status, spec, metadata, progress, attempt, queue, cancel_requested, "
               "created_at, updated_at, queued_at, started_at, finished_at")
    with stack.connect() as conn:
        with conn.cursor() as cursor:
            with cursor.copy(f"COPY jobs ({columns}) FROM STDIN") as copy:
                for i in range(rows):
                    created = newest - timedelta(seconds=30 * i)
                    copy.write_row((uuid.uuid4(), owner, BULK_STATUSES[i % len(BULK_STATUSES)],
                                    spec_text, metadata_text, progress_text, 1, "bench", False,
                                    created, created + timedelta(seconds=20), created,
                                    created + timedelta(seconds=1),
                                    created + timedelta(seconds=20)))
        conn.execute("ANALYZE jobs")


@dataclass
class ListOwner:
    """LIST_OWNER's key on a stack, the cursor of its middle row, and what loading took."""

    key: str
    middle_cursor: str
    first_post_seconds: float  # the API's first POST /jobs: it imports the engine's preflight
    copy_seconds: float


def prepare_list_stack(stack: ServiceStack, rows: int) -> ListOwner:
    """`rows` jobs for LIST_OWNER: one made over HTTP (for a real spec), the rest by COPY."""
    key = stack.create_api_key(LIST_OWNER)
    assert stack.api_url is not None
    started = time.monotonic()
    response = httpx.post(f"{stack.api_url}/jobs", json=job_body(stack), timeout=120,
                          headers={"Authorization": f"Bearer {key}"})
    first_post = time.monotonic() - started
    response.raise_for_status()
    started = time.monotonic()
    bulk_load_jobs(stack, LIST_OWNER, rows - 1, response.json()["spec"])
    copied = time.monotonic() - started
    return ListOwner(key, middle_cursor(stack, rows), first_post, copied)


def middle_cursor(stack: ServiceStack, rows: int) -> str:
    """The `after` cursor of the job at position rows/2 in newest-first order."""
    from service.jobs import encode_cursor

    with stack.connect() as conn:
        created_at, job_id = conn.execute(
            "SELECT created_at, id FROM jobs WHERE owner = %s ORDER BY created_at DESC, id DESC "
            "OFFSET %s LIMIT 1", (LIST_OWNER, rows // 2 - 1)).fetchone()
    return encode_cursor(SimpleNamespace(created_at=created_at, id=job_id))  # type: ignore[arg-type]


@dataclass
class ListTarget:
    """One URL to time: a label, the API, its key and the query."""

    label: str
    base_url: str
    key: str
    params: dict[str, Any]
    times: list[float] = field(default_factory=list)


def time_listing(targets: Sequence[ListTarget], requests: int, warmup: int) -> None:
    """Alternate sequential GET /jobs between the targets; record each one's times."""
    clients = [httpx.Client(base_url=t.base_url, headers={"Authorization": f"Bearer {t.key}"},
                            timeout=60) for t in targets]
    try:
        for round_index in range(warmup + requests):
            # Rotate who goes first, so no target always follows the same one.
            shift = round_index % len(targets)
            order = list(range(len(targets)))[shift:] + list(range(len(targets)))[:shift]
            for i in order:
                started = time.perf_counter()
                response = clients[i].get("/jobs", params=targets[i].params)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                if len(response.json()["data"]) != LIST_LIMIT:
                    raise RuntimeError(f"{targets[i].label}: a short page")
                if round_index >= warmup:
                    targets[i].times.append(elapsed)
    finally:
        for client in clients:
            client.close()


def explain(stack: ServiceStack, run_query: Callable[[Any], object]) -> tuple[str, str]:
    """(SQL, EXPLAIN (ANALYZE, BUFFERS) text) of the jobs query `run_query(session)` sends."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from service.db import make_engine

    engine = make_engine(stack.database_url)
    captured: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor_: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        if "FROM jobs" in statement:
            captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session:
            run_query(session)
        event.remove(engine, "before_cursor_execute", capture)
        statement, parameters = captured[-1]
        with engine.connect() as conn:
            plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + statement,
                                        parameters).fetchall()
    finally:
        engine.dispose()
    return statement, "\n".join(line for (line,) in plan)


def explain_listing(stack: ServiceStack, cursor: str | None) -> tuple[str, str]:
    """The plan of the query service.jobs.list_jobs sends for LIST_OWNER's page."""
    from service.jobs import list_jobs

    return explain(stack, lambda session: list_jobs(session=session, owner=LIST_OWNER,
                                                    limit=LIST_LIMIT, after=cursor))


def explain_row_comparison(stack: ServiceStack, cursor: str) -> tuple[str, str]:
    """The plan of the same page with the cursor written as one row comparison.

    `(created_at, id) < (:t, :id)` is what Postgres can put in the index condition of
    ix_jobs_owner_created; the OR form list_jobs uses is applied as a filter instead.
    """
    from sqlalchemy import select, tuple_

    from service.jobs import decode_cursor
    from service.models import Job

    created_at, last_id = decode_cursor(cursor)
    query = (select(Job).where(Job.owner == LIST_OWNER,
                               tuple_(Job.created_at, Job.id) < tuple_(created_at, last_id))
             .order_by(Job.created_at.desc(), Job.id.desc()).limit(LIST_LIMIT + 1))
    return explain(stack, lambda session: list(session.scalars(query)))


def uses_index_scan(plan: str, index: str = "ix_jobs_owner_created") -> bool:
    """Whether the plan reads the jobs through `index` (no sequential scan, no sort)."""
    return (f"Index Scan Backward using {index}" in plan or f"Index Scan using {index}" in plan
            ) and "Seq Scan" not in plan and "Sort" not in plan.split("Index Scan")[0]


def rows_removed_by_filter(plan: str) -> int:
    """Rows the plan read from the index and then threw away (0 for a true keyset seek)."""
    total = 0
    for line in plan.splitlines():
        if "Rows Removed by Filter:" in line:
            total += int(line.split(":")[1])
    return total


def execution_ms(plan: str) -> float:
    """The "Execution Time" line of an EXPLAIN ANALYZE, in ms."""
    for line in plan.splitlines():
        if line.startswith("Execution Time:"):
            return float(line.split(":")[1].split()[0])
    return float("nan")


# --- the report ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized: 2 s levels at concurrency 1,4,16; 10k rows")
    parser.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")],
                        help="levels (default 1,16,64)")
    parser.add_argument("--duration", type=float, help="seconds measured per level (10)")
    parser.add_argument("--warmup", type=float, help="seconds before each level (2)")
    parser.add_argument("--small-rows", type=int, default=1000, help="jobs of the small owner")
    parser.add_argument("--large-rows", type=int, help="jobs of the large owner (100000)")
    parser.add_argument("--list-requests", type=int,
                        help="timed GET /jobs per target (default 300)")
    parser.add_argument("--burst", type=int,
                        help="simultaneous POST /jobs sent to a fresh API (default 64; quick 0: "
                             "skipped)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    # Quick stays below the API thread pool (40): above it requests can stall on the pool of
    # database connections (docs/BENCHMARKS.md, "API under load").
    levels = args.concurrency or ([1, 4, 16] if quick else [1, 16, 64])
    seconds = args.duration or (2.0 if quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if quick else 2.0)
    large_rows = args.large_rows or (10_000 if quick else 100_000)
    list_requests = args.list_requests or (30 if quick else 300)
    machine = machine_summary()
    print(f"machine: {describe_machine(machine)}", flush=True)
    started = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        small = start_api_stack(cleanup, "apismall")
        large = start_api_stack(cleanup, "apilarge")
        print(f"\nlisting: {args.small_rows} and {large_rows} jobs ...", flush=True)
        small_owner = prepare_list_stack(small, args.small_rows)
        large_owner = prepare_list_stack(large, large_rows)
        print(f"  first POST /jobs of each API (cold: imports the preflight): "
              f"{small_owner.first_post_seconds:.1f} s, {large_owner.first_post_seconds:.1f} s"
              f"; COPY + ANALYZE: {small_owner.copy_seconds:.1f} s, "
              f"{large_owner.copy_seconds:.1f} s", flush=True)
        middle = large_rows // 2
        first_page = {"limit": LIST_LIMIT}
        assert small.api_url is not None and large.api_url is not None
        targets = [
            ListTarget(f"{args.small_rows} jobs, first page", small.api_url, small_owner.key,
                       first_page),
            ListTarget(f"{large_rows} jobs, first page", large.api_url, large_owner.key,
                       first_page),
            ListTarget(f"{large_rows} jobs, page after row {middle}", large.api_url,
                       large_owner.key, {**first_page, "after": large_owner.middle_cursor}),
        ]
        time_listing(targets, list_requests, warmup=max(5, list_requests // 10))
        plans = {
            f"{args.small_rows} jobs, first page": explain_listing(small, None),
            f"{large_rows} jobs, first page": explain_listing(large, None),
            f"{large_rows} jobs, page after row {middle}":
                explain_listing(large, large_owner.middle_cursor),
            f"{large_rows} jobs, page after row {middle}, cursor as a row comparison "
            "(not what the service sends)":
                explain_row_comparison(large, large_owner.middle_cursor),
        }
        print(f"\nload: {seconds:g} s per level after {warmup:g} s of warm-up, on the "
              f"{large_rows}-job database ...", flush=True)
        load = load_test(large, levels, seconds, warmup)
        burst_size = args.burst if args.burst is not None else (0 if quick else 64)
        bursts: list[tuple[str, float]] = []
        if burst_size:
            print(f"\nburst: {burst_size} simultaneous POST /jobs on a fresh API ...",
                  flush=True)
            bursts = burst_test(cleanup, burst_size)

    small_median = median(targets[0].times)
    print(f"\nGET /jobs?limit={LIST_LIMIT}, one client, {list_requests} requests per row "
          "alternating between the rows; ratio against the small owner's first page:")
    print(format_table(
        ["listing", "median ms", "p99 ms", "vs 1k"],
        [[t.label, f"{median(t.times) * 1000:.2f}", f"{percentile(t.times, 0.99) * 1000:.2f}",
          f"{median(t.times) / small_median:.3f}x"] for t in targets]))
    print("\nthe listing query, as service.jobs.list_jobs sends it (first page):")
    print(plans[f"{large_rows} jobs, first page"][0])
    print("\nits plans (EXPLAIN ANALYZE, BUFFERS), after ANALYZE of the table:")
    for label, (_, plan) in plans.items():
        print(f"\n-- {label}:\n{plan}")
    print()
    print(format_table(
        ["query", "index scan, no sort", "rows read and filtered out", "execution ms"],
        [[label, "yes" if uses_index_scan(plan) else "NO", str(rows_removed_by_filter(plan)),
          f"{execution_ms(plan):.3f}"] for label, (_, plan) in plans.items()]))
    first_pages_ok = all(uses_index_scan(plan) for label, (_, plan) in plans.items()
                         if label.endswith("first page"))
    print(f"\nfirst page: index scan on ix_jobs_owner_created, no sort: "
          f"{'yes' if first_pages_ok else 'NO'}")

    print("\nrequests/s and latency (every request started in the measured time, waited for); "
          "CPU ms per request of the API process and of this load generator:")
    print(format_table(["endpoint", "concurrency", "requests", "requests/s", "p50 ms",
                        "p99 ms", "errors", "API CPU ms/req", "client CPU ms/req"],
                       [r.row() for r in load]))
    failures = {f"{r.endpoint} c={r.concurrency}": r.errors for r in load if r.errors}
    if failures:
        print(f"errors: {failures}")
    if bursts:
        print(f"\n{burst_size} POST /jobs sent at once to a fresh API (one POST served before):")
        print(burst_table(bursts))
    ratio = median(targets[1].times) / small_median
    verdict = "near 1" if ratio <= TARGET_LIST_RATIO else "NOT near 1"
    print(f"\nlisting {large_rows} vs {args.small_rows} jobs, first page: {ratio:.3f}x "
          f"({verdict})")
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        write_json(args.json, {
            "machine": machine, "levels": levels, "seconds": seconds, "warmup": warmup,
            "small_rows": args.small_rows, "large_rows": large_rows,
            "first_post_seconds": [small_owner.first_post_seconds,
                                   large_owner.first_post_seconds],
            "listing": {t.label: t.times for t in targets},
            "plans": {label: plan for label, (_, plan) in plans.items()},
            "load": [{"endpoint": r.endpoint, "concurrency": r.concurrency,
                      "seconds": r.seconds, "latencies": r.latencies, "errors": r.errors,
                      "api_cpu_seconds": r.api_cpu_seconds,
                      "client_cpu_seconds": r.client_cpu_seconds} for r in load],
            "burst": bursts,
        })
    # A benchmark reports; it fails only when the first page stops using the index.
    return 0 if first_pages_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
