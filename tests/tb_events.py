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


def scalar_curves(logdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over all event files of `logdir` in the order they were written, purged at
    restarts; a step logged twice after purging keeps its last value."""
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
    curves: dict[str, dict[int, float]] = {}
    for tag, step, value in events:
        curves.setdefault(tag, {})[step] = value
    return curves
