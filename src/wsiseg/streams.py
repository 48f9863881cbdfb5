"""Network streams: the segment stage on the CPU as several processes, each running the whole
pipeline (read a window, the network on CPUs of its own, post-process, write) over the tiles it
takes from one shared plan.

Why: in one process, whatever the stage does between two network calls (reading the next
window, the tile's instance post-processing: about a tenth of the network's time on the CPU)
leaves the network's other threads idle. With one stream per CPU each network runs on a CPU of
its own, and one stream's reading and post-processing overlap the others' networks: on a 2-CPU
job the stage went from 0.86-0.89 to 0.92-0.93 of the network's own speed (the model alone on
the windows in memory, one process on both CPUs), 1.1x the output (benchmarks/README.md,
"Network streams").

The tiles are handed out one at a time from a shared counter (:class:`SharedTiles`), so a
stream slowed by a busy CPU takes fewer of them and no stream waits at the end for more than
one tile. Every tile is computed by the same function in any stream, so the store does not
depend on the number of streams (tests/test_streams.py).

This module only runs processes: :func:`run_forked` forks ``n`` children that each call
``work(i)`` and send its result back, fails the stage with a message naming the slide when
one fails or dies, and leaves no child behind (Ctrl-C, SIGTERM, the parent killed).
:func:`wsiseg.segment.run_streams` is the segment stage's use of it.

Forking a process whose OpenMP runtime (libgomp, PyTorch's on Linux) has started a team of
threads leaves the child a runtime that hangs at its first parallel region of more than one
thread. The caller must have run torch with one thread only before :func:`run_forked`
(``torch.set_num_threads(1)``: ATen and oneDNN then start no team); each child may then set its own
thread count (:func:`wsiseg.segment.run` does so).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from multiprocessing.connection import wait

from .postpool import _die_with_parent


class StreamError(RuntimeError):
    """A network stream failed without an error of its own to raise, or died: the slide fails."""


class SharedTiles:
    """The plan's tile indices, handed out in plan order, one at a time, to whichever stream
    asks next (a counter in shared memory, made before the fork). Iterating it in a stream
    yields the indices that stream takes; usable as a DataLoader's sampler."""

    def __init__(self, n: int):
        self.n = int(n)
        self._next = mp.get_context("fork").Value("q", 0)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        while True:
            with self._next.get_lock():
                i = self._next.value
                self._next.value = i + 1
            if i >= self.n:
                return
            yield i


class Tally:
    """Counts shared by the streams (made before the fork): ``done[i]``, tiles stream i has
    handed over; ``unreadable``, unreadable tiles over all streams (the slide's limit on them
    counts the slide's, not a stream's)."""

    def __init__(self, n: int):
        ctx = mp.get_context("fork")
        self.done = ctx.Array("q", int(n))
        self.unreadable = ctx.Value("q", 0)

    def add_unreadable(self) -> int:
        """Count one more unreadable tile; the slide's count so far."""
        with self.unreadable.get_lock():
            self.unreadable.value += 1
            return self.unreadable.value

    def total_done(self) -> int:
        return int(sum(self.done[:]))


def _child(i: int, work, conn) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the stage, which ends the streams
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the stage's handler, if it was inherited
    try:
        result = ("ok", work(i))
    except BaseException as exc:  # sent to the parent, which raises it
        tb = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(exc))  # the parent must be able to rebuild it
            result = ("error", (exc, tb))
        except Exception:  # an exception that does not pickle: its text
            result = ("error", (StreamError(f"{type(exc).__name__}: {exc}"), tb))
    try:
        conn.send(result)
    finally:
        conn.close()


def _ended(p) -> str:
    code = p.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_forked(n: int, work, slide_name: str, tick=None, tick_s: float = 10.0, log_fn=None) -> list:
    """``work(i)`` for i in 0..n-1, each in a forked child; their results, in order of i.

    ``tick()`` runs in this process every ``tick_s`` seconds while the children work (the
    stage's progress lines). An exception raised in a child is raised here, with the child's
    traceback logged through ``log_fn``; a child that dies without a result (killed, out of
    memory) fails the slide with a :class:`StreamError`. Either way, and on Ctrl-C or SIGTERM
    (as SystemExit, :func:`wsiseg.segment._sigterm_as_exit`), the other children are
    terminated and waited for: none outlives this call. On Linux a child is also signalled when
    this process dies (``PR_SET_PDEATHSIG``)."""
    ctx = mp.get_context("fork")
    procs, conns, results = [], [], {}
    try:
        for i in range(n):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(i, work, send), name=f"wsiseg-stream-{i}", daemon=False)
            p.start()
            send.close()  # the child's end: EOF here once the child is gone
            procs.append(p)
            conns.append(recv)
        waiting = dict(enumerate(conns))
        next_tick = time.monotonic() + tick_s
        while waiting:
            ready = wait(list(waiting.values()), timeout=max(0.0, next_tick - time.monotonic()))
            for conn in ready:
                i = next(k for k, c in waiting.items() if c is conn)
                try:
                    status, value = conn.recv()
                except EOFError:  # the child ended without sending: killed, out of memory
                    procs[i].join(timeout=10)
                    raise StreamError(
                        f"{slide_name}: network stream {i} of {n} died ({_ended(procs[i])}) before it was done; "
                        "rerun the slide, with fewer tiling.streams or more memory (mem_mb) if it recurs"
                    ) from None
                del waiting[i]
                if status == "error":
                    exc, tb = value
                    if log_fn is not None:
                        log_fn(f"{slide_name}: network stream {i} of {n} failed:\n{tb.rstrip()}")
                    raise exc
                results[i] = value
            if tick is not None and time.monotonic() >= next_tick:
                tick()
                next_tick = time.monotonic() + tick_s
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # ignored SIGTERM for 10 s
                os.kill(p.pid, signal.SIGKILL)
                p.join()
        for c in conns:
            c.close()
    return [results[i] for i in range(n)]
