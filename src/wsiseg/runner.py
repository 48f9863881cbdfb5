"""Glue shared by the stage entry points: logging to the rule's log, timing, JSON, and
the run block of each stage's record (:mod:`wsiseg.provenance`); and the end of a run
(:func:`end_rescheduling_timers`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager

from . import failure
from .provenance import run_info


def setup_logging(log_path: str | None) -> logging.Logger:
    logger = logging.getLogger("wsiseg")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


@contextmanager
def stage(name: str, slide: str, log_path: str | None, failure_record: str | None = None, outputs=(), **run):
    """Log start and end of a stage; a failure is logged as one line in our words.

    ``failure_record``: the slide's failure record (:mod:`wsiseg.failure`), removed when the
    stage starts and written when it fails, so that a failing slide costs only itself and
    the archive's summary says why. ``outputs``: the stage's outputs, removed when the disk
    is full, to leave room for the record (Snakemake removes them after a failure anyway).

    Once the stage is done, its record gets the run block of provenance.json
    (:func:`add_run`): the record and its facts are the running rule script's
    (:func:`rule_job`), or ``run`` (keywords of :func:`add_run`) where given.
    """
    logger = setup_logging(log_path)
    t0 = time.monotonic()
    started = time.time()
    record = failure_record
    if record:
        failure.clear(record)
    logger.info(f"{name} {slide}: start")
    try:
        yield logger
    except (Exception, MemoryError) as exc:
        rec = failure.explain(
            exc, slide=slide, stage=name, where=os.path.dirname(record or log_path or ""), log=log_path or ""
        )
        if rec.kind == "crash":
            logger.exception(f"{name} {slide}: unexpected error")
        if rec.kind == "disk_full":
            _remove(outputs)
        said = (
            rec.error if record else str(exc) if rec.kind in ("slide", "config") else f"{rec.problem}. Fix: {rec.fix}"
        )
        logger.error(f"{name} failed: {said}")
        if record:
            try:
                rec.write(record)
            except OSError as exc2:
                logger.error(f"{name} {slide}: the failure record {record} could not be written either: {exc2}")
        raise SystemExit(1) from None
    logger.info(f"{name} {slide}: done in {time.monotonic() - t0:.1f} s")
    job = rule_job()
    if job is not None:
        run = (
            dict(
                record=job.output.get("record") or job.output.get("json"),
                params=job.params,
                threads=job.threads,
                inputs=[job.params.path] if job.params.get("path") else [],  # the slide file (not a rule input)
            )
            | run
        )
    if run.get("record"):
        add_run(slide=slide, stage=name, started=started, **run)
    if job is not None:
        leave_now()


def leave_now() -> None:
    """End the process of a rule script whose stage is done, without the interpreter's teardown
    (``os._exit(0)``), once its log is flushed: every output is written and closed by then.

    Python's teardown frees every object one by one: with torch imported 0.4-0.7 s, in every
    slide's segment job, and 0.1-0.2 s in stats and report jobs, which Snakemake waits for before
    it starts the next job. Nothing it does matters to a stage that is done. The
    exception is work still running, which Python's exit would wait for: another non-daemon
    thread, or a multiprocessing child. Then this returns, and the process exits as usual.
    """
    import multiprocessing
    import threading

    main = threading.main_thread()
    if any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate()):
        return
    if multiprocessing.active_children():
        return
    logging.shutdown()  # flushes and closes every handler: the rule's log
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def rule_job():
    """The job of the rule script running in this process: the ``snakemake`` object that
    Snakemake puts into a ``script:``'s globals (None elsewhere). Read here, not passed by
    the scripts, so that recording a stage's run changes no rule script: Snakemake reruns
    a job whose script is newer than its outputs, and a whole archive would be redone."""
    job = getattr(sys.modules.get("__main__"), "snakemake", None)
    return job if hasattr(job, "output") and hasattr(job, "params") else None  # not the snakemake package


def add_run(*, record: str, slide: str, stage: str, started: float, params=None, threads=None, inputs=()) -> None:
    """Write the run block of a stage that started at ``started`` (epoch s) and ends now into
    its JSON record (the stage's output named ``record`` or ``json``; created with the
    slide id if the stage wrote none): times, host, software, ``threads``, the effective
    config ``params`` (the rule's params) and size and mtime of ``inputs`` (the slide).
    The one writer of run blocks; what goes in them: :func:`wsiseg.provenance.run_info`."""
    data = read_json(record) if os.path.exists(record) else dict(slide_id=slide)
    data["run"] = run_info(stage, started, time.time(), params=params, threads=threads, inputs=inputs)
    write_json(record, data)


def slide_stage(name: str, sm):
    """:func:`stage` for a rule of one slide, from the script's ``snakemake`` object. Per-slide
    logs are ``<results>/<model>/<slide>/logs/<rule>.log``, so the slide's folder, and
    its failure record, are two levels above the log."""
    slide_dir = os.path.dirname(os.path.dirname(os.path.abspath(sm.log[0])))
    return stage(
        name, sm.wildcards.slide, sm.log[0], failure_record=failure.record_path(slide_dir), outputs=list(sm.output)
    )


def _remove(paths) -> None:
    for p in paths:
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.remove(p)
        except OSError:
            pass


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def end_rescheduling_timers() -> int:
    """Cancel Snakemake's pending scheduler re-runs once the run is over (the workflow's
    onsuccess and onerror); how many.

    Snakemake's job rate limiter (``--max-jobs-per-timespan``, 100/1s by default) ends every
    scheduling round by starting a ``threading.Timer`` that re-runs the scheduler one timespan
    later (``JobScheduler._schedule_reevalutation``). Its thread is not a daemon, so Python's exit
    waits for the last one, and every ``snakemake`` run ended about a second after its last job.
    A shorter timespan cannot be given: Snakemake 9 reads "100ms" as 100 minutes. Once the run is
    over nothing is left to schedule. A timer of anything else is left alone, and so is every
    timer if a later Snakemake renames the method (tests/test_provenance.py checks the installed
    one).
    """
    import threading

    ended = 0
    for t in threading.enumerate():
        what = getattr(getattr(t, "function", None), "__qualname__", "")
        if isinstance(t, threading.Timer) and "_schedule_reevalutation" in what:
            t.cancel()
            ended += 1
    return ended
