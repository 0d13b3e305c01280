"""gs:// workdirs, data dirs and bundles, against a local GCS emulator (tests/fake_gcs.py) reached by the
real clients: gcsfs through etils.epath, tensorstore through orbax, array_record through grain."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import small_config


def test_fileio_round_trips_on_gcs(gcs_bucket, tmp_path):
    from dalle2_jax import fileio
    from dalle2_jax.text import ClipBpeTokenizer, load_tokenizer

    root = f"{gcs_bucket}/fileio"
    assert fileio.is_remote(root) and not fileio.is_remote(str(tmp_path))
    assert fileio.resolve(root + "/") == root and fileio.join(root, "a", "b.json") == root + "/a/b.json"
    fileio.write_json(fileio.join(root, "a", "b.json"), {"x": 1})
    fileio.write_bytes(fileio.join(root, "a", "c", "d.bin"), b"\x00\x01")
    assert fileio.read_json(fileio.join(root, "a", "b.json")) == {"x": 1}
    assert fileio.listdir(fileio.join(root, "a")) == ["b.json", "c"]
    assert fileio.walk_files(root) == ["a/b.json", "a/c/d.bin"]

    # remote -> local -> remote copies keep every byte; staged output lands only when the block completes
    fileio.copy_tree(root, str(tmp_path / "down"))
    assert (tmp_path / "down" / "a" / "c" / "d.bin").read_bytes() == b"\x00\x01"
    with fileio.staged_output(f"{gcs_bucket}/staged", last=("done",)) as local:
        with open(f"{local}/x.txt", "w") as f:
            f.write("hello")
        with open(f"{local}/done", "w") as f:
            f.write("")
        assert not fileio.exists(f"{gcs_bucket}/staged/x.txt")
    assert fileio.read_text(f"{gcs_bucket}/staged/x.txt") == "hello"
    with pytest.raises(RuntimeError):
        with fileio.staged_output(f"{gcs_bucket}/failed"):
            raise RuntimeError("the writer failed")
    assert not fileio.exists(f"{gcs_bucket}/failed")

    tok = ClipBpeTokenizer(context_length=12)
    tok.save(f"{root}/tokenizer")
    again = load_tokenizer(f"{root}/tokenizer")
    np.testing.assert_array_equal(again.encode("a red circle"), tok.encode("a red circle"))
    fileio.remove_tree(root)
    assert not fileio.exists(root)


@pytest.mark.slow  # 50-120 s: two trainer starts and the emulator's HTTP; the bundle test covers orbax on gs://
def test_train_and_resume_with_gcs_workdir_and_data_dir(gcs_bucket):
    """The tiny CLIP trains with its data dir and workdir in the bucket (the built-in set is built locally
    and copied up), checkpoints there, and a second start resumes from the bucket's checkpoint."""
    from dalle2_jax import fileio
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.trainer import train

    data_dir, workdir = f"{gcs_bucket}/tfds", f"{gcs_bucket}/clip_run"

    def config(steps):
        c = small_config(data_dir, total_steps=steps)
        c.data.num_train, c.data.num_test, c.eval.max_examples = 64, 16, 16
        return c

    train(config(2), workdir)
    files = fileio.walk_files(workdir)
    assert "config.json" in files and "tokenizer/tokenizer_meta.json" in files and "reports/eval_2.json" in files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files), files
    assert any(f.startswith("checkpoints/2/state/") for f in files)
    assert fileio.exists(f"{data_dir}/captioned_shapes/64_n64_t16/1.0.0/dataset_info.json")

    result = train(config(4), workdir)
    assert result["train"]["step"] == 4
    assert fileio.listdir(f"{workdir}/checkpoints") == ["2", "4"]
    _, params, info = ckpt.load_params(workdir)
    assert info["step"] == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_bundle_exported_to_and_loaded_from_gcs(gcs_bucket, tiny_bundle):
    """A bundle exported to the bucket (its CLIP and decoder) loads from it with every param equal to the
    same workdirs' stages in the local bundle, after its sha256 checks."""
    from dalle2_jax import fileio
    from dalle2_jax.inference.bundle import MANIFEST, export_bundle, load_bundle

    manifest = json.loads(open(f"{tiny_bundle}/{MANIFEST}").read())
    source = {s["kind"]: s["models"]["main"]["source"]["workdir"] for s in manifest["stages"]}
    out = f"{gcs_bucket}/bundles/tiny"
    export_bundle(out, clip=source["clip"], decoder=source["decoder"])
    assert fileio.exists(f"{out}/{MANIFEST}")

    remote, local = load_bundle(out), load_bundle(tiny_bundle)
    assert [s.name for s in remote.stages] == ["clip", "decoder"]
    for r in remote.stages:
        lo = local.get(r.kind)[0]
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(r.params), jax.device_get(lo.params))
    assert remote.get("clip")[0].stage.tokenizer.encode("a red circle").tolist() == \
        local.get("clip")[0].stage.tokenizer.encode("a red circle").tolist()


def test_a_workdir_some_processes_cannot_see_is_refused(tmp_path, monkeypatch):
    """With several processes, every one must see the config.json process 0 wrote; the ones that do not
    are named in a `workdir` error (the collectives are stubbed: process 1 reports it missing)."""
    from jax.experimental import multihost_utils

    from dalle2_jax.training import trainer
    from dalle2_jax.training.config import ConfigError

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    seen = {"all": [True, True]}
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.asarray(seen["all"]))
    trainer._check_workdir_shared(str(tmp_path))  # everyone sees it: no error
    seen["all"] = [True, False]
    with pytest.raises(ConfigError, match=r"workdir.*processes \[1\] do not see"):
        trainer._check_workdir_shared(str(tmp_path))
