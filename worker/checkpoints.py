"""A training job's checkpoints through the object store, so a job resumes on any node.

Training writes `<work_dir>/state/step-NNNNNNNN/` (bitcore.train.state) every
`checkpoint_every` steps and keeps only the newest. With a remote store (BITSERVE_STORAGE_URL
=s3://...) each one is also published as `jobs/<job_id>` (service.storage.publish_checkpoint):

- `CheckpointPublisher.submit(step)` runs on the training thread right after the save: it
  hard-links the step folder into a snapshot beside `state/` (the next save deletes the step
  folder; the links keep its files) and uploads the snapshot in a background thread, so
  training goes on meanwhile. One upload at a time: the next submit, and the end of training,
  join the previous one (the job is released, recorded or ended only after its last upload).
  A failed upload is logged and training continues; the next checkpoint tries again.
- `restore` runs before training: it fetches the published checkpoint (verified against its
  manifest) unless this node already has one at least as advanced. Missing, damaged or
  unreachable: logged, and training starts from what is here (step 0 on a fresh node).

With the local store (the default) both do nothing: the work dir is already where the next
attempt looks.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

from bitcore.train import state
from bitcore.train.engine import STATE_DIR
from service.object_store import ObjectMissing, ObjectStoreError
from service.storage import Storage

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = ".publish-"  # beside state/, never inside it (state.latest ignores it)
FETCHED_DIR = ".fetched-state"


class CheckpointPublisher:
    """Publishes a job's checkpoints in the background, one upload at a time."""

    def __init__(self, storage: Storage, job_id: str, work_dir: Path) -> None:
        self.storage, self.job_id, self.work_dir = storage, job_id, work_dir
        self.enabled = storage.objects.is_remote
        self.published_step: int | None = None  # the last step that reached the store
        self.seconds: list[float] = []  # how long each successful upload took
        self._thread: threading.Thread | None = None

    def submit(self, step: int) -> None:
        """Publish the checkpoint of `step` just written (after the previous upload ends)."""
        if not self.enabled:
            return
        self.join()
        saved = state.latest(self.work_dir / STATE_DIR)
        if saved is None or saved.step != step:  # cannot happen: the save precedes the call
            log.warning("job %s: no complete checkpoint of step %d to publish", self.job_id, step)
            return
        try:
            snapshot = self._snapshot(saved)
        except OSError as exc:  # a full disk, say: this checkpoint stays local only
            log.warning("job %s: checkpoint of step %d not published: %s", self.job_id, step, exc)
            return
        self._thread = threading.Thread(
            target=self._publish,
            args=(snapshot, step),
            name=f"publish-{self.job_id}",
            daemon=True,
        )
        self._thread.start()

    def join(self) -> None:
        """Wait for the upload in flight, if any (its result is logged, never raised)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> CheckpointPublisher:
        return self

    def __exit__(self, *_: object) -> None:
        self.join()

    def _snapshot(self, saved: state.SavedState) -> Path:
        root = self.work_dir / f"{SNAPSHOT_PREFIX}{saved.step:08d}"
        shutil.rmtree(root, ignore_errors=True)
        target = root / saved.path.name
        target.mkdir(parents=True)
        for source in saved.path.iterdir():
            try:  # a link is instant; the files are replaced by rename, never rewritten
                os.link(source, target / source.name)
            except OSError:
                shutil.copy2(source, target / source.name)
        return root

    def _publish(self, snapshot: Path, step: int) -> None:
        started = time.perf_counter()
        try:
            self.storage.publish_checkpoint(self.job_id, snapshot)
        except Exception as exc:  # ObjectStoreError, OSError: training must go on
            log.warning(
                "job %s: publishing the checkpoint of step %d failed (the next checkpoint "
                "tries again): %s",
                self.job_id,
                step,
                exc,
            )
        else:
            seconds = time.perf_counter() - started
            self.published_step = step
            self.seconds.append(seconds)
            log.info(
                "job %s: checkpoint of step %d published in %.3f s", self.job_id, step, seconds
            )
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)


def restore(storage: Storage, job_id: str, work_dir: Path) -> int | None:
    """Fetch the job's published checkpoint into `<work_dir>/state` unless this node has one
    at least as advanced; returns the step fetched, or None (nothing fetched: training starts
    from the local checkpoint, or from step 0). Never raises for the store's sake."""
    if not storage.objects.is_remote:
        return None
    state_dir = work_dir / STATE_DIR
    local = state.latest(state_dir)
    local_step = local.step if local is not None else 0
    fetched = work_dir / FETCHED_DIR
    storage.remove(fetched)  # a fetch must land in a new folder
    try:
        storage.fetch_checkpoint(job_id, fetched)
    except ObjectMissing:
        log.info("job %s: no checkpoint in the object store; starts at step %d", job_id, local_step)
        return None
    except ObjectStoreError as exc:  # damaged (ObjectCorrupt) or unreachable: start over
        log.warning(
            "job %s: its checkpoint in the object store is unusable (%s); starts at step %d",
            job_id,
            exc,
            local_step,
        )
        return None
    try:
        remote = state.latest(fetched)
        if remote is None or (local is not None and local.step >= remote.step):
            return None
        storage.remove(state_dir)
        os.rename(fetched, state_dir)
    finally:
        storage.remove(fetched)
    log.info("job %s resumed from step %d (checkpoint from the object store)", job_id, remote.step)
    return remote.step
