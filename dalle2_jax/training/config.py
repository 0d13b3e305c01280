"""Run configuration: the keys every stage shares, validation, and (de)serialisation.

Stage config files (configs/<stage>.py) start from `base_config()` and fill `model`, `data`, ...
`validate_config` runs before anything compiles; every error names the key and what would fix it.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A bad config value. `key` is the dotted config key, the message says what would fix it."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config.{key}: {message}")


def base_config() -> ml_collections.ConfigDict:
    """The run keys shared by every stage (see ../shared/DESIGN.md, 'Config keys')."""
    c = ml_collections.ConfigDict()
    c.stage = ""
    c.seed = 0
    c.batch_size = 128  # global, over all processes and devices
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 0  # 0 = only at the end
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    # steps whose loss or gradients are NaN/Inf are skipped; this many in a row stop the run (exit 1)
    c.max_consecutive_nonfinite = 20
    c.init_from = ""  # params-only start from another workdir of the same stage
    c.clip_workdir = ""  # the frozen CLIP (prior, decoder)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.schedule = "cosine"  # cosine | constant
    c.optimizer.final_lr_fraction = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0  # global-norm clip; 0 = off
    c.optimizer.ema_decay = 0.999  # 0 = no EMA
    c.optimizer.grad_accum_steps = 1  # microbatches per step (lax.scan); the batch is still batch_size
    c.optimizer.moments_dtype = "float32"  # float32 | bfloat16 (Adam's moments stored at half the memory)

    c.data = ml_collections.ConfigDict()
    c.data.name = "captioned_shapes"  # any TFDS name prepared as array_record in data_dir
    c.data.builder_config = "64"  # the built-in set's config (ignored for other data sets)
    c.data.data_dir = ""  # "" = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    c.data.image_key = "image_64"
    c.data.text_key = "caption"
    c.data.resolution = 64
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.num_train = 0  # built-in set only: 0 = the builder config's default size
    c.data.num_test = 0
    c.data.num_workers = 2  # grain worker processes (0 = in-process)
    c.data.read_threads = 2

    # a jax.profiler trace of steps start_step .. start_step + num_steps - 1 (num_steps 0 = off) into
    # <workdir>/tensorboard/plugins/profile (training/profiling.py)
    c.profile = ml_collections.ConfigDict({"start_step": 2, "num_steps": 0})

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    c.eval.max_examples = 0  # 0 = the whole eval split
    return c


RUN_KEYS = ("seed", "batch_size", "total_steps", "log_every", "eval_every", "checkpoint_every")


def clamp_short_run(config: ml_collections.ConfigDict) -> list[str]:
    """Fits a run shorter than its warm-up or intervals, in place, and says what changed (one sentence
    per key): a warm-up of total_steps or more becomes a tenth of the run, and log/eval/checkpoint
    intervals longer than the run become total_steps (evaluation and the last checkpoint still come at
    the end). `--config.total_steps=12` on its own is then a valid run."""
    total = int(config.total_steps)
    said = []
    if total <= 0:
        return said  # validate_config names the key
    opt = config.optimizer
    if int(opt.warmup_steps) >= total:
        warmup = total // 10
        said.append(f"optimizer.warmup_steps {opt.warmup_steps} -> {warmup} (a tenth of total_steps={total})")
        opt.warmup_steps = warmup
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if int(config[key]) > total:
            said.append(f"{key} {config[key]} -> {total}")
            config[key] = total
    return said


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks the shared keys, then the stage's own; raises ConfigError naming the key."""
    from dalle2_jax.stages import get_stage_class, STAGES  # local import: stages import training

    if not config.get("stage"):
        raise ConfigError("stage", f"is empty; set it to one of {sorted(STAGES)}")
    if config.stage not in STAGES:
        raise ConfigError("stage", f"unknown stage {config.stage!r}; known stages: {sorted(STAGES)}")
    for key in ("batch_size", "total_steps"):
        if int(config[key]) <= 0:
            raise ConfigError(key, f"must be a positive integer, got {config[key]}")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if int(config[key]) < 0:
            raise ConfigError(key, f"must be >= 0 (0 = off/only at the end), got {config[key]}")
    if config.log_every == 0:
        raise ConfigError("log_every", "must be >= 1")
    if int(config.get("max_consecutive_nonfinite", 1)) < 1:
        raise ConfigError("max_consecutive_nonfinite", f"must be >= 1, got {config.max_consecutive_nonfinite}")
    prof = config.get("profile") or {}
    if int(prof.get("num_steps", 0)) < 0:
        raise ConfigError("profile.num_steps", f"must be >= 0 (0 = no trace), got {prof.get('num_steps')}")
    if int(prof.get("num_steps", 0)) and int(prof.get("start_step", 0)) < 1:
        raise ConfigError("profile.start_step", f"must be >= 1 (2 or later skips the compiling first step), got "
                          f"{prof.get('start_step')}")
    if int(config.get("keep_checkpoints", 1)) < 1:
        raise ConfigError("keep_checkpoints", f"must be >= 1 (older ones are the fallback for a damaged "
                          f"newest checkpoint; 2 or more is wise), got {config.keep_checkpoints}")
    opt = config.optimizer
    if not opt.learning_rate > 0:
        raise ConfigError("optimizer.learning_rate", f"must be > 0, got {opt.learning_rate}")
    if opt.warmup_steps < 0 or opt.warmup_steps >= config.total_steps:
        raise ConfigError("optimizer.warmup_steps",
                          f"must be in [0, total_steps={config.total_steps}), got {opt.warmup_steps}")
    if opt.schedule not in ("cosine", "constant"):
        raise ConfigError("optimizer.schedule", f"unknown schedule {opt.schedule!r}; use 'cosine' or 'constant'")
    if not 0.0 <= opt.ema_decay < 1.0:
        raise ConfigError("optimizer.ema_decay", f"must be in [0, 1), got {opt.ema_decay}")
    if opt.grad_clip < 0:
        raise ConfigError("optimizer.grad_clip", f"must be >= 0 (0 = off), got {opt.grad_clip}")
    if int(opt.get("grad_accum_steps", 1)) < 1:
        raise ConfigError("optimizer.grad_accum_steps", f"must be >= 1, got {opt.grad_accum_steps}")
    if opt.get("moments_dtype", "float32") not in ("float32", "bfloat16"):
        raise ConfigError("optimizer.moments_dtype", f"unknown dtype {opt.moments_dtype!r}; use float32 or bfloat16")
    if not config.data.name:
        raise ConfigError("data.name", "is empty; name a TFDS data set prepared in config.data.data_dir "
                          "(e.g. captioned_shapes, or image_folder_captions/<name> from tools.build_folder)")
    if int(config.data.resolution) <= 0:
        raise ConfigError("data.resolution", f"must be positive, got {config.data.resolution}")
    validate_mesh(config, num_devices)
    get_stage_class(config.stage).validate(config)


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves config.mesh (data, fsdp, tensor; one may be -1 = the rest) against the device count."""
    names = ("data", "fsdp", "tensor")
    sizes = [int(config.mesh[n]) for n in names]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError("mesh", f"at most one axis may be -1, got {dict(zip(names, sizes))}")
    for n, s in zip(names, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{n}", f"must be a positive size or -1 (the rest), got {s}")
    known = 1
    for s in sizes:
        if s != -1:
            known *= s
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError("mesh", f"the fixed axes {dict(zip(names, sizes))} use {known} devices, which does "
                              f"not divide the {num_devices} available; change config.mesh")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ConfigError("mesh", f"{dict(zip(names, sizes))} needs {known} devices but {num_devices} are "
                          "available; set one axis to -1 or make the product equal the device count")
    return tuple(sizes)  # type: ignore[return-value]


def validate_mesh(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
    """Checks config.mesh against the devices and the global batch against the batch-sharding axes."""
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    data, fsdp, _ = mesh_shape(config, num_devices)
    if config.batch_size % (data * fsdp):
        raise ConfigError("batch_size", f"global batch {config.batch_size} is not divisible by the "
                          f"data-parallel size data*fsdp = {data * fsdp}; use a multiple of {data * fsdp}")
    accum = int(config.optimizer.get("grad_accum_steps", 1))
    if config.batch_size % (data * fsdp * accum):
        raise ConfigError("optimizer.grad_accum_steps", f"{accum} microbatches of the global batch "
                          f"{config.batch_size} do not divide evenly over data*fsdp = {data * fsdp} devices; "
                          f"make batch_size a multiple of {data * fsdp * accum}")


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as pretty JSON (what the workdir's config.json holds)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of config_to_json."""
    return ml_collections.ConfigDict(json.loads(text))
