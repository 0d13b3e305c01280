"""Worker processes that die with their parent.

Every process this project starts for work (grain's `mp_prefetch` workers, the captioned_shapes render
pool) calls `die_with_parent` first: grain through its `worker_init_fn` hook (use `mp_prefetch` here
instead of `IterDataset.mp_prefetch`), a multiprocessing Pool through `initializer=`. Without it a trainer
killed with SIGKILL (the OOM killer, a scheduler's hard kill, a user's `kill -9`) leaves its grain workers
running with parent 1 indefinitely, about 240 MB each: they sit in grain's put-to-queue loop, which only
stops on an event the dead parent can no longer set.

Mechanism: a daemon thread in the worker that checks every `POLL_S` seconds whether the process it was
started by is still its parent, and ends the worker with `os._exit` as soon as it is not. It wakes at once
when the parent's end of multiprocessing's parent sentinel pipe closes (each multiprocessing child has
one), and falls back on `os.getppid()` comparisons (a changed parent pid means the parent died and the
worker was re-parented to init or a subreaper). The check also runs once before the thread starts, so a
parent that died while the worker was starting up is caught too.

Why not prctl(PR_SET_PDEATHSIG): Linux sends that signal when the *thread* that forked the child exits,
not the process. grain 0.2 starts its worker processes from its own prefetch threads
("grain-thread-prefetch-..."), and it ends and replaces those threads while the trainer lives, e.g. on
`set_state` when a run resumes from a checkpoint. Measured with grain 0.2.18: with PR_SET_PDEATHSIG=SIGKILL
set in `worker_init_fn`, the next `next(it)` after `it.set_state(it.get_state())` hung (stopped after
120 s), where without the prctl it returned at once. Watching the parent process costs one wake-up per
`POLL_S` per worker and is portable (macOS included); the price is an exit up to `POLL_S` seconds late
where the sentinel does not close (no multiprocessing parent; in a forked pool a sibling forked later
still holds it), and a worker whose main thread holds the GIL in one long C call exits when that call
returns. A process that starts workers of its own calls `die_with_parent` in them too: each process
watches its own parent, so a tree unwinds from the top.

The resource tracker: multiprocessing starts it, not us; it exits by itself once every process holding
its pipe (the parent and the workers) is gone, so it follows the workers (checked: gone within a second
of the last worker). After a SIGKILL it unlinks the shared-memory blocks the dead processes held and
reports them as leaked, which is expected then. After a SIGTERM or an exception the trainer closes its
iterator in a `finally` (`pipeline.close_iterator`, after dropping the locals of the failed call's frames
that still hold the last batch), which stops the workers and frees the blocks in order: nothing is left
and nothing is reported.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

POLL_S = 0.5  # seconds between checks of the parent when no sentinel pipe is available
EXIT_CODE = 70  # the worker's exit status when its parent has died (EX_SOFTWARE)

_watching = 0  # the pid whose watcher runs (a forked child inherits the variable, not the thread)
_lock = threading.Lock()


def _parent() -> tuple[int, int | None] | None:
    """(the parent pid to watch, the multiprocessing parent sentinel's file descriptor or None), or None when
    the process that started this one has already died."""
    import multiprocessing

    ppid = os.getppid()
    parent = multiprocessing.parent_process()
    if parent is None:
        return ppid, None
    try:
        sentinel = parent.sentinel
    except ValueError:
        sentinel = None
    if parent.pid and parent.pid != ppid:
        # re-parented already (the parent died while this process started), or started through a
        # forkserver, whose pid getppid() returns while the requesting process is alive
        try:
            os.kill(parent.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
    return ppid, sentinel


def _parent_gone(ppid: int, sentinel: int | None, timeout: float) -> bool:
    if sentinel is not None:
        from multiprocessing.connection import wait

        try:
            if wait([sentinel], timeout):
                return True
        except (OSError, ValueError):  # the fd was closed under us: rely on the pid check
            time.sleep(timeout)
    else:
        time.sleep(timeout)
    return os.getppid() != ppid


def _watch(ppid: int, sentinel: int | None) -> None:
    while not _parent_gone(ppid, sentinel, POLL_S):
        pass
    os._exit(EXIT_CODE)


def die_with_parent(*_args: Any) -> None:
    """Makes this process exit within about `POLL_S` seconds of its parent's death (any cause, SIGKILL
    included). Call it first thing in a worker process; idempotent; the arguments are ignored, so it can be
    grain's `worker_init_fn` (worker index, worker count) or a Pool `initializer` as it is. A worker that
    starts workers of its own gives them the same call: each process watches its own parent."""
    global _watching
    with _lock:
        if _watching == os.getpid():
            return
        parent = _parent()
        if parent is None:  # the parent died while this process was starting
            os._exit(EXIT_CODE)
        threading.Thread(target=_watch, args=parent, name="die-with-parent", daemon=True).start()
        _watching = os.getpid()


def mp_prefetch(it, num_workers: int):
    """`it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))` with workers that die with
    their parent (see the module docstring). The one way this project starts grain worker processes."""
    import grain

    return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=die_with_parent)
