"""A slide's failure record: which stage could not finish the slide, why, and the fix.

``<results>/<model>/<slide>/failed.json`` is written by a per-slide stage that fails
(rules tissue, plan, segment, stitch, stats: :func:`wsiseg.runner.slide_stage`) and
removed when a stage of that slide starts again, so it always describes the slide's
latest attempt; a run that finishes the slide leaves none. (A slide that cannot be
read at all is recorded by the inspect stage in slide.json instead, with its error.)
:class:`FailureRecord` is its one reader and writer; ``summary.csv`` shows it as
``status=failed`` with ``failed_stage`` and ``error``.

Errors are said in our words by :func:`explain`: bad input (:class:`SlideError`),
configuration (:class:`ConfigError`), a full disk, a permission or read-only file
system (with the path), lack of memory, anything else with its type and the log that
holds the traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

from .errors import ConfigError, SlideError

#: ``kind`` values: what went wrong, for tables and reports
KINDS = ("slide", "config", "disk_full", "permission", "read_only", "memory", "crash", "killed", "incomplete")


@dataclass(frozen=True)
class FailureRecord:
    """failed.json: one slide's failure in one stage (``kind``: one of :data:`KINDS`)."""

    slide_id: str
    stage: str  # the rule: tissue, plan, segment, stitch, stats
    kind: str
    problem: str
    fix: str
    log: str = ""  # the stage's log (the traceback of an unexpected error is there)
    time: str = ""  # when it failed, local ISO time

    @property
    def error(self) -> str:
        """The user-facing line, in the form every slide error has."""
        return f"slide '{self.slide_id}': {self.problem}. Fix: {self.fix}"

    def write(self, path: str) -> None:
        tmp = f"{path}.tmp"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(asdict(self), fh, indent=2)
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str) -> FailureRecord:
        with open(path) as fh:
            d = json.load(fh)
        return cls(**{k: d.get(k, "") for k in cls.__dataclass_fields__})

    @classmethod
    def find(cls, path: str) -> FailureRecord | None:
        """The record at ``path``, or None when the slide has none (or it cannot be read)."""
        try:
            return cls.read(path)
        except (OSError, ValueError, TypeError):
            return None


def record_path(slide_dir: str) -> str:
    return os.path.join(slide_dir, "failed.json")


def clear(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _free(path: str) -> str:
    d = path
    while d and not os.path.isdir(d):
        d = os.path.dirname(d)
    try:
        return f"{shutil.disk_usage(d or '.').free / 1e6:.0f} MB free there now"
    except OSError:
        return "free space unknown"


_OS_KNOWN = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def cause(exc: BaseException) -> BaseException:
    """What ``exc`` comes down to: the first error in its chain (``raise ... from``, or raised
    while handling) that :func:`explain` can say in our words, else ``exc`` itself. A full
    disk met by a worker process reaches the stage wrapped in the pool's own error."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (SlideError, ConfigError, MemoryError)) or (isinstance(e, OSError) and e.errno in _OS_KNOWN):
            return e
        e = e.__cause__ or e.__context__
    return exc


def explain(exc: BaseException, *, slide: str, stage: str, where: str = "", log: str = "") -> FailureRecord:
    """The failure record for ``exc`` raised by ``stage`` on ``slide`` (said by its
    :func:`cause`); ``where``: the folder the stage writes to (named when an OSError
    carries no path)."""
    exc = cause(exc)
    again = "then run the same command again (the slide is retried)"
    now = time.strftime("%Y-%m-%dT%H:%M:%S")

    def rec(kind, problem, fix):
        return FailureRecord(slide, stage, kind, problem, fix, log, now)

    if isinstance(exc, SlideError):
        return rec("slide", exc.problem, exc.fix)
    if isinstance(exc, ConfigError):
        return rec("config", str(exc).rstrip("."), f"change the setting the message names, {again}")
    if isinstance(exc, MemoryError):
        return rec(
            "memory",
            f"out of memory in the {stage} stage",
            f"give the {stage} job more memory (--set-resources {stage}:mem_mb=..., on a cluster the retry "
            f"asks for twice as much), {again}",
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        path = exc.filename or where or "its output folder"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
            return rec(
                "disk_full",
                f"{what} while writing {path} ({_free(path)})",
                f"free space on that file system, or set `results:` to a folder on a larger one, {again}",
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            return rec(
                "permission",
                f"permission denied: {path}",
                f"give the user running the workflow access to {path} (read for slides and weights, "
                f"write for the results folder), {again}",
            )
        if exc.errno == errno.EROFS:
            return rec(
                "read_only",
                f"read-only file system: {path}",
                f"set `results:` to a folder on a writable file system, {again}",
            )
    where_log = f"the traceback is in {log}" if log else "see the job's log for the traceback"
    return rec(
        "crash",
        f"unexpected error in the {stage} stage: {type(exc).__name__}: {exc}",
        f"{where_log}; run the same command again to retry, and report it if it persists",
    )


def not_finished(*, slide: str, stage: str, log: str, failed: bool, batch=()) -> FailureRecord:
    """For a slide whose ``stage`` job left no record: the job died (``failed``: killed,
    e.g. for memory or time on a cluster), it shared a cluster job with slides that failed
    (``batch``: their ids), or it never ran (the run ended first)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    if batch:
        return FailureRecord(
            slide,
            stage,
            "incomplete",
            f"its {stage} step ran in one cluster job with {', '.join(batch)}, and that job failed "
            "(see their errors): this slide itself showed no problem",
            "run the same command again (it is redone with the others once they are fixed or removed)",
            log,
            now,
        )
    if failed:
        return FailureRecord(
            slide,
            stage,
            "killed",
            f"its {stage} job failed without a message from the workflow (killed, e.g. for memory or "
            "time on a cluster, or the disk was full)",
            f"see {log} and Snakemake's output; on a cluster the retry asks for twice the memory and time "
            f"(raise them with set-resources if it fails again); run the same command again",
            log,
            now,
        )
    return FailureRecord(
        slide,
        stage,
        "incomplete",
        f"its {stage} step did not run: the run ended before it (another job of the same batch failed, "
        "or the run was stopped)",
        "run the same command again",
        log,
        now,
    )
