"""Checkpoints with orbax: train state + privacy ledger + run metadata, written atomically.

orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-write leaves the previous checkpoint intact. A checkpoint that fails to restore
(truncated or corrupt files) is reported and the previous good one is used.

orbax does not checksum array data: a flipped bit in a data file restores silently as a wrong
number. So every checkpoint also stores SHA-256 digests of its state and of its metadata, and
`restore` refuses a checkpoint whose files do not reproduce them. A single-process run also
records the SHA-256 of every file of the saved state (`state_files.json`), checked before orbax
reads them: a truncated or edited checkpoint is refused in one line, where orbax would fail
mid-read and leave its abandoned reads to print tracebacks whenever they are collected.
"""
from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import sys
import traceback
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_INTEGRITY = "_integrity"  # metadata key holding the digests (removed again on restore)
_STATE_FILES = "state_files.json"  # in each step's directory: {path under state/: SHA-256}


def ledger_from_metadata(metadata: dict):
    """The PrivacyLedger of a checkpoint, with `seed_secret` from its metadata.

    Checkpoints written before `seed_secret` existed count as secret only if their config's seed was -1.
    """
    from dpdm_jax.dp import PrivacyLedger

    ledger = PrivacyLedger.from_dict(metadata["ledger"])
    if "seed_secret" in metadata:
        ledger.seed_secret = bool(metadata["seed_secret"])
    elif "seed_secret" not in metadata["ledger"]:
        ledger.seed_secret = int(metadata.get("config", {}).get("seed", 0)) < 0
    return ledger


def _raised_in_orbax(error: BaseException | None) -> bool:
    return error is not None and any(
        f"{os.sep}orbax{os.sep}" in frame.filename for frame in traceback.extract_tb(error.__traceback__))


class _AbandonedReadErrors(std_logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports of orbax's failed array reads."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (_raised_in_orbax(error) and "exception was never retrieved" in record.getMessage())


_ABANDONED_READ_ERRORS = _AbandonedReadErrors()


def _abandoned_read(unraisable) -> bool:
    """An orbax read coroutine closed mid-read, or TensorStore finishing a read after orbax's loop closed."""
    error = unraisable.exc_value
    loop_closed = (unraisable.object is None and isinstance(error, RuntimeError)
                   and str(error) == "Event loop is closed")
    return loop_closed or _raised_in_orbax(error)


def _quiet_abandoned_reads() -> None:
    """After orbax failed to read a checkpoint, keep its abandoned reads from printing tracebacks.

    When one array read fails, orbax's gather abandons the others and closes its event loop; the
    reads still in flight, and the coroutines when collected, then go to sys.unraisablehook or
    asyncio's log, each with a traceback (megabytes for a corrupt checkpoint of a small network),
    whenever the garbage collector gets to them. `restore_latest` has said in one line why the
    checkpoint is unreadable. Idempotent; other unraisable errors pass.
    """
    std_logging.getLogger("asyncio").addFilter(_ABANDONED_READ_ERRORS)
    if getattr(sys.unraisablehook, "_drops_abandoned_reads", False):
        return

    def unraisablehook(unraisable, _next=sys.unraisablehook):
        if not _abandoned_read(unraisable):
            _next(unraisable)

    unraisablehook._drops_abandoned_reads = True
    sys.unraisablehook = unraisablehook


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt, or no checkpoint in a directory could be restored."""


def state_template(model, optimizer):
    """An abstract TrainState (shapes, dtypes, one-device sharding) of the layout the trainer saves; no compute.

    model: the network (`models.DDPMpp`); optimizer: the optax transformation the run trains with.
    """
    from dpdm_jax.dp import TrainState
    from dpdm_jax.models import init_variables

    def build():
        params = init_variables(model, jax.random.key(0))["params"]
        return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                          opt_state=optimizer.init(params), ema_params=params)

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), jax.eval_shape(build))


def restore_ema_params(directory: str, template, step: int = -1):
    """(EMA params, metadata) of checkpoint `step` in `directory` (step < 0: the latest good one).

    template: `state_template(model, optimizer)`. Raises FileNotFoundError if there is no checkpoint.
    """
    ckpt = Checkpointer(directory)
    try:
        if step >= 0:
            state, meta = ckpt.restore(step, template)
        else:
            restored = ckpt.restore_latest(template)
            if restored is None:
                raise FileNotFoundError(f"No checkpoint in {ckpt.directory}: train first (--mode=train).")
            state, meta = restored
    finally:
        ckpt.close()
    return state.ema_params, meta


def _host_array(x) -> np.ndarray | None:
    """A leaf's full value on this host, or None if this host does not hold all of it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            return None
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def state_digest(state: Any) -> str | None:
    """SHA-256 over every leaf's path, dtype, shape and bytes (None: the state is not all on this host)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        a = _host_array(leaf)
        if a is None:
            return None
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _metadata_digest(metadata: dict) -> str:
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def _file_digests(directory: str) -> dict[str, str]:
    """{path relative to `directory`: SHA-256 of its bytes} for every file below `directory`."""
    digests = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digests[os.path.relpath(path, directory)] = h.hexdigest()
    return digests


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
        """Blocking save: when this returns, the checkpoint is complete on disk.

        A checkpoint already at `step` can only be one that failed to restore (a resumed run
        starts after the newest good one and replays the later steps bit for bit): it is replaced.
        """
        if step in self._manager.all_steps():
            logging.warning("Replacing checkpoint %d in %s (it could not be restored; the run replayed "
                            "its steps from an earlier checkpoint).", step, self.directory)
            self._manager.delete(step)
        integrity = {"metadata_sha256": _metadata_digest(metadata), "state_sha256": state_digest(state)}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    metadata=ocp.args.JsonSave({**metadata, _INTEGRITY: integrity})),
            force=True,
        )
        self._manager.wait_until_finished()
        if jax.process_count() == 1:  # other hosts' files may not be visible from this one
            self._write_state_files(step)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _write_state_files(self, step: int) -> None:
        path = os.path.join(self._step_dir(step), _STATE_FILES)
        with open(path + ".tmp", "w") as f:  # a run killed here leaves a checkpoint without the record
            json.dump(_file_digests(os.path.join(self._step_dir(step), "state")), f, sort_keys=True)
        os.replace(path + ".tmp", path)

    def _check_state_files(self, step: int) -> None:
        """Raises CheckpointError if a file recorded at save time is missing or changed (no record: pass)."""
        path = os.path.join(self._step_dir(step), _STATE_FILES)
        if not os.path.exists(path):
            return  # saved by several processes, killed before the record, or older than it
        try:
            with open(path) as f:
                recorded = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {step} in {self.directory}: unreadable {_STATE_FILES} ({e})")
        found = _file_digests(os.path.join(self._step_dir(step), "state"))
        changed = sorted(name for name, digest in recorded.items() if found.get(name) != digest)
        if changed:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory}: {len(changed)} of its {len(recorded)} state files are "
                f"missing or differ from the SHA-256 recorded at save time (first: state/{changed[0]})")

    def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
        """(state, metadata) of `step`; raises CheckpointError if its digests do not match."""
        self._check_state_files(step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target_state), metadata=ocp.args.JsonRestore()
                ),
            )
        except Exception:
            _quiet_abandoned_reads()
            raise
        state, (metadata, integrity) = restored["state"], self._checked_metadata(step, restored["metadata"])
        expected = integrity.get("state_sha256")
        if expected is not None and state_digest(state) not in (None, expected):
            raise CheckpointError(f"checkpoint {step} in {self.directory}: the state's SHA-256 does not match "
                                  "the one recorded at save time (corrupt data files)")
        return state, metadata

    def restore_metadata(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return self._checked_metadata(step, restored["metadata"])[0]

    def _checked_metadata(self, step: int, raw) -> tuple[dict, dict]:
        metadata = dict(raw)
        integrity = metadata.pop(_INTEGRITY, None)  # absent in checkpoints written before digests
        if integrity is None:
            return metadata, {}
        if _metadata_digest(metadata) != integrity.get("metadata_sha256"):
            raise CheckpointError(f"checkpoint {step} in {self.directory}: the metadata's SHA-256 does not "
                                  "match the one recorded at save time (corrupt metadata file)")
        return metadata, integrity

    def restore_latest(self, target_state: Any) -> tuple[Any, dict] | None:
        """The newest checkpoint that restores cleanly, or None if the directory has none.

        Raises:
          CheckpointError: checkpoints exist but none of them can be restored.
        """
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                return self.restore(step, target_state)
            except Exception as e:  # orbax raises many types for corrupt data
                first_line = (str(e).strip().splitlines() or [""])[0]  # orbax appends whole TensorStore specs
                logging.warning("Checkpoint %d in %s cannot be restored (%s: %s); trying an older one.",
                                step, self.directory, type(e).__name__, first_line)
        if steps:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored (steps {steps} are all corrupt or "
                "incompatible with this config; the warnings above say why). Restore a backup, or move "
                "the directory away to start a new run.")
        return None

    def close(self) -> None:
        self._manager.close()
