"""The service benchmarks (bench/pipeline.py, bench/api.py) run end to end at their --quick size.

Both start real `gralora api` / `gralora worker` processes on a private Postgres database and
the local Redis, print their ratio tables, and clean up after themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg

from bench.service_stack import POSTGRES_URL, libpq_url

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc.stdout


def _bench_databases() -> set[str]:
    with psycopg.connect(libpq_url(f"{POSTGRES_URL}/postgres")) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'gralora_pipe_%' "
                            "OR datname LIKE 'gralora_api%'").fetchall()
    return {name for (name,) in rows}


def test_pipeline_quick_trains_the_same_job_through_the_service_and_bare(tmp_path: Path
                                                                         ) -> None:
    before = _bench_databases()
    out = _run("pipeline.py", "--threads", "1", "--json", str(tmp_path / "pipeline.json"))
    assert "| variant" in out and "tokens/s vs bare" in out and "RSS vs bare" in out
    assert "service/bare tokens/s" in out
    assert "POST -> claimed by the worker" in out
    payload = json.loads((tmp_path / "pipeline.json").read_text())
    summary = payload["summary"]
    assert set(summary) == {"bare", "service"}
    for variant in ("bare", "service"):
        assert summary[variant]["tokens_per_second"] > 0
        assert summary[variant]["peak_rss_bytes"] > 50 * 2**20  # a process with torch loaded
        (run,) = payload["runs"][variant]
        assert run["steps"] == payload["workload"]["steps"]
    bare_run, service_run = payload["runs"]["bare"][0], payload["runs"]["service"][0]
    # The same job: same batches, same seed, so the same tokens and the same loss.
    assert service_run["trained_tokens"] == bare_run["trained_tokens"]
    assert abs(service_run["train_loss"] - bare_run["train_loss"]) < 1e-4
    # Metrics events are throttled (one per progress interval), the first and last step kept.
    assert 2 <= service_run["metrics_events"] <= payload["workload"]["steps"]
    assert _bench_databases() <= before  # its private database was dropped


def test_api_quick_prints_load_and_listing_tables_with_an_index_scan(tmp_path: Path) -> None:
    before = _bench_databases()
    out = _run("api.py", "--json", str(tmp_path / "api.json"))
    assert "| listing" in out and "vs 1k" in out
    assert "| endpoint" in out and "requests/s" in out and "p99 ms" in out
    assert "first page: index scan on ix_jobs_owner_created, no sort: yes" in out
    payload = json.loads((tmp_path / "api.json").read_text())
    levels = {(r["endpoint"], r["concurrency"]) for r in payload["load"]}
    assert levels == {(e, c) for e in ("POST /jobs", "GET /jobs/{id}") for c in (1, 4, 16)}
    for level in payload["load"]:
        assert level["latencies"], f"no successful request at {level}"
        assert not level["errors"], level
    for label, times in payload["listing"].items():
        assert len(times) == 30, label
    assert all("ix_jobs_owner_created" in plan for plan in payload["plans"].values())
    assert _bench_databases() <= before
