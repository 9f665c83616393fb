"""Checkpoints that are whole or absent, and the loop position they carry.

``accelerator.save_state`` writes into a temporary folder that is renamed into place once every
process has written, so a run killed mid-save resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

_CHECKPOINT_PREFIX = "step_"


class TrainingProgress:
    """The loop's position, saved with every checkpoint (Accelerate's custom-object protocol)."""

    def __init__(self) -> None:
        self.step = 0
        self.history: list[dict[str, float]] = []

    def state_dict(self) -> dict[str, Any]:
        """The position, as Accelerate's checkpoint stores it.

        Returns:
            ``{"step": ..., "history": <JSON of the per-epoch metrics>}``.
        """
        return {"step": self.step, "history": json.dumps(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position from a checkpoint.

        Args:
            state: as `state_dict` returned it.
        """
        self.step, self.history = int(state["step"]), json.loads(state["history"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints`` (temporary ones skipped).

    Args:
        output_dir: the run's output folder.

    Returns:
        The checkpoint folder, or None when there is none.
    """
    root = Path(output_dir) / "checkpoints"
    done = [
        p
        for p in root.glob(f"{_CHECKPOINT_PREFIX}*")
        if p.name[len(_CHECKPOINT_PREFIX) :].isdigit()
    ]
    return max(done, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :]), default=None)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, keep: int) -> None:
    """``save_state`` into a temporary folder, renamed into place when complete; only the
    newest ``keep`` checkpoints stay.

    Args:
        accelerator: the run's ``Accelerator``.
        output_dir: the run's output folder.
        step: the optimizer step the checkpoint is taken at (its folder's name).
        keep: how many checkpoints to keep.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"{_CHECKPOINT_PREFIX}{step}"
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        stale = sorted(
            root.glob(f"{_CHECKPOINT_PREFIX}*"),
            key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :]),
        )
        for old in stale[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
