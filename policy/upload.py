"""Upload of exported checkpoints to the Hugging Face Hub and to S3: in the background, with retries.

This module owns everything between "an export directory is complete on local disk" and "it is
stored remotely": bounded retries with exponential back-off, the staging of exports, and
`Uploader`, a worker thread with a queue so that training never waits for the network (the
transports and destinations are in `policy.upload_targets`, re-exported here). Use it on the
rank that writes exports (policy rank 0):

    uploader = Uploader.from_settings(          # None when no upload is configured
        hf_repo=ckpt.hf_repo_name if ckpt.upload_hf else "", s3_mode=ckpt.upload_s3,
        s3_bucket=ckpt.s3_bucket, s3_prefix=ckpt.s3_prefix, run_id=info.run_id,
        on_result=report)                       # called from the upload thread
    path = export_hf(...)                                   # <run_dir>/export/step_20
    uploader.submit(path, name=path.name, final=False)      # returns at once
    prune_step_dirs(path.parent, keep, complete_only=False) # safe: see "Staging" below
    ...
    results = uploader.close(timeout_s=1800)                # end of run: waits, bounded

Where things go:
- Hub (`train.ckpt.upload_hf`, repo `train.ckpt.hf_repo_name`, created private if missing):
  every export is uploaded. `final` goes to the repo root, so `from_pretrained("me/model")` loads
  the finished model; `step_N` goes to the folder `step_N/` of the main branch, loadable with
  `from_pretrained("me/model", subfolder="step_N")` (the layout of transformers' Trainer with
  `hub_strategy="all_checkpoints"`, which TRL users know). Files of an earlier upload that the new
  export no longer has are not deleted. The token is huggingface_hub's (`HF_TOKEN` or `hf auth
  login`); `HF_ENDPOINT` is read when each upload starts, so it works even if it was set after
  huggingface_hub was imported.
- S3 (`train.ckpt.upload_s3` = "final" or "all", `s3_bucket`, `s3_prefix`):
  `s3://<bucket>/<s3_prefix>/<run_id>/<name>/<file>`, through boto3's managed transfer (files above
  its threshold, 8 MiB by default, go multipart). Credentials, region and `AWS_ENDPOINT_URL` are
  boto3's usual environment and config files, read when each upload starts.

Staging: `submit` hard-links the export's files into `<export root>/.upload_staging/<name>.<n>/`
before it returns (a copy where the filesystem refuses hard links), and uploads from there. Pruning
or re-exporting the original (`prune_step_dirs`, `export_hf` replacing a directory) only unlinks
names, so the queued upload still reads complete files, and nobody needs to know which exports
are "in use". Nothing here writes to, moves or deletes the export itself; a staging directory is
removed when all its uploads have finished, and leftovers of a crashed run are removed on the
first `submit` into the same export root.

Failures: each upload is attempted `RetryPolicy.attempts` times when it fails with one of the
transports' errors (`retryable_errors`: the network, the remote service, the disk); every
failure is logged with its destination and error. An upload that fails for good is logged at
ERROR and reported as a failed `UploadResult`; it never raises into the training loop. Any other
error is a bug: it stops the upload thread (with its traceback), and `close` reports what was
left as failed. The result callback runs on a thread of its own, so one that raises is logged
and the uploads go on.

Not covered by the tests (they run against moto's S3 server and a fake Hub on 127.0.0.1): the
Hub's LFS / Xet transfer of large files. The fake Hub answers "regular" for every file, so all
content travels inline in the commit; real weights will take the Xet path of huggingface_hub.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gantry.config import ConfigError
from policy.upload_targets import (
    Destination,
    HubDestination,
    S3Destination,
    S3Mode,
    environment_problems,
    files_under,
    retryable_errors,
    upload_config_problems,
    upload_to_hf,
    upload_to_s3,
)

__all__ = [
    "STAGING_DIR",
    "Destination",
    "HubDestination",
    "RetryPolicy",
    "S3Destination",
    "S3Mode",
    "UploadResult",
    "Uploader",
    "environment_problems",
    "retryable_errors",
    "upload_config_problems",
    "upload_to_hf",
    "upload_to_s3",
]

log = logging.getLogger("gantry.policy.upload")

STAGING_DIR = ".upload_staging"


# ------------------------------------------------------------------------------ the uploader


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded attempts; the wait before retry k (k = 1, 2, ...) is first_delay_s * factor**(k-1)."""

    attempts: int = 4
    first_delay_s: float = 5.0
    factor: float = 4.0
    max_delay_s: float = 300.0

    def delay_s(self, retry: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * self.factor ** (retry - 1))


@dataclass(frozen=True)
class UploadResult:
    """The outcome of one export to one destination."""

    destination: str  # "hf://me/model/step_20", "s3://bucket/prefix/run/step_20/"
    name: str  # the export's name: "step_20", "final"
    final: bool
    ok: bool
    attempts: int  # attempts made (0: close() gave up before the first one)
    seconds: float  # from the first attempt to the outcome, back-off included
    error: str = ""  # the last attempt's "ExceptionType: message"; "" when ok


@dataclass
class _Job:
    job_id: int
    staging: Path
    name: str
    final: bool
    destinations: list[Destination]
    source: Path  # the export it was staged from


@dataclass
class _Pending:
    job: _Job
    destination: Destination
    attempts: int = 0
    started: float = field(default_factory=time.monotonic)


class Uploader:
    """A background worker uploading exports to `destinations`, one upload at a time, in order.

    `submit` stages an export and returns at once; `results()` lists the outcomes so far and
    `on_result` (called from a thread of its own, in order) hears each one as it happens;
    `close` waits for what is queued, with a bound. Not safe to share between processes: one
    per run, on one rank.
    """

    def __init__(
        self,
        destinations: Sequence[Destination],
        *,
        retry: RetryPolicy | None = None,
        on_result: Callable[[UploadResult], None] | None = None,
    ) -> None:
        if not destinations:
            raise ValueError("an Uploader needs at least one destination")
        self.destinations = list(destinations)
        self.retry = retry or RetryPolicy()
        self.on_result = on_result
        # The callback's own thread: its Futures carry what it raised, which is logged (see
        # `_log_callback_error`), so a broken callback never stops the uploads. Not a daemon
        # thread, but the policy ends with os._exit, which does not wait for it.
        self._notifier = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="gantry-upload-result")
            if on_result is not None
            else None
        )
        self._notices: list[Future[None]] = []
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._results: list[UploadResult] = []
        # (job id, index of the destination in the job) -> the upload not finished yet
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._ids = itertools.count()
        self._staging_roots: set[Path] = set()
        self._closed = False
        # Set when close() stops waiting: back-off sleeps end and queued jobs are dropped.
        self._abandon = threading.Event()
        # A daemon thread: an upload stuck in the network must never keep the process alive.
        self._thread = threading.Thread(target=self._work, name="gantry-upload", daemon=True)
        # Its error is kept and reported by close() with what it left (staged copies), so it
        # does not end the process (gantry.run.deadline.exit_on_thread_error).
        self._thread.reports_its_errors = True
        self._thread.start()

    @classmethod
    def from_settings(
        cls,
        *,
        hf_repo: str = "",
        s3_mode: Literal["", "final", "all"] | bool | None = "",
        s3_bucket: str = "",
        s3_prefix: str = "",
        run_id: str = "",
        retry: RetryPolicy | None = None,
        on_result: Callable[[UploadResult], None] | None = None,
        check_environment: bool = True,
    ) -> Uploader | None:
        """An Uploader for the `[train.ckpt]` upload keys, or None if no upload is configured.

        `hf_repo`: the Hub repo id, "" for no Hub upload (pass `hf_repo_name if upload_hf`).
        `s3_mode`: `upload_s3`, i.e. "final", "all", or false / "" for no S3 upload.
        `run_id` keeps runs apart in S3: keys go under `<s3_prefix>/<run_id>/<name>/`.
        Raises ConfigError when the values are inconsistent or, with `check_environment`, when
        the credentials an upload needs are missing (better at start-up than after training).
        """
        s3_mode = s3_mode or False
        problems = upload_config_problems(
            upload_hf=bool(hf_repo),
            hf_repo_name=hf_repo,
            upload_s3=s3_mode,
            s3_bucket=s3_bucket,
            s3_prefix=s3_prefix,
        )
        if not problems and check_environment:
            problems = environment_problems(hf=bool(hf_repo), s3=bool(s3_mode))
        if problems:
            raise ConfigError(problems)
        destinations: list[Destination] = []
        if hf_repo:
            destinations.append(HubDestination(hf_repo, run_id=run_id))
        if s3_mode:
            key_prefix = "/".join(filter(None, [s3_prefix.strip("/"), run_id]))
            destinations.append(S3Destination(s3_bucket, key_prefix, mode=s3_mode))
        if not destinations:
            return None
        return cls(destinations, retry=retry, on_result=on_result)

    # ------------------------------------------------------------------ the caller's side

    def submit(self, local_dir: Path, name: str, final: bool) -> None:
        """Queue `local_dir` (a complete export) for every destination that wants it; no wait.

        The files are hard-linked into a staging directory before this returns, so the caller
        may prune or replace `local_dir` right after.
        """
        if self._closed:
            raise RuntimeError("Uploader.submit() after close()")
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotADirectoryError(f"cannot upload {local_dir}: not a directory")
        destinations = [d for d in self.destinations if d.wants(final)]
        if not destinations:
            return
        job_id = next(self._ids)
        staging = local_dir.parent / STAGING_DIR / f"{name}.{job_id}"
        try:
            self._clear_stale_staging(staging.parent)
            _link_tree(local_dir, staging)
        except OSError as err:
            # A full disk or a permission problem costs this upload, not the run.
            _remove_staging(staging)
            for destination in destinations:
                self._report(
                    _fail(destination, name, final, 0, 0.0, f"staging {local_dir} failed: {err!r}")
                )
            return
        job = _Job(job_id, staging, name, final, destinations, source=local_dir)
        with self._lock:
            for index, destination in enumerate(destinations):
                self._pending[job_id, index] = _Pending(job, destination)
        log.info(
            "queued %s for upload to %s",
            local_dir,
            ", ".join(d.describe(name, final) for d in destinations),
        )
        self._queue.put(job)

    def results(self) -> list[UploadResult]:
        """The outcomes so far, in the order they happened."""
        with self._lock:
            return list(self._results)

    def pending(self) -> int:
        """Uploads queued or in progress."""
        with self._lock:
            return len(self._pending)

    def busy_paths(self) -> set[Path]:
        """The exports with uploads queued or in progress.

        For information only: pruning them is safe (the uploads read hard-linked staging
        copies), and keeping them costs no disk space while those copies exist.
        """
        with self._lock:
            return {p.job.source for p in self._pending.values()}

    def close(self, timeout_s: float | None = None) -> list[UploadResult]:
        """Wait up to `timeout_s` (None: no bound) for the queued uploads; return all results.

        Uploads still unfinished when the time is up are reported as failed (and logged at
        ERROR); the worker stops retrying, and a transfer in flight is left to the daemon thread,
        which ends with the process. Calling close() again waits again.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abandon.set()
            self._report_unfinished(f"not finished when close() stopped waiting after {timeout_s}s")
        elif self.pending():
            self._report_unfinished("not uploaded: the upload thread stopped on an error (above)")
        else:
            for root in self._staging_roots:
                # Empty once every upload has finished; not empty (OSError) means a staged
                # copy of this run is still there, which was logged when it was left behind.
                with contextlib.suppress(OSError):
                    root.rmdir()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        wait_for(self._notices, timeout=remaining)  # `on_result` heard every outcome
        return self.results()

    def _report_unfinished(self, reason: str) -> None:
        with self._lock:
            unfinished = list(self._pending.values())
            self._pending.clear()
        for p in unfinished:
            seconds = time.monotonic() - p.started if p.attempts else 0.0
            result = _fail(p.destination, p.job.name, p.job.final, p.attempts, seconds, reason)
            self._report(result, staging=p.job.staging)

    # ------------------------------------------------------------------ the worker's side

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                for index in range(len(job.destinations)):
                    if self._abandon.is_set():
                        return
                    self._upload_with_retries((job.job_id, index))
            finally:
                if not self._abandon.is_set():
                    _remove_staging(job.staging)

    def _upload_with_retries(self, key: tuple[int, int]) -> None:
        with self._lock:
            pending = self._pending.get(key)
        if pending is None:  # close() already reported it as unfinished
            return
        job, destination = pending.job, pending.destination
        target = destination.describe(job.name, job.final)
        pending.started = started = time.monotonic()
        error, retryable = "", retryable_errors()
        for attempt in range(1, self.retry.attempts + 1):
            pending.attempts = attempt
            try:
                destination.upload(job.staging, job.name, job.final)
            except retryable as err:  # reported and retried; anything else is a bug: raised
                error = f"{type(err).__name__}: {err}"
            else:
                seconds = time.monotonic() - started
                self._finish(key, UploadResult(target, job.name, job.final, True, attempt, seconds))
                return
            if attempt < self.retry.attempts:
                delay = self.retry.delay_s(attempt)
                log.warning(
                    "upload of %s to %s failed (attempt %d/%d), retrying in %.1fs: %s",
                    job.name,
                    target,
                    attempt,
                    self.retry.attempts,
                    delay,
                    error,
                )
                if self._abandon.wait(delay):
                    return  # close() gave up and has reported this upload as unfinished
        seconds = time.monotonic() - started
        self._finish(key, _fail(destination, job.name, job.final, pending.attempts, seconds, error))

    def _finish(self, key: tuple[int, int], result: UploadResult) -> None:
        with self._lock:
            reported = self._pending.pop(key, None) is None
        if reported:
            log.info(
                "%s to %s finished after close() gave up: ok=%s",
                result.name,
                result.destination,
                result.ok,
            )
            return
        self._report(result)

    def _report(self, result: UploadResult, staging: Path | None = None) -> None:
        if result.ok:
            log.info(
                "uploaded %s to %s in %.1fs (%d attempt%s)",
                result.name,
                result.destination,
                result.seconds,
                result.attempts,
                "" if result.attempts == 1 else "s",
            )
        else:
            kept = f"; its staged copy stays at {staging}" if staging else ""
            log.error(
                "upload of %s to %s FAILED after %d attempt(s): %s%s",
                result.name,
                result.destination,
                result.attempts,
                result.error,
                kept,
            )
        with self._lock:
            self._results.append(result)
            if self._notifier is not None:  # under the lock: the callback hears them in order
                notice = self._notifier.submit(self.on_result, result)
                notice.add_done_callback(functools.partial(_log_callback_error, result))
                self._notices.append(notice)

    def _clear_stale_staging(self, root: Path) -> None:
        """Remove what a previous process left in `root` (once per root, before first use)."""
        if root in self._staging_roots:
            return
        self._staging_roots.add(root)
        stale = sorted(root.iterdir()) if root.is_dir() else []
        if stale:
            log.warning(
                "removing %d staged upload(s) left by an earlier run in %s", len(stale), root
            )
        for path in stale:
            _remove_staging(path)


def _log_callback_error(result: UploadResult, notice: Future[None]) -> None:
    if (error := notice.exception()) is not None:
        log.error("the upload result callback raised on %s", result, exc_info=error)


def _fail(
    destination: Destination, name: str, final: bool, attempts: int, seconds: float, error: str
) -> UploadResult:
    return UploadResult(
        destination.describe(name, final), name, final, False, attempts, seconds, error
    )


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` to the same relative path under `target`."""
    for path in files_under(source):
        linked = target / path.relative_to(source)
        linked.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, linked)
        except OSError:
            # Some filesystems refuse hard links (EXDEV, EPERM on some network mounts): copy.
            # If the file itself is unreadable the copy raises too, which is the real error.
            shutil.copy2(path, linked)


def _remove_staging(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass  # already gone: nothing to clean
    except OSError as err:
        log.warning("could not remove the upload staging directory %s: %r", path, err)
