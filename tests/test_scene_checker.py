"""The pixel-level attribute checker (dalle2_jax/scene_checker.py): right on real renders, wrong when the
image and the scene disagree."""

import copy

import numpy as np
import pytest

from dalle2_jax import scene_checker as C
from dalle2_jax.data import scenes as S


@pytest.fixture(scope="module")
def test_scenes():
    return [S.scene_for_example(0, "test", i) for i in range(200)]


@pytest.mark.parametrize("resolution", [64, 256])
def test_real_renders_score_full_marks(test_scenes, resolution):
    scenes = test_scenes if resolution == 64 else test_scenes[:40]
    images = [S.render_scene(s, resolution) for s in scenes]
    acc = C.attribute_accuracy(images, scenes)
    for key in ("color_acc", "shape_acc", "size_acc", "relation_acc", "background_acc", "all_correct",
                "shape_acc_small", "shape_acc_large"):
        assert acc[key] == 1.0, (key, acc)
    assert acc["num_objects"] > len(scenes) and acc["num_two_object"] > 0
    if resolution == 64:
        assert acc["num_heldout_objects"] > 0 and acc["heldout_shape_acc"] == 1.0


def test_noisy_renders_still_pass(test_scenes):
    rng = np.random.default_rng(0)
    images = [np.clip(S.render_scene(s, 64) + rng.normal(0, 15, (64, 64, 3)), 0, 255).astype(np.uint8)
              for s in test_scenes]
    acc = C.attribute_accuracy(images, test_scenes)
    assert acc["color_acc"] >= 0.97 and acc["shape_acc"] >= 0.9, acc


def test_mismatched_images_fail(test_scenes):
    images = [S.render_scene(s, 64) for s in test_scenes]
    shifted = images[1:] + images[:1]  # each image checked against another scene
    acc = C.attribute_accuracy(shifted, test_scenes)
    assert acc["color_acc"] < 0.5 and acc["shape_acc"] < 0.3 and acc["all_correct"] < 0.1, acc
    blank = [np.full((64, 64, 3), S.BACKGROUNDS[s["background"]], np.uint8) for s in test_scenes]
    acc = C.attribute_accuracy(blank, test_scenes)
    assert acc["color_acc"] == 0.0 and acc["shape_acc"] == 0.0 and acc["background_acc"] == 1.0


def test_each_attribute_is_checked_on_its_own():
    scene = {"background": "white", "relation": "left of", "template": 0,
             "objects": [{"shape": "star", "color": "red", "size": "large", "center": (0.27, 0.5), "rotation": 5.0},
                         {"shape": "cross", "color": "blue", "size": "small", "center": (0.75, 0.45),
                          "rotation": 0.0}]}
    image = S.render_scene(scene, 64)
    v = C.check_image(image, scene)
    assert v["background"] and v["relation"] and all(o["color"] and o["shape"] and o["size"] for o in v["objects"])
    for shape in S.SHAPES:  # every other shape in the same place is recognised as not a star
        if shape == "star":
            continue
        other = copy.deepcopy(scene)
        other["objects"][0]["shape"] = shape
        o = C.check_image(S.render_scene(other, 64), scene)["objects"][0]
        assert o["color"] and not o["shape"] and o["found_shape"] == shape, (shape, o)
    swapped = copy.deepcopy(scene)
    swapped["objects"][0]["center"], swapped["objects"][1]["center"] = (0.75, 0.5), (0.27, 0.45)
    assert C.check_image(S.render_scene(swapped, 64), scene)["relation"] is False
    small = copy.deepcopy(scene)
    small["objects"][0]["size"] = "small"
    assert not C.check_image(S.render_scene(small, 64), scene)["objects"][0]["size"]
    green = copy.deepcopy(scene)
    green["objects"][1]["color"] = "green"
    o = C.check_image(S.render_scene(green, 64), scene)
    assert not o["objects"][1]["color"] and not o["objects"][1]["shape"] and o["relation"] is False
    assert not C.check_image(S.render_scene(dict(scene, background="black"), 64), scene)["background"]


def test_same_color_objects_are_assigned_by_shape():
    scene = {"background": "gray", "relation": "above", "template": 0,
             "objects": [{"shape": "circle", "color": "yellow", "size": "small", "center": (0.5, 0.25),
                          "rotation": 0.0},
                         {"shape": "square", "color": "yellow", "size": "large", "center": (0.45, 0.72),
                          "rotation": 0.0}]}
    v = C.check_image(S.render_scene(scene, 64), scene)
    assert v["relation"] and [o["shape"] for o in v["objects"]] == [True, True]
    assert [o["size"] for o in v["objects"]] == [True, True]
