"""Content keys: what decides whether a slide's or a model's results are still current.

Snakemake decides reruns from file modification times, which ``touch``, ``cp -p`` and
``rsync -t`` set at will. The workflow therefore does not make the slide files and the
weights Snakemake inputs (their mtimes decide nothing) and hands the rules their
*content* as params instead, which Snakemake compares with what it recorded for the
outputs:

- a slide's **fingerprint**: the size and SHA-256 of three 64 KiB blocks (start,
  middle, end) of every file of the slide (for a DICOM series all ``.dcm`` files of its
  folder; for MRXS also the files of its data folder). Re-exported, re-scanned,
  truncated or replaced slides differ in size or in these blocks; cost: a stat and
  three reads per file, not the whole file;
- the **weights' SHA-256** (the whole file, as ``model_sha256`` in ``stats.csv``).

:class:`KeyCache` keeps both per file, keyed by (path, size, mtime_ns, ctime_ns, inode),
so a later Snakemake invocation only stats the files. ctime cannot be set by ``cp -p``
or ``rsync -t``: a replaced file always misses the cache and is read again.

No torch, no slide libraries: the Snakefile uses this while it builds the DAG.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BLOCK = 64 << 10  # bytes read at each of the three places of a file
SCHEME = "fp1"  # fingerprint version: size + sha256 of start/middle/end blocks


def file_sha256(path: str) -> str:
    """SHA-256 of the whole file (the weights' checksum in stats.csv)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def slide_files(path: str) -> list:
    """The files a slide is made of, ``path`` first: a DICOM series is every ``.dcm`` of its
    folder, an MRXS slide its ``.mrxs`` plus the files of the data folder of the same name."""
    p = Path(path)
    files = [p]
    if p.suffix.lower() == ".dcm":
        files += sorted(q for q in p.parent.iterdir() if q.suffix.lower() == ".dcm" and q.name != p.name)
    elif p.suffix.lower() == ".mrxs" and p.with_suffix("").is_dir():
        files += sorted(q for q in p.with_suffix("").iterdir() if q.is_file())
    return [str(f) for f in files]


def _blocks(fh, size: int):
    if size <= 3 * BLOCK:
        yield fh.read()
        return
    for off in (0, (size - BLOCK) // 2, size - BLOCK):
        fh.seek(off)
        yield fh.read(BLOCK)


def fingerprint(path: str) -> str:
    """``fp1:<total bytes>:<sha256>`` of the slide's files (names, sizes and three blocks each)."""
    h = hashlib.sha256()
    total = 0
    for i, f in enumerate(slide_files(path)):
        with open(f, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            total += size
            h.update(f"{'' if i == 0 else os.path.basename(f)}\0{size}\0".encode())
            for block in _blocks(fh, size):
                h.update(block)
    return f"{SCHEME}:{total}:{h.hexdigest()}"


def _stat_key(files: list) -> str:
    parts = []
    for f in files:
        st = os.stat(f)
        parts.append(
            f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}"
        )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class KeyCache:
    """Content keys by file state, kept in a small TSV (``kind``, absolute path, stat key,
    value), one line per (kind, path). Reads it once; :meth:`save` merges what this
    process computed into the file (atomic replace; a cache that cannot be written only
    costs time). Only the process that builds the DAG should save."""

    def __init__(self, path: str):
        self.path = path
        self._entries = None  # (kind, abspath) -> (stat key, value)
        self._new = {}

    def _load(self) -> dict:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def _read(self) -> dict:
        out = {}
        try:
            with open(self.path, encoding="utf-8") as fh:
                for line in fh:
                    f = line.rstrip("\n").split("\t")
                    if len(f) == 4:
                        out[(f[0], f[1])] = (f[2], f[3])
        except OSError:
            pass
        return out

    def get(self, kind: str, path: str, compute, files=None) -> str:
        """The ``kind`` key of ``path`` (``compute(path)``), from the cache when the files'
        state (``files``, default ``[path]``) is the one it was computed for."""
        apath = os.path.abspath(path)
        state = _stat_key(files or [path])
        hit = self._load().get((kind, apath))
        if hit and hit[0] == state:
            return hit[1]
        value = compute(path)
        self._entries[(kind, apath)] = self._new[(kind, apath)] = (state, value)
        return value

    def slide_fingerprint(self, path: str) -> str:
        return self.get("fingerprint", path, fingerprint, files=slide_files(path))

    def sha256(self, path: str) -> str:
        return self.get("sha256", path, file_sha256)

    def save(self) -> None:
        if not self._new:
            return
        merged = self._read()
        merged.update(self._new)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                for (kind, p), (state, value) in sorted(merged.items()):
                    if "\t" not in p and "\n" not in p:
                        fh.write(f"{kind}\t{p}\t{state}\t{value}\n")
            os.replace(tmp, self.path)
            self._new = {}
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass
