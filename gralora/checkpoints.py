"""Complete-or-ignored checkpoints: the Trainer writes aside, a marker is written last, then rename.

Layout of a checkpoint directory:

    checkpoint_dir/
      .staging/checkpoint-N/   the Trainer's output_dir; anything here is unfinished
      checkpoint-N/            complete: renamed from staging after its marker was written
        gralora-checkpoint.json

A checkpoint counts only if it sits at the top level *and* holds a valid marker, so a crash at
any moment (mid-write, before the rename) leaves nothing that resume would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

STAGING_DIRNAME = ".staging"
MARKER_NAME = "gralora-checkpoint.json"
TRAINER_STATE_NAME = "trainer_state.json"  # written by the Trainer, needed to resume
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def staging_dir(checkpoint_dir: Path) -> Path:
    """Where the Trainer writes checkpoints before they are complete."""
    return Path(checkpoint_dir) / STAGING_DIRNAME


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory entry is flushed; best effort off POSIX.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_marker(folder: Path, step: int) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    payload = {"step": step, "complete": True, "files": files, "written_at": time.time()}
    tmp = folder / (MARKER_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MARKER_NAME)


def is_complete_checkpoint(folder: Path) -> bool:
    """True when the folder has a valid marker and every file the marker lists."""
    marker = Path(folder) / MARKER_NAME
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("complete") is not True:
        return False
    files = data.get("files")
    if not isinstance(files, list) or TRAINER_STATE_NAME not in files:
        return False
    return all((Path(folder) / name).is_file() for name in files)


def checkpoint_step(folder: Path) -> int | None:
    """The step number in a `checkpoint-N` folder name, else None."""
    match = _CHECKPOINT_RE.match(Path(folder).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Every complete checkpoint under `checkpoint_dir`, oldest step first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [
        (step, p)
        for p in root.iterdir()
        if p.is_dir() and (step := checkpoint_step(p)) is not None and is_complete_checkpoint(p)
    ]
    return [p for _, p in sorted(found)]


def latest_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None (partial ones are ignored)."""
    found = complete_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def finalize_checkpoint(staged: Path, checkpoint_dir: Path) -> Path:
    """Mark a staged checkpoint complete and move it into place atomically; returns its path."""
    staged = Path(staged)
    step = checkpoint_step(staged)
    if step is None:
        raise ValueError(f"not a checkpoint folder: {staged}")
    _write_marker(staged, step)
    final = Path(checkpoint_dir) / staged.name
    if final.exists():
        # Replace an older copy of the same step: move it out of the way first so that a
        # complete copy is always either in place or about to be.
        trash = staging_dir(checkpoint_dir) / f"{staged.name}.old-{time.time_ns()}"
        os.replace(final, trash)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(Path(checkpoint_dir))
    return final


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; returns what was removed."""
    found = complete_checkpoints(checkpoint_dir)
    doomed = found[:-keep] if keep > 0 else found
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def clear_staging(checkpoint_dir: Path) -> None:
    """Remove unfinished checkpoints left by an earlier, interrupted run."""
    shutil.rmtree(staging_dir(checkpoint_dir), ignore_errors=True)


class AtomicCheckpointCallback(TrainerCallback):
    """After each Trainer save, mark the staged checkpoint complete and rename it into place."""

    def __init__(self, checkpoint_dir: Path, *, keep: int = 2,
                 on_checkpoint: Callable[[Path, int], None] | None = None) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.keep = keep
        self.on_checkpoint = on_checkpoint
        self.saved: list[Path] = []

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        """Finalize `<output_dir>/checkpoint-<step>` written by the Trainer just now."""
        staged = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if not staged.is_dir():
            return
        final = finalize_checkpoint(staged, self.checkpoint_dir)
        self.saved.append(final)
        if self.keep > 0:
            prune_checkpoints(self.checkpoint_dir, self.keep)
        if self.on_checkpoint is not None:
            self.on_checkpoint(final, state.global_step)
