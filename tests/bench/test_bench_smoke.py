"""The benchmark scripts run end to end at their --quick size and print their ratio tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_layer_quick_prints_ratio_tables_and_fast_matches_peft(tmp_path: Path) -> None:
    out = _run("layer.py", "--json", str(tmp_path / "layer.json"))
    assert "| in x out" in out and "peft/LoRA" in out and "fast/LoRA" in out
    assert "fast-peft max |diff|" in out
    assert "within 1.10x LoRA" in out
    rows = json.loads((tmp_path / "layer.json").read_text())["rows"]
    assert sorted(r["k"] for r in rows) == [1, 2, 4]
    for row in rows:
        assert row["wall"]["lora_ms"] > 0 and row["wall"]["fast_ms"] > 0
        assert row["fast_max_abs_diff"] < 1e-4  # the fast forward computes peft's output
        assert row["peft_mem_delta_mib"] >= 0  # GraLoRA keeps k x r per token, LoRA r


def test_quality_quick_prints_ratio_tables_and_plots(tmp_path: Path) -> None:
    out = _run("quality.py", "--json", str(tmp_path / "quality.json"),
               "--plots", str(tmp_path / "img"))
    assert "k2/LoRA" in out  # capacity table
    assert "vs LoRA (ratio)" in out  # held-out loss table
    payload = json.loads((tmp_path / "quality.json").read_text())
    variants = [r["variant"] for r in payload["real"]["results"]]
    assert "LoRA r8" in variants and "GraLoRA r8 k2" in variants
    assert any("+h" in v for v in variants)  # the hybrid variant ran
    for result in payload["real"]["results"]:
        assert result["eval_loss"] > 0 and result["train_curve"]
    assert {r["target"] for r in payload["capacity"]["rows"]} >= {"gaussian", "decaying"}
    assert (tmp_path / "img" / "quality_tiny_loss.png").stat().st_size > 0
    assert (tmp_path / "img" / "capacity_quick.png").stat().st_size > 0
