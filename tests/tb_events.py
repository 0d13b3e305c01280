"""Reads TensorBoard event files back as TensorBoard shows them (for tests; tensorboard is not installed).

The files are TFRecord-framed `Event` protos (tensorboardX's own proto). A `SessionLog.START` event at
step N (what `SummaryWriter(purge_step=N)` writes first) hides every earlier event at step >= N, the
rule TensorBoard applies when a job restarts from a checkpoint.
"""

from __future__ import annotations

import glob
import os
import struct

from tensorboardX.proto import event_pb2


def _records(path: str):
    with open(path, "rb") as f:
        while True:
            head = f.read(12)
            if len(head) < 12:
                return
            (length,) = struct.unpack("<Q", head[:8])
            data = f.read(length)
            f.read(4)
            if len(data) < length:
                return
            yield data


def scalar_events(logdir: str) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar event of `logdir`'s files in the order they were written, less
    those a later restart purged: a step that appears twice is one TensorBoard shows twice."""
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")), key=os.path.getmtime)
    events: list[tuple[str, int, float]] = []
    for path in files:
        for data in _records(path):
            ev = event_pb2.Event.FromString(data)
            if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                events = [e for e in events if e[1] < ev.step]
            for v in ev.summary.value:
                if v.HasField("simple_value"):
                    events.append((v.tag, int(ev.step), float(v.simple_value)))
    return events


def logged_steps(logdir: str, tag: str) -> list[int]:
    """The steps of `tag` as TensorBoard shows them, in order, repeats included."""
    return [step for t, step, _ in scalar_events(logdir) if t == tag]


def scalar_curves(logdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows them (see scalar_events; a repeated step keeps its last value)."""
    curves: dict[str, dict[int, float]] = {}
    for tag, step, value in scalar_events(logdir):
        curves.setdefault(tag, {})[step] = value
    return curves
