"""kill -9 in the middle of a checkpoint write: the partial checkpoint is never resumed from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from gralora.checkpoints import (
    MARKER_NAME,
    complete_checkpoints,
    latest_complete_checkpoint,
    staging_dir,
)
from gralora.pipeline import SourceOptions, TrainRequest, run_training
from gralora.spec import AdapterSpec, TrainingSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

# Runs the engine in a child process that SIGKILLs itself while writing its second checkpoint:
# the Trainer has written the files into staging, the completion marker is not yet written.
CRASHING_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import gralora.checkpoints as checkpoints
    from gralora.pipeline import SourceOptions, TrainRequest, run_training
    from gralora.spec import AdapterSpec, TrainingSpec

    model, dataset, out = sys.argv[1:4]
    real_write_marker = checkpoints._write_marker
    def write_marker_then_die_on_the_second(folder, step):
        if step >= 4:
            os.kill(os.getpid(), signal.SIGKILL)
        real_write_marker(folder, step)
    checkpoints._write_marker = write_marker_then_die_on_the_second
    run_training(TrainRequest(
        base_model=model, dataset_uri=dataset, adapter=AdapterSpec(rank=8),
        training=TrainingSpec(max_steps=6, batch_size=4, max_seq_length=64,
                              checkpoint_every_steps=2),
        output_dir=Path(out), sources=SourceOptions(cache_dir=Path(out) / "cache")))
""")


def test_kill_9_during_a_checkpoint_write_leaves_it_ignored(tiny_model_dir: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "run"
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, str(tiny_model_dir), str(EXAMPLES / "chat.jsonl"),
         str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)})
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    checkpoints = out / "checkpoints"
    partial = staging_dir(checkpoints) / "checkpoint-4"
    assert partial.is_dir() and not (partial / MARKER_NAME).exists()  # died mid-write
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2"]

    result = run_training(TrainRequest(
        base_model=str(tiny_model_dir), dataset_uri=str(EXAMPLES / "chat.jsonl"),
        adapter=AdapterSpec(rank=8),
        training=TrainingSpec(max_steps=6, batch_size=4, max_seq_length=64,
                              checkpoint_every_steps=2),
        output_dir=out, sources=SourceOptions(cache_dir=out / "cache")))
    assert result.resumed_from_step == 2
    assert result.metrics["steps"] == 6
    assert not partial.exists()  # leftovers of the crash were cleared
    latest = latest_complete_checkpoint(checkpoints)
    assert latest is not None and latest.name == "checkpoint-6"
