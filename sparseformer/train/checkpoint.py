"""orbax checkpoints of a run: train state, data iterator position, RNG and step, config.

Layout: `workdir/checkpoints/<step>/{state,data,meta,config}`. orbax writes each step to a
temporary directory and renames it when complete, so a kill during a write leaves only a
`*.orbax-checkpoint-tmp-*` directory that is never read (and is cleaned up). A step directory
that is nonetheless unreadable (truncated by hand, a disk error) is skipped on restore in favour
of the previous step, and removed so that the run can save that step again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta", "config")


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` with the four items above.

    All processes call `save` and `restore` (orbax writes collectively: each process its shards,
    the primary process the JSON items).
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        self._max_to_keep = max_to_keep
        self._asynchronous = asynchronous
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep,
            enable_async_checkpointing=self._asynchronous,
            cleanup_tmp_directories=True,
            create=True,
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, *, data: dict[str, Any], meta: dict[str, Any], config: dict[str, Any]) -> None:
        """Start writing `step` (returns once the arrays are copied off the devices)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(config),
        )
        self._manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any], dict[str, Any]] | None:
        """`(step, state, data, meta)` of the newest readable checkpoint, or None when there is none.

        `abstract_state` has `ShapeDtypeStruct` leaves with this run's `NamedSharding`s, so the
        arrays land sharded on the current mesh, whatever mesh wrote them.
        """
        bad: list[int] = []
        found = None
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001  any unreadable step is skipped, whatever the cause
                log.warning("checkpoint %d in %s is unreadable (%s: %s); trying the previous one",
                            step, self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                print(f"warning: skipping unreadable checkpoint {self.directory / str(step)} ({type(e).__name__})", flush=True)
                bad.append(step)
                continue
            found = (step, restored["state"], dict(restored["data"] or {}), dict(restored["meta"] or {}))
            break
        if bad:
            self._discard(bad)
        return found

    def _discard(self, steps: list[int]) -> None:
        """Remove unreadable step directories (primary process) and reopen the manager."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in steps:
                shutil.rmtree(self.directory / str(step), ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sparseformer_discard_checkpoints")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_json_item(directory: str | Path, step: int, item: str) -> Any:
    """One JSON item of a checkpoint, without a manager (e.g. a teacher's config)."""
    import json

    path = Path(directory) / str(step) / item / "metadata"
    return json.loads(path.read_text())
