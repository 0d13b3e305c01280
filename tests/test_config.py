"""Config validation: every bad value gets an error naming its key, before anything compiles."""

from __future__ import annotations

import pytest

from configs.clip import get_config
from dalle2_jax.training.config import ConfigError, clamp_short_run, validate_config


def _cfg(**kw):
    c = get_config("tiny")
    c.update_from_flattened_dict(kw)
    return c


@pytest.mark.parametrize("overrides, key, hint", [
    ({"stage": "nope"}, "stage", "known stages"),
    ({"model.vision.stem": "patch", "model.vision.patch_size": 7}, "model.vision.patch_size", "divisible"),
    ({"model.vision.image_size": 32}, "model.vision.image_size", "data.resolution"),
    ({"model.text.heads": 3}, "model.text.heads", "divisible"),
    ({"model.vision.act": "swish2"}, "model.vision.act", "unknown activation"),
    ({"batch_size": 0}, "batch_size", "positive"),
    ({"optimizer.warmup_steps": 5000}, "optimizer.warmup_steps", "total_steps"),
    ({"optimizer.ema_decay": 1.5}, "optimizer.ema_decay", "[0, 1)"),
    ({"mesh.data": 3}, "mesh", "devices"),
    ({"mesh.fsdp": 0}, "mesh.fsdp", "positive"),
    ({"model.remat": "some"}, "model.remat", "remat"),
    ({"profile.num_steps": 2, "profile.start_step": 0}, "profile.start_step", "compiling first step"),
    ({"max_consecutive_nonfinite": 0}, "max_consecutive_nonfinite", ">= 1"),
])
def test_bad_config_names_the_key(overrides, key, hint):
    with pytest.raises(ConfigError) as e:
        validate_config(_cfg(**overrides), num_devices=1)
    assert e.value.key == key
    assert str(e.value).startswith(f"config.{key}:") and hint in str(e.value)


def test_batch_must_divide_over_the_data_axes():
    with pytest.raises(ConfigError, match="batch_size.*divisible"):
        validate_config(_cfg(batch_size=100, **{"mesh.data": 8}), num_devices=8)
    validate_config(_cfg(batch_size=128, **{"mesh.data": 2, "mesh.fsdp": 4}), num_devices=8)


def test_every_variant_validates():
    for name in ("tiny", "base"):
        validate_config(get_config(name), num_devices=1)
    with pytest.raises(ValueError, match="unknown clip config"):
        get_config("huge")


def test_paper_config_asks_for_a_data_set():
    with pytest.raises(ConfigError, match="config.data.name: is empty"):
        validate_config(get_config("paper"), num_devices=1)


def test_a_short_run_clamps_its_warmup_and_intervals():
    c = _cfg(total_steps=12)
    said = clamp_short_run(c)
    assert c.optimizer.warmup_steps == 1 and c.log_every == 12 and c.eval_every == 12 and c.checkpoint_every == 12
    assert any(s.startswith("optimizer.warmup_steps 100 -> 1") for s in said), said
    validate_config(c, num_devices=1)
    long = _cfg(total_steps=5000)
    assert clamp_short_run(long) == [] and long.optimizer.warmup_steps == get_config("tiny").optimizer.warmup_steps


def test_the_printed_rate_is_smoothed_over_a_window():
    from dalle2_jax.training.metrics import RateWindow

    pace = RateWindow(window=4)
    assert pace.add(0.0, 0) == 0.0
    for i in range(1, 5):
        rate = pace.add(float(i), i * 10)  # 10 steps/s
    assert rate == 10.0
    rate = pace.add(14.0, 50)  # one interval held a 9 s pause (a checkpoint, an evaluation)
    assert rate == 40 / 13  # the window's pace, not this interval's 1 step/s
    for i in range(5):
        rate = pace.add(15.0 + i, 60 + 10 * i)
    assert rate == 10.0  # the pause has left the window
