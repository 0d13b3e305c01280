"""Multi-host training: global batches independent of the process count, jax.distributed start-up, and a
2-process CPU run (jax.distributed over gloo) that trains, checkpoints and resumes exactly like one process.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import small_config

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


# --- data: the k-th global batch is the same for any process count ------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(shapes_data_dir, tmp_path_factory) -> str:
    from dalle2_jax.data import pipeline
    from dalle2_jax.text import BpeTokenizer

    cfg = small_config(shapes_data_dir)
    d = str(tmp_path_factory.mktemp("tok"))
    BpeTokenizer.train(pipeline.all_captions(cfg.data, "train"), 512, 24).save(d)
    return d


def _process_batches(make, global_batch: int, process_count: int, n: int) -> list[list[dict]]:
    """[process][k] -> process p's k-th local batch of `make(local_batch_size, p, P)`."""
    out = []
    for p in range(process_count):
        it = iter(make(global_batch // process_count, p, process_count))
        out.append([next(it) for _ in range(n)])
    return out


def _assert_slices_make_the_global_batches(make, global_batch: int, n: int, keys: tuple[str, ...]) -> None:
    (whole,) = _process_batches(make, global_batch, 1, n)
    for count in (2, 4):
        parts = _process_batches(make, global_batch, count, n)
        for k in range(n):
            for key in keys:
                joined = np.concatenate([parts[p][k][key] for p in range(count)])
                np.testing.assert_array_equal(joined, whole[k][key], err_msg=f"{count} processes, batch {k}, {key}")


def test_image_text_batches_do_not_depend_on_the_process_count(shapes_data_dir, tokenizer_dir):
    """Process p's k-th batch is rows [p*b, (p+1)*b) of the 1-process k-th batch, past the first epoch too
    (256 records = 32 global batches of 8; 34 batches read)."""
    from dalle2_jax.data.pipeline import image_text_pipeline

    cfg = small_config(shapes_data_dir)

    def make(b, p, count):
        return image_text_pipeline(cfg.data, "train", tokenizer_dir=tokenizer_dir, local_batch_size=b, seed=0,
                                   process_index=p, process_count=count)

    _assert_slices_make_the_global_batches(make, 8, 34, ("image", "tokens"))


def test_upsampler_crops_and_degradations_do_not_depend_on_the_process_count(shapes_256_data_dir):
    """The random map (BSR degradation, crop offsets) draws each record's generator from its global
    position, so a process's slice is corrupted exactly as in the 1-process batch."""
    from conftest import small_upsampler_config
    from dalle2_jax.data.pipeline import upsampler_pipeline

    cfg = small_upsampler_config(shapes_256_data_dir)

    def make(b, p, count):
        return upsampler_pipeline(cfg.data, "train", local_batch_size=b, seed=3, degradation="bsr",
                                  process_index=p, process_count=count)

    _assert_slices_make_the_global_batches(make, 4, 3, ("high", "low"))


def test_shard_batches_gives_every_process_as_many_batches_and_resumes():
    import grain

    from dalle2_jax.data.pipeline import shard_batches

    ds = grain.MapDataset.range(22)  # 11 batches of 2: process 0 of 3 would get a 4th batch if not cut
    per_process = [list(shard_batches(ds, 2, p, 3, batch_fn=np.stack)) for p in range(3)]
    assert [len(b) for b in per_process] == [3, 3, 3]
    np.testing.assert_array_equal(np.concatenate([per_process[p][1] for p in range(3)]), np.arange(6, 12))
    # the iterator state restores this process's position
    it = iter(shard_batches(ds.repeat(None), 2, 1, 3, batch_fn=np.stack))
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    again = iter(shard_batches(ds.repeat(None), 2, 1, 3, batch_fn=np.stack))
    again.set_state(state)
    got = [next(again) for _ in range(4)]
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    np.testing.assert_array_equal(expected[0], [8, 9])  # global batch 1 = records 6..11; process 1's rows


# --- jax.distributed start-up ---------------------------------------------------------------------------
_CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
                 "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
                 "MEGASCALE_NUM_SLICES", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "DALLE2_COORDINATOR",
                 "DALLE2_NUM_PROCESSES", "DALLE2_PROCESS_ID", "DALLE2_DISTRIBUTED_AUTO")


def test_cluster_detection_needs_more_than_one_process(monkeypatch):
    from dalle2_jax.distributed import detected_cluster

    for v in _CLUSTER_VARS:
        monkeypatch.delenv(v, raising=False)
    assert detected_cluster() is None
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[001-002]", SLURM_PROCID="0", SLURM_LOCALID="0")
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert detected_cluster() is None  # a one-task job is one process
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert detected_cluster() == "slurm"
    for k in (*slurm, "SLURM_NTASKS"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single TPU VM (or an AOT compile)
    assert detected_cluster() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-w-0,t1k-w-1")
    assert detected_cluster() == "tpu"


def test_maybe_initialize_stays_single_process_without_a_cluster(monkeypatch):
    from dalle2_jax.distributed import maybe_initialize

    for v in _CLUSTER_VARS:
        monkeypatch.delenv(v, raising=False)
    assert maybe_initialize() is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
    assert maybe_initialize(distributed=False) is False  # --nodistributed wins over a detected cluster
    monkeypatch.setenv("DALLE2_DISTRIBUTED_AUTO", "0")
    assert maybe_initialize() is False
    monkeypatch.setenv("DALLE2_COORDINATOR", "127.0.0.1:1")
    with pytest.raises(ValueError, match="--num_processes and --process_id"):
        maybe_initialize()  # checked before anything is started
    assert not jax.distributed.is_initialized()


def test_train_flags_override_the_environment_and_bad_usage_exits_2(monkeypatch, tmp_path, capsys):
    """--coordinator_address without a process count or id is bad usage (exit 2, nothing started); the
    flags win over DALLE2_* variables (here a complete environment is overridden by an incomplete flag)."""
    from dalle2_jax.train import run

    for v in _CLUSTER_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("DALLE2_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("DALLE2_NUM_PROCESSES", "2")
    config = os.path.join(ROOT, "configs", "clip.py") + ":tiny"
    with pytest.raises(SystemExit) as e:
        run(["train", "--config", config, "--workdir", str(tmp_path), "--coordinator_address=127.0.0.1:2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:2" in err and "--process_id" in err
    assert not jax.distributed.is_initialized() and not os.listdir(tmp_path)


# --- 2 processes x 2 CPU devices against 1 process x 4 devices, through the real trainer ------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARS and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _start_job(name: str, root: str, workdir: str, data_dir: str, steps: list[int], processes: int,
               devices_per_process: int) -> tuple[list, list[str], list[str]]:
    """Starts `processes` workers (tests/multihost_worker.py); returns (Popen objects, log files, output files)."""
    port = _free_port()
    procs, logs, outs = [], [], []
    for p in range(processes):
        out, log = os.path.join(root, f"{name}_{p}.json"), os.path.join(root, f"{name}_{p}.log")
        cmd = [sys.executable, os.path.join(TESTS, "multihost_worker.py"), "--data_dir", data_dir, "--workdir",
               workdir, "--out", out, "--num_cpu_devices", str(devices_per_process),
               "--total_steps", *map(str, steps)]
        if processes > 1:
            cmd += ["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(processes), "--process_id", str(p)]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(os.path.join(root, "jax_cache")), stdout=f,
                                          stderr=subprocess.STDOUT))
        logs.append(log)
        outs.append(out)
    return procs, logs, outs


def _wait_job(name: str, procs: list, logs: list[str], outs: list[str], timeout: float = 900) -> list[dict]:
    """Waits for all workers; on a failure or a timeout kills the rest and fails with their logs. Returns
    each process's output and its stdout."""
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed or time.time() > deadline:
                why = f"process {failed[0]} exited {procs[failed[0]].returncode}" if failed else "timed out"
                tails = "\n".join(f"--- {log}\n" + open(log).read()[-3000:] for log in logs)
                pytest.fail(f"{name}: {why}\n{tails}")
            time.sleep(0.5)
        codes = [p.returncode for p in procs]
        if any(codes):
            tails = "\n".join(f"--- {log}\n" + open(log).read()[-3000:] for log in logs)
            pytest.fail(f"{name}: exit codes {codes}\n{tails}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for out, log in zip(outs, logs):
        with open(out) as f:
            results.append(dict(json.load(f), stdout=open(log).read()))
    return results


def _run_job(name: str, root: str, workdir: str, data_dir: str, steps: list[int], processes: int,
             devices_per_process: int, timeout: float = 900) -> list[dict]:
    """Starts the workers (see _start_job) and waits for all of them (see _wait_job)."""
    return _wait_job(name, *_start_job(name, root, workdir, data_dir, steps, processes, devices_per_process),
                     timeout=timeout)


def _event_files(workdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))


def _logged(workdir: str, tag: str = "train/loss") -> dict[int, float]:
    """{step: value} of a TensorBoard scalar over all the workdir's event files."""
    from tb_events import scalar_curves

    return scalar_curves(os.path.join(workdir, "tensorboard")).get(tag, {})


@pytest.fixture(scope="module")
def multihost_runs(shapes_data_dir, tmp_path_factory) -> dict:
    """2 processes x 2 devices train the small CLIP for 4 steps into one workdir; 1 process x 4 devices
    trains the same config for 4 steps, then resumes it to 6 (in the same process), in another; then the
    2-process job is started again with total_steps=6 and resumes from step 4. One after the other, to
    keep the load of a small machine down."""
    root = str(tmp_path_factory.mktemp("multihost"))
    multi, single = os.path.join(root, "two_processes"), os.path.join(root, "one_process")
    t0 = time.time()
    first = _run_job("two_4", root, multi, shapes_data_dir, [4], 2, 2)
    after_first = {"event_files": _event_files(multi), "steps": sorted(os.listdir(os.path.join(multi, "checkpoints")))}
    (reference,) = _run_job("one_4_6", root, single, shapes_data_dir, [4, 6], 1, 4)
    second = _run_job("two_6", root, multi, shapes_data_dir, [6], 2, 2)
    print(f"multihost runs took {time.time() - t0:.0f}s")
    return dict(multi=multi, single=single, first=first, second=second, reference=reference,
                after_first=after_first)


def _params(workdir: str, step: int, ema: bool = False) -> list[np.ndarray]:
    from dalle2_jax.training.checkpoint import load_params

    _, params, info = load_params(workdir, prefer_ema=ema, step=step)
    assert info == {"step": step, "params": "ema" if ema else "raw"}
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]


def _assert_params_close(a: str, b: str, step: int) -> None:
    for ema in (False, True):
        pa, pb = _params(a, step, ema), _params(b, step, ema)
        assert len(pa) == len(pb) and len(pa) > 10
        for x, y in zip(pa, pb):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(multihost_runs):
    r = multihost_runs
    multi, single = r["multi"], r["single"]
    assert [(o["process_index"], o["process_count"], o["local_devices"], o["devices"]) for o in r["first"]] == [
        (0, 2, 2, 4), (1, 2, 2, 4)]
    assert (r["reference"]["process_count"], r["reference"]["devices"]) == (1, 4)
    assert "jax.distributed: 2 processes, 2 local devices, 4 global devices" in r["first"][0]["stdout"]
    assert "jax.distributed" not in r["first"][1]["stdout"]  # printed by process 0 only
    # orbax checkpoints at 2 and 4 that both processes wrote into; process 0 alone wrote config/TensorBoard
    assert r["after_first"]["steps"] == ["2", "4"]
    for step in (2, 4):
        d = os.path.join(multi, "checkpoints", str(step))
        for p in range(2):
            assert os.path.exists(os.path.join(d, "data", f"process_{p}-of-2.json"))
            assert os.path.exists(os.path.join(d, "state", "array_metadatas", f"process_{p}"))
        with open(os.path.join(d, "data", "process_1-of-2.json")) as f:
            assert json.load(f)["next_index"] == step  # each process read `step` local batches
    assert os.path.exists(os.path.join(multi, "config.json"))
    assert len(r["after_first"]["event_files"]) == 1
    assert os.path.exists(os.path.join(multi, "reports", "eval_4.json"))
    # the same steps: the same losses and params
    logged_multi, logged_single = _logged(multi), _logged(single)
    assert sorted(logged_multi) == [2, 4, 6] and sorted(logged_single) == [2, 4, 6]
    np.testing.assert_allclose([logged_multi[s] for s in (2, 4)], [logged_single[s] for s in (2, 4)], rtol=1e-5)
    first = [o["results"][0] for o in r["first"]]
    assert first[0]["train"]["loss"] == first[1]["train"]["loss"]
    np.testing.assert_allclose(first[0]["train"]["loss"], r["reference"]["results"][0]["train"]["loss"], rtol=1e-5)
    _assert_params_close(multi, single, 4)
    # the final evaluation ran on both processes on the whole test split, with the same result
    ev = [f["eval"] for f in first]
    assert ev[0] == ev[1] and ev[0]["step"] == 4 and ev[0]["num_examples"] == 64
    assert ev[0].keys() == r["reference"]["results"][0]["eval"].keys()


@pytest.mark.slow
def test_two_processes_resume_exactly_like_one(multihost_runs):
    r = multihost_runs
    multi, single = r["multi"], r["single"]
    for o in r["second"]:
        assert "resuming from step 4" in o["stdout"]
        assert o["results"][0]["train"]["step"] == 6
    for p in range(2):  # both grain iterators went on from where they stopped: 4 + 2 batches read
        with open(os.path.join(multi, "checkpoints", "6", "data", f"process_{p}-of-2.json")) as f:
            assert json.load(f)["next_index"] == 6
    assert len(_event_files(multi)) == 2  # one per launch, process 0 only
    logged_multi, logged_single = _logged(multi), _logged(single)
    np.testing.assert_allclose(logged_multi[6], logged_single[6], rtol=1e-5)
    _assert_params_close(multi, single, 6)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(shapes_data_dir, tmp_path):
    """JAX's preemption service: a SIGTERM to process 1 alone reaches process 0 through the coordination
    service; both stop at the same sync step, save it together (exit 0), and the rerun resumes there."""
    import signal

    root, workdir = str(tmp_path), str(tmp_path / "w")
    procs, logs, outs = _start_job("pre", root, workdir, shapes_data_dir, [200], 2, 2)
    deadline = time.time() + 600
    while "step 4/200" not in open(logs[0]).read():
        assert time.time() < deadline and all(p.poll() is None for p in procs), open(logs[0]).read()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    first = _wait_job("pre", procs, logs, outs)
    saved = [o["results"][0]["step"] for o in first]
    assert all(o["results"][0]["preempted"] for o in first) and saved[0] == saved[1] < 200, saved
    assert f"received: saved checkpoint {saved[0]} synchronously" in first[0]["stdout"]
    for p in range(2):
        with open(os.path.join(workdir, "checkpoints", str(saved[0]), "data", f"process_{p}-of-2.json")) as f:
            assert json.load(f)["next_index"] == saved[0]
    second = _run_job("pre_resumed", root, workdir, shapes_data_dir, [saved[0] + 2], 2, 2)
    assert all(f"resuming from step {saved[0]}" in o["stdout"] for o in second)
    assert [o["results"][0]["step"] for o in second] == [saved[0] + 2] * 2
