"""Region-aware partition of a latent and feathered stitching of upscaled patches (Hybrid SR).

The edge ranks the cells of a grid over the *latent* by spatial variance; the top fraction
γ is foreground, upscaled by diffusion SR on the edge, the rest is background, upscaled by
a light SR model on the device (Hybrid SR, Yi et al., §III-A1: 4×4 grid, γ = 0.25). Each
cell is cut from the decoded image with an overlap margin, upscaled on its own, and the
device puts the image back together by feathered overlap-add: every patch is weighted by a
window that ramps linearly across the overlap with its neighbours, and the weighted sum is
divided by the sum of weights, so two neighbours cross-fade over 2·margin pixels and no
seam appears where the two SR models disagree.

Everything here is a pure function of tensors and integers (no I/O, no randomness):

- `grid_patches(height, width, grid, margin)` → the cells as `Patch`es (core box and box
  with margin, in pixels), the same layout for a latent and for its image.
- `partition_latent(latents, grid, foreground_fraction)` → per-cell variance, ranking and
  foreground mask.
- `crop`, `feather_window`, `stitch` → cut patches out, and put upscaled patches back.
- `upscale_patches` → the whole hybrid step with the two upscalers passed in.
- `cell_mask`, `mask_iou`, `seam_ratio` → the measures of the partition and of the stitch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from meg.errors import InvalidInputError

__all__ = [
    "Box",
    "LatentPartition",
    "Patch",
    "cell_mask",
    "crop",
    "feather_window",
    "foreground_count",
    "grid_edges",
    "grid_patches",
    "mask_iou",
    "partition_latent",
    "seam_ratio",
    "stitch",
    "upscale_patches",
]


@dataclass(frozen=True)
class Box:
    """A pixel rectangle [top, bottom) × [left, right)."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    def scaled(self, factor: int) -> Box:
        """The same rectangle in an image `factor` times larger."""
        return Box(self.top * factor, self.left * factor, self.bottom * factor, self.right * factor)


@dataclass(frozen=True)
class Patch:
    """One grid cell: its index (row-major), its core box and its box with the overlap margin
    (clipped to the image)."""

    cell: int
    core: Box
    padded: Box

    def scaled(self, factor: int) -> Patch:
        return Patch(self.cell, self.core.scaled(factor), self.padded.scaled(factor))


def grid_edges(size: int, grid: int) -> list[int]:
    """Cell boundaries along one side: grid + 1 integers from 0 to size (floor(i·size/grid))."""
    if grid < 1:
        raise InvalidInputError(f"grid must be >= 1, got {grid}", field="grid")
    if size < grid:
        raise InvalidInputError(f"a side of {size} px cannot hold a {grid}x{grid} grid", field="grid")
    return [i * size // grid for i in range(grid + 1)]


def grid_patches(height: int, width: int, *, grid: int = 4, margin: int = 0) -> list[Patch]:
    """The grid×grid cells of a height×width image (row-major), each with an overlap margin.

    Args:
        height, width: image size in pixels.
        grid: cells per side (the paper: 4).
        margin: pixels each patch extends beyond its core cell on sides that have a
            neighbour (clipped at the image border); neighbours then overlap by 2·margin.
    """
    if margin < 0:
        raise InvalidInputError(f"margin must be >= 0 px, got {margin}", field="margin")
    ys, xs = grid_edges(height, grid), grid_edges(width, grid)
    smallest = min(min(b - a for a, b in zip(ys, ys[1:], strict=False)), min(b - a for a, b in zip(xs, xs[1:], strict=False)))
    if margin > smallest:
        # A margin past the neighbour's far side would make a window ramp over a third cell.
        raise InvalidInputError(f"margin {margin} px is larger than the smallest cell ({smallest} px)", field="margin")
    patches = []
    for row in range(grid):
        for col in range(grid):
            core = Box(ys[row], xs[col], ys[row + 1], xs[col + 1])
            padded = Box(max(0, core.top - margin), max(0, core.left - margin), min(height, core.bottom + margin), min(width, core.right + margin))
            patches.append(Patch(row * grid + col, core, padded))
    return patches


@dataclass(frozen=True)
class LatentPartition:
    """The region-aware partition of a batch of latents.

    Attributes:
        variance: [B, G, G] float32, each cell's spatial variance (mean over channels).
        ranking: [B, G·G] int64, cells by decreasing variance (ties: lower index first).
        foreground: [B, G, G] bool, the top-γ cells.
    """

    variance: torch.Tensor
    ranking: torch.Tensor
    foreground: torch.Tensor

    @property
    def grid(self) -> int:
        return int(self.variance.shape[-1])

    def foreground_cells(self, index: int = 0) -> list[int]:
        """Foreground cells of batch item `index`, by decreasing variance."""
        k = int(self.foreground[index].sum())
        return [int(c) for c in self.ranking[index, :k]]

    def background_cells(self, index: int = 0) -> list[int]:
        """Background cells of batch item `index`, in row-major order."""
        fg = self.foreground[index].flatten()
        return [c for c in range(fg.numel()) if not bool(fg[c])]


def foreground_count(foreground_fraction: float, n_cells: int) -> int:
    """How many of `n_cells` cells are foreground at fraction γ: round(γ·n), halves up."""
    if not (0.0 <= foreground_fraction <= 1.0) or math.isnan(foreground_fraction):
        raise InvalidInputError(f"foreground fraction gamma must be in [0, 1], got {foreground_fraction}", field="gamma")
    return min(n_cells, math.floor(foreground_fraction * n_cells + 0.5))


def partition_latent(latents: torch.Tensor, *, grid: int = 4, foreground_fraction: float = 0.25) -> LatentPartition:
    """Rank the grid cells of each latent by spatial variance; the top γ are foreground.

    Hybrid SR §III-A1: high-variance latent cells hold the salient objects, low-variance
    ones the background, without a segmentation model.

    Args:
        latents: [B, C, h, w] float, h and w ≥ grid.
        grid: cells per side.
        foreground_fraction: γ ∈ [0, 1], the fraction of cells that are foreground
            (round(γ·G²) cells).
    Returns:
        A `LatentPartition`.
    """
    if latents.ndim != 4:
        raise InvalidInputError(f"latents must be [B, C, h, w], got shape {tuple(latents.shape)}", field="latents")
    if not torch.isfinite(latents).all():
        raise InvalidInputError("latents hold NaN or Inf", field="latents")
    k = foreground_count(foreground_fraction, grid * grid)
    b, _, h, w = latents.shape
    variance = torch.empty((b, grid, grid), dtype=torch.float32, device=latents.device)
    for patch in grid_patches(h, w, grid=grid):
        cell = latents[:, :, patch.core.top : patch.core.bottom, patch.core.left : patch.core.right].float()
        row, col = divmod(patch.cell, grid)
        # unbiased=False: a 1-pixel cell has variance 0, not NaN
        variance[:, row, col] = cell.flatten(2).var(dim=2, unbiased=False).mean(dim=1)
    # stable sort on the negated variance: equal variances keep row-major order
    ranking = torch.sort(-variance.flatten(1), dim=1, stable=True).indices
    foreground = torch.zeros((b, grid * grid), dtype=torch.bool, device=latents.device)
    foreground.scatter_(1, ranking[:, :k], True)
    return LatentPartition(variance=variance, ranking=ranking, foreground=foreground.view(b, grid, grid))


def crop(image: torch.Tensor, box: Box) -> torch.Tensor:
    """image[..., top:bottom, left:right] ([..., H, W] → [..., box.height, box.width])."""
    h, w = image.shape[-2:]
    if not (0 <= box.top < box.bottom <= h and 0 <= box.left < box.right <= w):
        raise InvalidInputError(f"box {box} lies outside the {h}x{w} image", field="box")
    return image[..., box.top : box.bottom, box.left : box.right]


def _ramp(length: int, lo_overlap: int, hi_overlap: int, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
    """[length] weights: linear ramps over the first `lo_overlap` and last `hi_overlap`
    pixels (2·margin each where a neighbour overlaps, 0 at an image border), 1 between."""
    x = torch.arange(length, dtype=dtype, device=device) + 0.5
    w = torch.ones(length, dtype=dtype, device=device)
    if lo_overlap > 0:
        w = torch.minimum(w, x / lo_overlap)
    if hi_overlap > 0:
        w = torch.minimum(w, (length - x) / hi_overlap)
    return w


def feather_window(patch: Patch, height: int, width: int, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | None = None) -> torch.Tensor:  # fmt: skip
    """The overlap-add weights of `patch` over its padded box: [padded.height, padded.width].

    Along each axis the weight ramps linearly from 0 at the padded edge to 1 at
    2·margin inside it on sides with a neighbour; a neighbour's ramp runs the other way over
    the same pixels, so the two weights sum to 1 there. Sides at the image border keep 1.
    """
    core, pad = patch.core, patch.padded
    top_overlap = 2 * (core.top - pad.top) if pad.top > 0 else 0
    bottom_overlap = 2 * (pad.bottom - core.bottom) if pad.bottom < height else 0
    left_overlap = 2 * (core.left - pad.left) if pad.left > 0 else 0
    right_overlap = 2 * (pad.right - core.right) if pad.right < width else 0
    wy = _ramp(pad.height, top_overlap, bottom_overlap, dtype, device)
    wx = _ramp(pad.width, left_overlap, right_overlap, dtype, device)
    return wy[:, None] * wx[None, :]


def stitch(pixels: Sequence[torch.Tensor], patches: Sequence[Patch], height: int, width: int) -> torch.Tensor:
    """Feathered overlap-add of patches into one image.

    Args:
        pixels: per patch, [B, C, padded.height, padded.width] (already upscaled: the
            patches' boxes must be in the same, upscaled, pixel space, see `Patch.scaled`).
        patches: the layout of each entry of `pixels`; together they must cover the image.
        height, width: the output size.
    Returns:
        [B, C, height, width]: Σ w_i·p_i / Σ w_i with `feather_window` weights.
    """
    if len(pixels) != len(patches) or not pixels:
        raise InvalidInputError(f"need one pixel tensor per patch, got {len(pixels)} tensors for {len(patches)} patches", field="patches")
    first = pixels[0]
    b, c = first.shape[:2]
    total = torch.zeros((b, c, height, width), dtype=torch.float32, device=first.device)
    weight = torch.zeros((height, width), dtype=torch.float32, device=first.device)
    for p, patch in zip(pixels, patches, strict=True):
        box = patch.padded
        if tuple(p.shape) != (b, c, box.height, box.width):
            raise InvalidInputError(f"patch {patch.cell} has shape {tuple(p.shape)}, its box needs {(b, c, box.height, box.width)}", field="patches")
        if box.bottom > height or box.right > width:
            raise InvalidInputError(f"patch {patch.cell}'s box {box} lies outside the {height}x{width} image", field="patches")
        w = feather_window(patch, height, width, device=first.device)
        total[:, :, box.top : box.bottom, box.left : box.right] += p.float() * w
        weight[box.top : box.bottom, box.left : box.right] += w
    if bool((weight <= 0).any()):
        raise InvalidInputError(f"the patches leave {int((weight <= 0).sum())} pixels uncovered", field="patches")
    return (total / weight).to(first.dtype)


PatchUpscaler = Callable[[torch.Tensor, int], torch.Tensor]
"""(pixels [B, C, h, w], cell index) → [B, C, S·h, S·w]; the cell lets a caller seed each
patch's noise by its cell, so the result does not depend on the order patches run in."""


def upscale_patches(image: torch.Tensor, foreground_cells: Sequence[int], scale: int, *, foreground: PatchUpscaler,
                    background: PatchUpscaler, grid: int = 4, margin: int = 4) -> torch.Tensor:  # fmt: skip
    """Hybrid SR of one decoded image: foreground cells by one upscaler, the rest by the
    other, each patch cut with `margin` low-resolution pixels of overlap, then stitched.

    Args:
        image: [B, C, h, w], the low-resolution image.
        foreground_cells: cells (row-major, < grid²) for `foreground` (e.g.
            `LatentPartition.foreground_cells()`).
        scale: S, the upscaling factor of both upscalers.
        foreground, background: the two upscalers (see `PatchUpscaler`).
    Returns:
        [B, C, S·h, S·w].
    """
    h, w = image.shape[-2:]
    patches = grid_patches(h, w, grid=grid, margin=margin)
    chosen = set(foreground_cells)
    if bad := sorted(c for c in chosen if not 0 <= c < grid * grid):
        raise InvalidInputError(f"foreground cells {bad} are outside the {grid}x{grid} grid", field="foreground_cells")
    ups = []
    for patch in patches:
        upscale = foreground if patch.cell in chosen else background
        up = upscale(crop(image, patch.padded), patch.cell)
        expected = (patch.padded.height * scale, patch.padded.width * scale)
        if tuple(up.shape[-2:]) != expected:
            raise InvalidInputError(f"upscaler returned {tuple(up.shape[-2:])} for cell {patch.cell}, expected {expected} at scale {scale}", field="scale")
        ups.append(up)
    return stitch(ups, [p.scaled(scale) for p in patches], h * scale, w * scale)


def cell_mask(foreground: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel mask of the foreground cells: [B, G, G] bool → [B, height, width] bool."""
    b, grid, _ = foreground.shape
    out = torch.zeros((b, height, width), dtype=torch.bool, device=foreground.device)
    for patch in grid_patches(height, width, grid=grid):
        row, col = divmod(patch.cell, grid)
        out[:, patch.core.top : patch.core.bottom, patch.core.left : patch.core.right] = foreground[:, row, col, None, None]
    return out


def mask_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Intersection over union of boolean masks [B, H, W] → [B] float (1 where both are empty)."""
    inter = (predicted & target).flatten(1).sum(1).float()
    union = (predicted | target).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _pair_lines(size: int, borders: list[int], band: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the size-1 adjacent-pixel pairs along one axis straddle a border (pair
    x-1|x for a border at x), and which lie within `band` pairs of one without straddling."""
    on = torch.zeros(size - 1, dtype=torch.bool)
    near = torch.zeros(size - 1, dtype=torch.bool)
    for x in borders:
        on[x - 1] = True
        for d in range(1, band + 1):
            for i in (x - 1 - d, x - 1 + d):
                if 0 <= i < size - 1:
                    near[i] = True
    return on, near & ~on


def seam_ratio(image: torch.Tensor, *, grid: int = 4, band: int = 4) -> float:
    """Mean gradient magnitude across the grid's cell borders over that just inside the cells.

    The absolute difference of adjacent pixels is averaged over the pixel pairs that
    straddle a core-cell border (rows and columns) and over the pairs within `band` pixels
    of a border inside the cells. Near pairs see the same content as border pairs, so an
    image without seams gives about 1, and a stitch that leaves a step at the borders
    gives more (feathering spreads a disagreement over the overlap, border and near pairs
    alike).

    Args:
        image: [B, C, H, W]; pool a batch for a stable estimate (edges are sparse).
        grid: cells per side.
        band: near pairs on each side of a border.
    Returns:
        border mean / near mean (inf if the near pairs are flat and the border is not).
    """
    h, w = image.shape[-2:]
    col_on, col_near = _pair_lines(w, grid_edges(w, grid)[1:-1], band)
    row_on, row_near = _pair_lines(h, grid_edges(h, grid)[1:-1], band)
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs()  # [.., H, W-1]: pair x|x+1 at index x
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs()  # [.., H-1, W]

    def mean(cols: torch.Tensor, rows: torch.Tensor) -> float:
        total = dx[..., cols].sum() + dy[..., rows, :].sum()
        n = dx[..., cols].numel() + dy[..., rows, :].numel()
        return float(total) / max(n, 1)

    border, near = mean(col_on, row_on), mean(col_near, row_near)
    if near == 0.0:
        return 1.0 if border == 0.0 else math.inf
    return border / near
