"""One GPU per job on a multi-GPU workstation (wsiseg.gpus): claims between real processes,
released by the kernel when a holder dies, shared (never waited for) when every GPU is held."""

import os
import signal
import subprocess
import sys
import types

import pytest
import torch
from conftest import REPO

from wsiseg import gpus
from wsiseg.segment import pick_device

KEYS = ["GPU-5a1b2c3d-0000-0000-0000-000000000000", "GPU-5a1b2c3d-1111-1111-1111-111111111111"]

HOLD = """
import sys
sys.path.insert(0, sys.argv[1])
from wsiseg import gpus
i, alone = gpus.claim(sys.argv[3:], sys.argv[2])
print(i, alone, flush=True)
sys.stdin.read()  # hold the claim until the test closes stdin
"""


class Job:
    """A process that claims one of ``KEYS`` and holds it until :meth:`end` (or a kill)."""

    def __init__(self, directory):
        self.p = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(REPO / "src"), str(directory), *KEYS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.p.stdout.readline().split()
        assert len(line) == 2, "the claim printed nothing"
        self.gpu, self.alone = int(line[0]), line[1] == "True"

    def end(self):
        self.p.stdin.close()
        assert self.p.wait(timeout=60) == 0


def test_jobs_side_by_side_get_different_gpus_then_share_and_a_killed_job_frees_its_gpu(tmp_path):
    first, second = Job(tmp_path), Job(tmp_path)
    assert (first.gpu, first.alone) == (0, True)
    assert (second.gpu, second.alone) == (1, True)
    third = Job(tmp_path)  # every GPU held: it shares one at once instead of waiting
    assert third.alone is False and third.gpu in (0, 1)
    third.end()
    os.kill(first.p.pid, signal.SIGKILL)  # a crash: the kernel drops its lock
    first.p.wait(timeout=60)
    fourth = Job(tmp_path)
    assert (fourth.gpu, fourth.alone) == (0, True)
    second.end()
    fourth.end()
    again = Job(tmp_path)  # ended normally: free again
    assert (again.gpu, again.alone) == (0, True)
    again.end()


def test_a_claim_is_kept_for_the_process_and_named_after_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "_CLAIM", None)
    assert gpus.claim(KEYS, str(tmp_path)) == (0, True)
    assert gpus.claim(KEYS[::-1], str(tmp_path)) == (0, True)  # the same answer, not a second GPU
    assert sorted(os.listdir(tmp_path)) == [f"gpu-{KEYS[0]}.lock"]
    assert (tmp_path / f"gpu-{KEYS[0]}.lock").read_text() == f"{os.getpid()}\n"
    # the lock file is closed (released) only when this process ends: another process sees it held
    other = Job(tmp_path)
    assert (other.gpu, other.alone) == (1, True)
    other.end()
    os.close(gpus._CLAIM[2])
    monkeypatch.setattr(gpus, "_CLAIM", None)
    with pytest.raises(ValueError):
        gpus.claim([], str(tmp_path))


def _gpus_seen(monkeypatch, n):
    """torch as a job sees it on a machine with ``n`` GPUs (this machine has none): the facts
    pick_device asks for, and the device it makes current."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=KEYS[i]))
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    return current


def test_pick_device_takes_a_gpu_no_other_job_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "_CLAIM", None)
    monkeypatch.setattr(gpus, "lock_dir", lambda: str(tmp_path))
    current = _gpus_seen(monkeypatch, 2)
    other = Job(tmp_path)  # another segment job holds GPU 0
    logged = []
    assert pick_device("auto", logged.append) == torch.device("cuda", 1)
    assert current == [1]
    assert logged == ["2 GPUs visible: running on cuda:1, which no other wsiseg job holds"]
    os.close(gpus._CLAIM[2])  # as if this job ended

    monkeypatch.setattr(gpus, "_CLAIM", None)  # a third job while two hold both GPUs: it shares one
    another = Job(tmp_path)
    logged.clear()
    dev = pick_device("cuda", logged.append)
    assert dev.type == "cuda" and current[-1] == dev.index
    assert logged == [
        f"2 GPUs visible: running on cuda:{dev.index}, shared: all 2 are held by other wsiseg jobs of this user "
        "(device: cuda with --resources gpu=2 runs one job per GPU)"
    ]
    other.end()
    another.end()


def test_pick_device_with_one_gpu_or_none(tmp_path, monkeypatch):
    monkeypatch.setattr(gpus, "_CLAIM", None)
    monkeypatch.setattr(gpus, "lock_dir", lambda: str(tmp_path))
    with monkeypatch.context() as m:
        current = _gpus_seen(m, 1)  # a cluster job: the GPU it was given, nothing claimed
        assert pick_device("cuda", lambda msg: None) == torch.device("cuda")
        assert current == [] and os.listdir(tmp_path) == []
    # this machine: no CUDA. A job given a GPU by its scheduler says it cannot use it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    logged = []
    assert pick_device("auto", logged.append) == torch.device("cpu")
    assert logged == [
        "WARNING: a GPU was requested (the job was given GPU 3) but CUDA is not available here; running the "
        "model on the CPU"
    ]
