"""Checkpoints with orbax: train state + privacy ledger + run metadata, written atomically.

orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-write leaves the previous checkpoint intact. A checkpoint that fails to restore
(truncated or corrupt files) is reported and the previous good one is used.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored."""


class Checkpointer:
    """Save/restore (state, metadata) pairs under `directory/<step>/`.

    Args:
      directory: where checkpoints live (created if missing).
      max_to_keep: older checkpoints are deleted; keep >= 2 so a corrupt latest has a fallback.
    """

    def __init__(self, directory: str, max_to_keep: int = 3):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            ),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict) -> None:
        """Blocking save: when this returns, the checkpoint is complete on disk."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target_state), metadata=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["metadata"])

    def restore_metadata(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return dict(restored["metadata"])

    def restore_latest(self, target_state: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores cleanly, or None if the directory has none.

        Raises:
          CheckpointError: checkpoints exist but none of them can be restored.
        """
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            try:
                return self.restore(step, target_state)
            except Exception as e:  # orbax raises many types for corrupt data
                logging.warning("Checkpoint %d in %s cannot be restored (%s: %s); trying an older one.",
                                step, self.directory, type(e).__name__, e)
                errors.append(f"step {step}: {type(e).__name__}: {e}")
        if steps:
            raise CheckpointError(f"No checkpoint in {self.directory} could be restored:\n" + "\n".join(errors))
        return None

    def close(self) -> None:
        self._manager.close()
