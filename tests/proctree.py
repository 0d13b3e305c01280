"""Linux process trees read from /proc, by pid and start time (a recycled pid is not the same process)."""

from __future__ import annotations

import os
import time


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of `pid`, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every living descendant of `pid` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[0] != "Z":
                children.setdefault(st[1], []).append(int(name))
                starts[int(name)] = st[2]
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = starts[child]
                todo.append(child)
    return found


def alive(procs: dict[int, int]) -> dict[int, int]:
    """The processes of `procs` ({pid: start time}) still running (zombies and recycled pids excluded)."""
    out = {}
    for pid, start in procs.items():
        st = _stat(pid)
        if st is not None and st[0] != "Z" and st[2] == start:
            out[pid] = start
    return out


def wait_gone(procs: dict[int, int], timeout: float) -> dict[int, int]:
    """Waits up to `timeout` seconds for every process of `procs` to end; returns those still running."""
    deadline = time.time() + timeout
    left = alive(procs)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = alive(left)
    return left


def describe(procs: dict[int, int]) -> str:
    lines = []
    for pid in procs:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
        except OSError:
            cmd = "?"
        lines.append(f"{pid}: {cmd}")
    return "\n".join(lines)
