"""The engine's command line, run as a user runs it (a subprocess of the console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def gralora(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=EXAMPLES.parent)


def test_train_writes_adapter_and_exports(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = gralora("train", "--base-model", str(tiny_model_dir), "--dataset",
                  str(EXAMPLES / "prompt_completion.jsonl"), "--rank", "8", "--output", str(out),
                  "--max-steps", "4", "--batch-size", "4", "--max-seq-length", "64",
                  "--export", "lora", "--validation-split", "0.2")
    assert run.returncode == 0, run.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "lora" / "adapter_config.json").is_file()
    assert (out / "manifest.json").is_file()
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["eval_loss"] is not None
    assert "step" in run.stderr  # the progress bar


def test_train_on_bad_data_exits_with_one_paragraph(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = gralora("train", "--base-model", str(tiny_model_dir), "--dataset",
                  str(EXAMPLES / "bad.jsonl"), "--rank", "8", "--output", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr.startswith("error (invalid_dataset):")
    assert "line 2" in run.stderr and "Traceback" not in run.stderr


def test_validate_data_reports_line_numbers(tmp_path: Path) -> None:
    good = gralora("validate-data", str(EXAMPLES / "chat.jsonl"))
    assert good.returncode == 0, good.stderr
    assert "41 valid records (chat)" in good.stdout
    bad = gralora("validate-data", str(EXAMPLES / "bad.jsonl"), "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert [e["line"] for e in report["errors"]] == [2, 3, 4, 5, 6]


def test_check_prints_the_preflight(tiny_model_dir: Path) -> None:
    run = gralora("check", "--base-model", str(tiny_model_dir), "--rank", "64")
    assert run.returncode == 0, run.stderr
    assert "k 4" in run.stdout and "effective rank: up to 256" in run.stdout
    refused = gralora("check", "--base-model", str(tiny_model_dir), "--rank", "24", "--k", "3")
    assert refused.returncode == 2
    assert refused.stderr.startswith("error (preflight_failed): k=3 does not divide")
    assert "Traceback" not in refused.stderr
