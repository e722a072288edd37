"""The judge: ground-truth renders score ≥ 0.95; wrong attributes are caught."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meg.errors import InvalidInputError
from meg.models import judge
from meg.models.captions import caption_scene, parse_prompt
from meg.models.evaluate import ground_truth_fidelity, read_prompts
from meg.models.registry import MODELS_ROOT
from meg.models.world import Scenes, WorldConfig, render, sample_scenes


def test_judge_scores_ground_truth_renders_of_shipped_heldout_prompts() -> None:
    prompts = read_prompts(MODELS_ROOT / "meg-tiny" / "prompts" / "heldout.txt")[:80]
    report = ground_truth_fidelity(prompts, seed=3)
    assert report.fidelity >= 0.95
    assert all(v >= 0.9 for v in report.attribute_accuracy.values()), report.attribute_accuracy


def test_judge_on_renders_of_the_scenes_behind_captions() -> None:
    scenes = sample_scenes(60, 21, WorldConfig())
    rng = np.random.default_rng(2)
    specs = [caption_scene(scenes, i, rng)[1] for i in range(len(scenes))]
    images, _ = render(scenes)
    report = judge.score_prompts(specs, images)
    assert report.fidelity >= 0.95 and report.exact >= 0.85


def _image(prompt: str, seed: int = 0) -> torch.Tensor:
    scene = judge.scene_from_spec(parse_prompt(prompt), np.random.default_rng(seed))
    return render(scene)[0][0]


def test_wrong_attributes_lower_the_score() -> None:
    image = _image("a medium red circle at the top left on a gray background")
    found = judge.detect_objects(image)
    assert [(o.colour, o.shape, o.size, o.position) for o in found] == [("red", "circle", "medium", "top left")]
    assert judge.score_prompt(parse_prompt("a red circle at the top left"), found)["fidelity"] == 1.0
    assert judge.score_prompt(parse_prompt("a red square at the top left"), found)["fidelity"] == pytest.approx(2 / 3)
    assert judge.score_prompt(parse_prompt("a blue star at the bottom right"), found)["fidelity"] == 0.0
    two = judge.score_prompt(parse_prompt("a red circle at the top left and a green ring"), found)
    assert two["fidelity"] == pytest.approx(0.5) and not two["exact"]


def test_each_shape_is_told_apart() -> None:
    sizes = ("small", "large", "medium")
    cases = [(shape, sizes[k % 3]) for k, shape in enumerate(("circle", "square", "triangle", "star", "ring", "cross"))]
    rng = np.random.default_rng(0)
    scenes = [judge.scene_from_spec(parse_prompt(f"a {size} orange {shape} in the center"), rng) for shape, size in cases]
    batch = Scenes(**{k: torch.cat([getattr(s, k) for s in scenes]) for k in Scenes.__dataclass_fields__})
    for image, (shape, size) in zip(render(batch)[0], cases, strict=True):
        found = judge.detect_objects(image)
        assert [(o.shape, o.size) for o in found] == [(shape, size)]


def test_blank_image_has_no_objects_and_bad_input_raises() -> None:
    assert judge.detect_objects(torch.full((3, 128, 128), 0.5)) == []
    with pytest.raises(InvalidInputError, match="64"):
        judge.detect_objects(torch.zeros(3, 64, 64))
    with pytest.raises(InvalidInputError, match="no object"):
        judge.score_prompt(parse_prompt("hello"), [])


def test_frechet_distance() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = rng.normal(size=(400, 8))
    assert judge.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    near, far = judge.frechet_distance(a, b), judge.frechet_distance(a, b + 2.0)
    assert near < 0.5 and far == pytest.approx(near + 4 * 8, rel=0.1)
