"""Which GPU a job runs on when it sees several: one GPU per job on a multi-GPU workstation.

On a cluster the scheduler gives each job its own GPU (SLURM's ``--gpus=1`` sets
``CUDA_VISIBLE_DEVICES``), so the job sees one and uses it. On a workstation with several GPUs
every job sees all of them, and torch's ``cuda`` is the first: segment jobs running side by
side would all compute on GPU 0 while the others idle.

So a job that sees more than one GPU claims one that no other job holds: an exclusive
``flock`` on a file named after the GPU (its UUID where torch gives it), in a folder of this
user's under /tmp, kept until the process ends. The kernel drops the lock
when the process ends however it ends, ``kill -9`` included, so no stale claim survives a
crash. When every GPU is held, the job shares one rather than wait (a job that waited would
hold its CPUs idle); the log says which. Jobs of other users and other programs are not seen.

This module does not import torch: :func:`wsiseg.segment.pick_device` gives it the GPUs' keys.
"""

from __future__ import annotations

import fcntl
import os
import re

#: (index, whether this process holds the GPU alone, the open lock file) of this process's claim:
#: a second call returns the same GPU, and the file stays open (the lock held) until the process ends
_CLAIM: tuple[int, bool, object] | None = None


def lock_dir() -> str:
    """The folder of the lock files: this user's, on this machine (GPUs are per machine). In /tmp,
    not ``$TMPDIR``, which may differ from job to job (Snakemake's ``tmpdir`` resource)."""
    return f"/tmp/wsiseg-gpus-{os.getuid()}"


def _file_name(key: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".lock"


def claim(keys: list[str], directory: str | None = None) -> tuple[int, bool]:
    """(i, True): ``keys[i]`` is a GPU that no other process holds, now held by this one until
    it ends; (i, False): every GPU is held, and this process shares ``keys[i]`` (chosen by its
    process id, so that sharers spread). The first free GPU in the order of ``keys`` wins.
    Called again in the same process, it returns the same answer."""
    global _CLAIM
    if not keys:
        raise ValueError("no GPU to claim")
    if _CLAIM is not None:
        return _CLAIM[0], _CLAIM[1]
    directory = directory or lock_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for i, key in enumerate(keys):
        fd = os.open(os.path.join(directory, _file_name(key)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person who looks
        _CLAIM = (i, True, fd)
        return i, True
    i = os.getpid() % len(keys)
    _CLAIM = (i, False, None)
    return i, False


def device_keys(torch) -> list[str]:
    """One key per GPU that ``torch`` sees, the same in every process on this machine: the
    GPU's UUID where torch gives it, else its entry of ``CUDA_VISIBLE_DEVICES``, else its
    index."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    keys = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        keys.append(str(uuid) if uuid else visible[i] if i < len(visible) else str(i))
    return keys
