"""A stage that fails on a slide says why in our words and leaves the slide's failure
record (wsiseg.failure, written by runner.stage): bad slides, a full disk, a read-only
or forbidden path, anything unexpected. Full disks and read-only file systems are real
(small tmpfs mounts; they need root and are skipped with the reason otherwise)."""

import errno
import os
import subprocess
from contextlib import contextmanager

import pytest
from conftest import BAD, needs_data

from wsiseg import tissue
from wsiseg.failure import FailureRecord, explain, record_path
from wsiseg.runner import read_json, stage


@contextmanager
def tmpfs(path, *opts):
    """A real small file system at ``path`` (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill it needs root")
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run_stage(name, slide, folder, body, outputs=()):
    """``body`` inside the stage as a per-slide rule runs it; the record it leaves, the log."""
    log = folder / "logs" / f"{name}.log"
    record = record_path(str(folder))
    with pytest.raises(SystemExit) as e:
        with stage(name, slide, str(log), failure_record=record, outputs=[str(o) for o in outputs]):
            body()
    assert e.value.code == 1
    return FailureRecord.find(record), log.read_text() if log.exists() else ""


@needs_data
def test_bad_slide_in_a_stage_leaves_its_record(tmp_path):
    out = tmp_path / "bad"

    def detect():
        tissue.run(
            slide_path=str(BAD["unreadable"]),
            slide_id="bad",
            mpp=None,
            out_png=str(out / "tissue.png"),
            out_thumb=str(out / "thumb.png"),
            out_json=str(out / "tissue.json"),
        )

    rec, log = run_stage("tissue", "bad", out, detect)
    assert rec.slide_id == "bad" and rec.stage == "tissue" and rec.kind == "slide"
    assert rec.error.startswith("slide 'bad': pixel data could not be decoded") and "Fix:" in rec.error
    assert f"tissue failed: {rec.error}" in log and rec.log == str(out / "logs" / "tissue.log")


def test_a_stage_that_starts_again_clears_the_record_and_success_leaves_none(tmp_path):
    record = record_path(str(tmp_path))
    FailureRecord("s", "segment", "slide", "old", "x").write(record)
    with stage("segment", "s", str(tmp_path / "logs" / "segment.log"), failure_record=record):
        assert not os.path.exists(record)  # the slide is being processed again
    assert FailureRecord.find(record) is None


def test_unexpected_errors_named_with_the_log_that_holds_the_traceback(tmp_path):
    garbage = tmp_path / "segment.json"
    garbage.write_text("{not json")
    rec, log = run_stage("stats", "s", tmp_path, lambda: read_json(str(garbage)))
    assert rec.kind == "crash" and rec.problem.startswith("unexpected error in the stats stage: JSONDecodeError")
    assert f"the traceback is in {tmp_path / 'logs' / 'stats.log'}" in rec.fix
    assert "Traceback (most recent call last)" in log


def test_full_disk_named_with_the_path_and_partial_outputs_removed(tmp_path):
    with tmpfs(tmp_path / "results", "size=256k") as results:
        slide = results / "case01"
        partial = slide / "work" / "labels.store"
        partial.mkdir(parents=True)

        def write():
            with open(partial / "0.0", "wb") as fh:
                for _ in range(1000):
                    fh.write(b"\0" * 65536)  # 64 MB into a 256 kB file system

        rec, log = run_stage("segment", "case01", slide, write, outputs=[partial])
        assert rec.kind == "disk_full", rec
        assert rec.problem.startswith("no space left on the device while writing ") and str(results) in rec.problem
        assert "MB free there now" in rec.problem and "set `results:` to a folder on a larger one" in rec.fix
        assert not partial.exists()  # removed, so the record fits
        assert f"segment failed: {rec.error}" in log


def test_read_only_results_named_as_such(tmp_path):
    with tmpfs(tmp_path / "results", "size=64k", "ro") as results:
        record_dir = tmp_path / "records"
        rec, _ = run_stage("stitch", "case01", record_dir, lambda: open(results / "mask.ome.tif", "wb"))
        assert rec.kind == "read_only" and rec.problem == f"read-only file system: {results / 'mask.ome.tif'}"


def test_permission_and_memory_errors_in_our_words(tmp_path):
    # root reads every file, so the error users get is built here as the OS raises it
    denied = PermissionError(errno.EACCES, "Permission denied", "/archive/case01.svs")
    rec = explain(denied, slide="case01", stage="tissue")
    assert rec.kind == "permission" and rec.problem == "permission denied: /archive/case01.svs"
    assert "give the user running the workflow access to /archive/case01.svs" in rec.fix
    rec = explain(MemoryError(), slide="case01", stage="stats")
    assert rec.kind == "memory" and "--set-resources stats:mem_mb" in rec.fix


def test_record_round_trip(tmp_path):
    rec = FailureRecord(
        "a", "plan", "config", "model.mpp=0.25 but ...", "set model.mpp", "l.log", "2026-01-01T00:00:00"
    )
    rec.write(str(tmp_path / "failed.json"))
    assert FailureRecord.read(str(tmp_path / "failed.json")) == rec
    assert read_json(str(tmp_path / "failed.json"))["stage"] == "plan"


def test_a_full_disk_met_by_a_worker_is_still_a_full_disk(tmp_path):
    """The segment stage's post-processing pool wraps what a worker raised in its own error
    (raise ... from), and a write() names no file: the record says what it comes down to,
    with the slide's folder, where the stage was writing."""
    from wsiseg.postpool import PostprocessError

    with tmpfs(tmp_path / "results", "size=64k") as results:
        slide = results / "case01"
        store = slide / "work" / "labels.store"
        store.mkdir(parents=True)

        def worker_write():
            try:
                with open(store / "0", "wb") as fh:
                    fh.write(b"\0" * (1 << 20))
            except OSError as exc:
                raise PostprocessError("case01: post-processing tile row 4 col 1 failed") from exc

        rec, _ = run_stage("segment", "case01", slide, worker_write, outputs=[store])
        assert rec.kind == "disk_full" and rec.problem.startswith(
            f"no space left on the device while writing {slide} ("
        )
        assert not store.exists()
