"""Region-aware partition and feathered stitching (meg.split.regions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meg.errors import InvalidInputError
from meg.models.world import render, sample_scenes
from meg.split import regions
from meg.split.regions import grid_patches, partition_latent, seam_ratio, stitch


def _scenes_hr(n: int = 6, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = render(sample_scenes(n, 11), size=size)
    return images, masks


def test_grid_patches_cover_the_image_once_by_their_cores() -> None:
    patches = grid_patches(50, 37, grid=4, margin=3)
    cover = torch.zeros(50, 37, dtype=torch.int64)
    for p in patches:
        cover[p.core.top : p.core.bottom, p.core.left : p.core.right] += 1
        assert p.padded.top == max(0, p.core.top - 3) and p.padded.right == min(37, p.core.right + 3)
    assert bool((cover == 1).all())
    assert [p.cell for p in patches] == list(range(16))


@pytest.mark.parametrize("margin", [0, 2, 8])
def test_stitching_ground_truth_patches_reproduces_the_image(margin: int) -> None:
    images, _ = _scenes_hr(3, 128)
    patches = grid_patches(128, 128, grid=4, margin=margin)
    out = stitch([regions.crop(images, p.padded) for p in patches], patches, 128, 128)
    assert torch.allclose(out, images, atol=1e-6)


def test_feather_windows_sum_to_one_everywhere() -> None:
    patches = grid_patches(64, 64, grid=4, margin=4)
    total = torch.zeros(64, 64)
    for p in patches:
        total[p.padded.top : p.padded.bottom, p.padded.left : p.padded.right] += regions.feather_window(p, 64, 64)
    assert torch.allclose(total, torch.ones(64, 64), atol=1e-6)


def test_upscaled_layout_stitches_patches_upscaled_on_their_own() -> None:
    # Light SR stand-in: each LR patch upscaled ×2 on its own, placed by the scaled layout.
    images, _ = _scenes_hr(2, 128)
    lr = F.interpolate(images, scale_factor=0.5, mode="area")
    patches = grid_patches(64, 64, grid=4, margin=4)
    ups = [F.interpolate(regions.crop(lr, p.padded), scale_factor=2, mode="bicubic") for p in patches]
    out = stitch(ups, [p.scaled(2) for p in patches], 128, 128)
    whole = F.interpolate(lr, scale_factor=2, mode="bicubic")
    # away from the image border the per-patch result equals the whole-image result
    assert (out - whole)[..., 8:-8, 8:-8].abs().max() < 0.02


def test_stitched_ground_truth_has_no_seams() -> None:
    # Edges in this world are sparse (a checker or square edge may fall on a cell border),
    # so the measure of a stitch is compared with the same measure of the image itself.
    # Neighbouring patches from two different SR models disagree: each patch gets its own
    # brightness offset. A hard stitch (margin 0) shows the steps, feathering spreads them.
    images, _ = _scenes_hr(16, 256)
    reference = seam_ratio(images)
    gen = torch.Generator().manual_seed(0)
    offsets = (torch.rand(16, generator=gen) - 0.5) * 0.06

    def stitched(margin: int, disagree: bool) -> torch.Tensor:
        patches = grid_patches(256, 256, grid=4, margin=margin)
        crops = [regions.crop(images, p.padded) + (offsets[p.cell] if disagree else 0.0) for p in patches]
        return stitch(crops, patches, 256, 256)

    assert seam_ratio(stitched(8, disagree=False)) == pytest.approx(reference, rel=1e-4)
    assert abs(seam_ratio(stitched(16, disagree=True)) / reference - 1.0) < 0.10
    assert seam_ratio(stitched(0, disagree=True)) / reference > 1.10


def test_partition_ranks_cells_by_variance_and_takes_the_top_fraction() -> None:
    latents = torch.zeros(2, 4, 16, 16)
    gen = torch.Generator().manual_seed(0)
    # cell 5 (row 1, col 1) and cell 14 (row 3, col 2) carry structure; cell 14 more
    latents[:, :, 4:8, 4:8] = torch.randn(2, 4, 4, 4, generator=gen)
    latents[:, :, 12:16, 8:12] = 3 * torch.randn(2, 4, 4, 4, generator=gen)
    part = partition_latent(latents, grid=4, foreground_fraction=0.125)
    assert part.foreground.shape == (2, 4, 4) and int(part.foreground[0].sum()) == 2
    assert part.foreground_cells(0) == [14, 5]
    assert part.background_cells(1) == [c for c in range(16) if c not in (5, 14)]
    # variance is invariant to a constant offset per cell
    shifted = partition_latent(latents + 7.0, grid=4, foreground_fraction=0.125)
    assert torch.equal(shifted.foreground, part.foreground)


@pytest.mark.parametrize(("gamma", "count"), [(0.0, 0), (0.25, 4), (0.5, 8), (1.0, 16), (0.03, 0), (0.04, 1)])
def test_foreground_count(gamma: float, count: int) -> None:
    part = partition_latent(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), foreground_fraction=gamma)
    assert int(part.foreground.sum()) == count == regions.foreground_count(gamma, 16)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_gamma_outside_the_unit_interval_is_rejected(gamma: float) -> None:
    with pytest.raises(InvalidInputError, match="gamma"):
        partition_latent(torch.zeros(1, 4, 16, 16), foreground_fraction=gamma)


def test_bad_shapes_and_margins_are_rejected() -> None:
    with pytest.raises(InvalidInputError, match="latents"):
        partition_latent(torch.zeros(4, 16, 16))
    with pytest.raises(InvalidInputError, match="grid"):
        partition_latent(torch.zeros(1, 4, 3, 3), grid=4)
    with pytest.raises(InvalidInputError, match="margin"):
        grid_patches(32, 32, grid=4, margin=9)
    patches = grid_patches(32, 32, grid=4, margin=2)
    with pytest.raises(InvalidInputError, match="uncovered"):
        stitch([torch.zeros(1, 3, p.padded.height, p.padded.width) for p in patches[:-1]], patches[:-1], 32, 32)
    with pytest.raises(InvalidInputError, match="shape"):
        stitch([torch.zeros(1, 3, 5, 5) for _ in patches], patches, 32, 32)


def test_cell_mask_and_iou() -> None:
    fg = torch.zeros(1, 4, 4, dtype=torch.bool)
    fg[0, 0, 0] = True
    mask = regions.cell_mask(fg, 64, 64)
    assert int(mask.sum()) == 16 * 16 and bool(mask[0, :16, :16].all())
    target = torch.zeros(1, 64, 64, dtype=torch.bool)
    target[0, :16, :32] = True
    assert regions.mask_iou(mask, target).item() == pytest.approx(0.5)
    assert regions.mask_iou(torch.zeros_like(mask), torch.zeros_like(mask)).item() == 1.0


def test_partition_of_encoded_scenes_finds_the_objects() -> None:
    # Without a trained VAE: a ×8 average-pooled image is a crude latent whose high-variance
    # cells still hold the objects (saturated shapes over low-contrast textures).
    images, masks = render(sample_scenes(16, 3, n_objects=1))
    latents = F.avg_pool2d(images, 8)
    part = partition_latent(latents, foreground_fraction=0.25)
    hit = [bool((regions.cell_mask(part.foreground[i : i + 1], 128, 128)[0] & masks[i].any(0)).any()) for i in range(16)]
    assert sum(hit) >= 14
