"""Evaluate a workdir's newest checkpoint: `python -m dalle2_jax.evaluate --workdir DIR`.

Prints the metrics as one JSON object on the last line of stdout, and writes them to
`DIR/reports/eval_<step>.json` and TensorBoard.
"""

from __future__ import annotations

import json

from absl import flags

from dalle2_jax.cli_util import exit_on_errors, run_program
from dalle2_jax.training.config import ConfigError


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "A training workdir.", flag_values=fv)
    flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the newest).", flag_values=fv)
    flags.DEFINE_bool("raw_params", False, "Evaluate the raw params instead of the EMA params.", flag_values=fv)
    flags.DEFINE_integer("max_examples", None, "Evaluate at most this many examples (default: config).",
                         flag_values=fv)
    flags.DEFINE_string("data_name", None, "Evaluate on this TFDS data set instead of the workdir's "
                        "config.data.name (e.g. an imported CLIP on your own data).", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the workdir's config.data.data_dir).",
                        flag_values=fv)
    flags.DEFINE_string("image_key", None, "Image feature of --data_name (default: the workdir's).", flag_values=fv)
    flags.DEFINE_string("text_key", None, "Caption feature of --data_name (default: the workdir's).", flag_values=fv)
    flags.DEFINE_multi_string("sampling", [], "KEY=VALUE: override a key of the workdir's config.sampling for this "
                              "evaluation (repeatable), e.g. --sampling steps=50 --sampling eta=1.0.",
                              flag_values=fv)
    flags.DEFINE_list("renoise_steps", [], "Decoder: timesteps t (comma-separated, e.g. 300,500,800) at which "
                      "to also noise each test image and sample it back, scored by the scene checker "
                      "(renoise_t<t>_* metrics; config.eval.renoise_steps), and the conditioning probe's "
                      "x0_mse_t<t>_* errors.", flag_values=fv)


def apply_sampling_overrides(config, overrides: list[str]) -> dict[str, str]:
    """Sets config.sampling[KEY] from each "KEY=VALUE", parsed as the existing value's type (bool: true/false,
    1/0); returns {KEY: VALUE text}. Raises ValueError naming the problem for a malformed item, an unknown key
    or a bad value."""
    applied = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ValueError(f"--sampling takes KEY=VALUE, got {item!r}")
        if "sampling" not in config or key not in config.sampling:
            known = ", ".join(sorted(config.sampling.keys())) if "sampling" in config else "none"
            raise ValueError(f"--sampling {key}: not a key of this workdir's config.sampling (keys: {known})")
        old = config.sampling[key]
        try:
            if isinstance(old, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                value = text.lower() in ("true", "1")
            elif isinstance(old, (int, float, str)):
                value = type(old)(text)
            else:
                raise ValueError(f"keys of type {type(old).__name__} cannot be overridden")
        except ValueError as e:
            raise ValueError(f"--sampling {key}={text}: {e}") from None
        config.sampling[key] = value
        applied[key] = text
    return applied


def evaluate_workdir(workdir: str, step: int | None = None, raw_params: bool = False,
                     max_examples: int | None = None, data_name: str | None = None,
                     data_dir: str | None = None, image_key: str | None = None, text_key: str | None = None,
                     sampling: list[str] | None = None, renoise_steps: list | None = None) -> dict:
    """Evaluates a workdir's checkpoint with its stage's evaluation (on its own data set, or `data_name` in
    `data_dir` with its `image_key` / `text_key`; `sampling`: "KEY=VALUE" overrides of config.sampling;
    `renoise_steps`: a decoder's eval.renoise_steps for this evaluation); returns the metrics dict."""
    import jax

    from dalle2_jax.data import pipeline
    from dalle2_jax.stages import get_stage_class
    from dalle2_jax import fileio
    from dalle2_jax.training import checkpoint as ckpt
    from dalle2_jax.training.metrics import MetricWriter
    from dalle2_jax.training.partitioning import make_mesh
    from dalle2_jax.training.trainer import evaluate_and_report

    workdir = fileio.resolve(workdir)
    config = ckpt.read_config(workdir)
    config.mesh.update(dict(data=-1, fsdp=1, tensor=1))  # evaluation shards the batch over every device
    if max_examples is not None:
        config.eval.max_examples = max_examples
    if data_name:
        config.data.name = data_name
    if data_dir:
        config.data.data_dir = data_dir
    if image_key:
        config.data.image_key = image_key
    if text_key:
        config.data.text_key = text_key
    try:
        overrides = apply_sampling_overrides(config, list(sampling or []))
    except ValueError as e:
        raise ConfigError("sampling", str(e)) from None
    renoise = []
    for t in renoise_steps or ():
        try:
            renoise.append(int(t))
        except ValueError:
            raise ConfigError("renoise_steps", f"timesteps are integers, got {t!r}") from None
    if renoise:
        if config.stage != "decoder":
            raise ConfigError("renoise_steps", f"only a decoder workdir has it (this one is a {config.stage})")
        bad = [t for t in renoise if not 0 < t < int(config.diffusion.num_steps)]
        if bad:
            raise ConfigError("renoise_steps", f"timesteps must be in (0, {config.diffusion.num_steps}), got {bad}")
        config.eval.renoise_steps = tuple(renoise)
    stage = get_stage_class(config.stage)(config, workdir)
    stage.setup_model()
    pipeline.prepare_dataset(config.data)
    mesh = make_mesh(config)
    _, params, info = ckpt.load_params(workdir, mesh, prefer_ema=not raw_params, step=step)

    class _Run:  # what evaluate_and_report needs
        pass

    run = _Run()
    run.stage, run.mesh, run.workdir = stage, mesh, workdir
    writer = MetricWriter(fileio.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
    extra, suffix = {}, ""
    if overrides:  # a report of its own, so the training run's eval_<step>.json and grids stay as they were
        extra = {"sampling_overrides": dict(sorted(overrides.items()))}
        suffix = "_" + "_".join(f"{k}{v}" for k, v in extra["sampling_overrides"].items())
    if renoise:
        extra["renoise_steps"] = renoise
        suffix += "_renoise" + "-".join(map(str, renoise))
    if raw_params:
        suffix += "_raw"
    result = evaluate_and_report(run, params, info["step"], info["params"], writer, suffix, extra)
    if writer is not None:
        writer.close()
    return result


def main(fv: flags.FlagValues) -> None:
    with exit_on_errors():
        result = evaluate_workdir(fv.workdir, fv.step, fv.raw_params, fv.max_examples, fv.data_name, fv.data_dir,
                                  fv.image_key, fv.text_key, fv.sampling, fv.renoise_steps)
    print(json.dumps(result, sort_keys=True), flush=True)


def run(argv: list[str] | None = None) -> None:
    run_program(__doc__, define_flags, main, argv, required=("workdir",))


if __name__ == "__main__":
    run()
