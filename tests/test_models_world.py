"""The procedural world: deterministic scenes, held-out pairs, rendering and masks."""

from __future__ import annotations

import pytest
import torch

from meg.errors import InvalidInputError
from meg.models.world import (
    HELDOUT_PAIRS,
    IMAGE_SIZE,
    OBJECT_COLOURS,
    SHAPES,
    WorldConfig,
    render,
    sample_scenes,
    shape_mask,
    shape_masks,
)


def _pairs(scenes) -> set[tuple[str, str]]:
    return {(o["colour"], o["shape"]) for i in range(len(scenes)) for o in scenes.objects(i)}


def test_same_seed_same_scenes_other_seed_other_scenes() -> None:
    a, b, c = sample_scenes(20, 3), sample_scenes(20, 3), sample_scenes(20, 4)
    for key, value in a.to_dict().items():
        assert torch.equal(value, b.to_dict()[key]), key
    assert not torch.equal(a.cx_px, c.cx_px)


def test_training_scenes_avoid_heldout_pairs_and_heldout_scenes_use_them() -> None:
    train = sample_scenes(300, 0)
    assert not _pairs(train) & HELDOUT_PAIRS
    held = sample_scenes(50, 1, WorldConfig(heldout=True))
    for i in range(len(held)):
        assert any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in held.objects(i))


def test_scene_structure() -> None:
    scenes = sample_scenes(200, 5)
    assert set(scenes.n_objects.tolist()) == {1, 2, 3}
    for i in range(len(scenes)):
        objs = scenes.objects(i)
        assert len({o["position"] for o in objs}) == len(objs)  # distinct cells
        assert len({o["colour"] for o in objs}) == len(objs)
        if len(objs) > 1:
            assert all(o["size"] != "large" for o in objs)


def test_render_masks_and_colours() -> None:
    scenes = sample_scenes(6, 2)
    images, masks = render(scenes)
    assert images.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE) and masks.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.min() >= 0 and images.max() <= 1
    palette = torch.tensor(list(OBJECT_COLOURS.values()))
    for i in range(6):
        for j in range(3):
            if j < int(scenes.n_objects[i]):
                mask = masks[i, j]
                assert mask.sum() > 40
                mean = images[i][:, mask].mean(dim=1)
                assert torch.allclose(mean, palette[int(scenes.colour[i, j])], atol=0.05)
            else:
                assert masks[i, j].sum() == 0


def test_bad_counts_raise() -> None:
    with pytest.raises(InvalidInputError, match="0"):
        sample_scenes(0, 1)
    with pytest.raises(InvalidInputError, match="7"):
        sample_scenes(3, 1, n_objects=7)


def test_batched_render_equals_render_of_each_scene() -> None:
    # render groups rows by texture and by shape: every row must still get its own
    scenes = sample_scenes(24, 5)
    images, masks = render(scenes)
    for i in (0, 7, 13, 23):
        one_image, one_mask = render(scenes.select(slice(i, i + 1)))
        assert torch.equal(images[i], one_image[0]) and torch.equal(masks[i], one_mask[0])


def test_shape_mask_is_each_shape_of_shape_masks() -> None:
    coords = torch.arange(-12, 12, dtype=torch.float32) + 0.5
    dy, dx = torch.meshgrid(coords, coords, indexing="ij")
    r = torch.tensor(10.0)
    stacked = shape_masks(dx, dy, r)
    areas = []
    for k in range(len(SHAPES)):
        single = shape_mask(k, dx, dy, r)
        assert torch.equal(single, stacked[k])
        areas.append(int(single.sum()))
    assert len(set(areas)) == len(SHAPES)  # six different shapes
