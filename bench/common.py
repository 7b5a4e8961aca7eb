"""Shared pieces of the benchmark scripts: the machine, medians, ratio tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def machine_summary() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, RAM, torch and its threads, GPU."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        ram_gib = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gib": ram_gib,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "gpu": gpu,
    }


def describe_machine(summary: dict[str, Any]) -> str:
    """One line for the top of a report."""
    parts = [f"{summary['cpu']} ({summary['cpu_count']} logical CPUs"]
    if summary.get("ram_gib") is not None:
        parts.append(f", {summary['ram_gib']} GiB RAM")
    parts.append(f"), torch {summary['torch']} with {summary['torch_threads']} threads")
    if summary.get("gpu"):
        parts.append(f", GPU {summary['gpu']}")
    return "".join(parts)


def median(values: Sequence[float]) -> float:
    """The median; a benchmark reports it because one slow outlier must not move the result."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable in a terminal); floats keep the text they were given."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a result file (parents created), pretty-printed for diffs."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
