"""The procedural world of meg-tiny: scenes of 1–3 flat shapes over textured backgrounds.

A scene is a handful of integers and floats (`Scenes`, one row per scene); `sample_scenes`
draws them deterministically from a seed and `render` turns them into 128×128 RGB images
and per-object masks, vectorised over the batch on any torch device. Captions are built
from the same rows (`meg.models.captions`), and the judge (`meg.models.judge`) uses the
constants below to read images back: object colours are saturated, background colours are
not, so colour segmentation separates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from meg.errors import InvalidInputError

__all__ = [
    "BACKGROUND_COLOURS",
    "HELDOUT_PAIRS",
    "IMAGE_SIZE",
    "MAX_OBJECTS",
    "OBJECT_COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SIZE_RADIUS_PX",
    "TEXTURES",
    "Scenes",
    "WorldConfig",
    "render",
    "sample_scenes",
    "shape_mask",
    "shape_masks",
]

IMAGE_SIZE = 128
MAX_OBJECTS = 3
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
# Saturated, well-separated hues (RGB in [0, 1]); backgrounds below stay under 0.25 saturation.
OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.95, 0.88, 0.12),
    "green": (0.13, 0.70, 0.18),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.88),
    "purple": (0.55, 0.15, 0.80),
    "pink": (0.97, 0.45, 0.72),
}
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "gray": (0.50, 0.50, 0.50),
    "white": (0.88, 0.88, 0.86),
    "black": (0.12, 0.12, 0.13),
    "beige": (0.80, 0.75, 0.64),
    "slate": (0.38, 0.42, 0.48),
}
TEXTURES: tuple[str, ...] = ("solid", "gradient", "stripes", "checkers", "noise")
SIZES: tuple[str, ...] = ("small", "medium", "large")
SIZE_RADIUS_PX: dict[str, tuple[float, float]] = {
    "small": (8.0, 11.0),
    "medium": (13.0, 16.0),
    "large": (20.0, 25.0),
}
# 3×3 grid, row-major: index = 3·row + column.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
CELL_CENTRES = (0.2, 0.5, 0.8)  # fraction of the side: keeps large shapes inside the frame
# Colour–shape pairs that never occur in training scenes: prompts with them test
# compositional generalisation (one held-out colour per shape).
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "star"), ("blue", "triangle"), ("green", "ring"),
     ("yellow", "cross"), ("purple", "circle"), ("orange", "square")}
)  # fmt: skip
_NOISE_WAVES = 6


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn."""

    max_objects: int = MAX_OBJECTS
    """Objects per scene are drawn uniformly from 1..max_objects."""
    jitter_px: float = 3.0
    """Uniform jitter of an object's centre around its grid cell centre (pixels)."""
    heldout: bool = False
    """False: never draw HELDOUT_PAIRS (training); True: every scene has at least one."""
    supersample: int = 2
    """Render at this multiple of the resolution and average down (anti-aliasing)."""


@dataclass(frozen=True)
class Scenes:
    """A batch of N scenes. Object slots beyond `n_objects` hold -1 / 0.

    Attributes:
        n_objects: [N] int64, 1..3.
        shape, colour, size, cell: [N, 3] int64 indices into SHAPES, OBJECT_COLOURS, SIZES,
            POSITIONS (-1 for empty slots).
        radius_px, cx_px, cy_px: [N, 3] float32, object half-extent and centre in pixels.
        texture, bg_colour: [N] int64 indices into TEXTURES, BACKGROUND_COLOURS.
        texture_params: [N, 4] float32 (angle rad, period px, phase, contrast).
        noise_params: [N, 6, 4] float32 (kx, ky, phase, amplitude) of the noise texture.
    """

    n_objects: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    cell: torch.Tensor
    radius_px: torch.Tensor
    cx_px: torch.Tensor
    cy_px: torch.Tensor
    texture: torch.Tensor
    bg_colour: torch.Tensor
    texture_params: torch.Tensor
    noise_params: torch.Tensor

    def __len__(self) -> int:
        return int(self.n_objects.shape[0])

    def select(self, index: torch.Tensor | slice) -> Scenes:
        """Rows `index` of every field (a new Scenes)."""
        return Scenes(**{k: getattr(self, k)[index] for k in self.__dataclass_fields__})

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> Scenes:
        return cls(**{k: tensors[k] for k in cls.__dataclass_fields__})

    def objects(self, i: int) -> list[dict[str, str]]:
        """Scene i's objects as names: [{"shape", "colour", "size", "position"}]."""
        colours = list(OBJECT_COLOURS)
        return [
            {
                "shape": SHAPES[int(self.shape[i, j])],
                "colour": colours[int(self.colour[i, j])],
                "size": SIZES[int(self.size[i, j])],
                "position": POSITIONS[int(self.cell[i, j])],
            }
            for j in range(int(self.n_objects[i]))
        ]


def _draw_object_slots(rng: np.random.Generator, n: int, config: WorldConfig, want_heldout: bool) -> list[tuple[int, int, int, int]]:
    colours = list(OBJECT_COLOURS)
    while True:
        cells = rng.choice(9, size=n, replace=False)
        colour_ids = rng.choice(len(colours), size=n, replace=False)
        shape_ids = rng.integers(0, len(SHAPES), size=n)
        pairs = [(colours[c], SHAPES[s]) for c, s in zip(colour_ids, shape_ids, strict=True)]
        n_heldout = sum(p in HELDOUT_PAIRS for p in pairs)
        if (want_heldout and n_heldout >= 1) or (not want_heldout and n_heldout == 0):
            break
    # Several objects share the frame: keep them small or medium so they do not overlap.
    sizes = rng.integers(0, 3 if n == 1 else 2, size=n)
    return [(int(s), int(c), int(z), int(k)) for s, c, z, k in zip(shape_ids, colour_ids, sizes, cells, strict=True)]


def sample_scenes(n: int, seed: int, config: WorldConfig = WorldConfig(), *, n_objects: int | None = None) -> Scenes:
    """Draw `n` scenes, deterministically from `seed` (numpy PCG64, independent of device).

    Args:
        n: number of scenes (≥ 1).
        seed: the seed; the same (n, seed, config) always gives the same scenes.
        config: drawing options (held-out pairs, jitter).
        n_objects: if given, every scene has exactly this many objects.
    """
    if n < 1:
        raise InvalidInputError(f"number of scenes must be >= 1, got {n}")
    if n_objects is not None and not 1 <= n_objects <= config.max_objects:
        raise InvalidInputError(f"n_objects must be in 1..{config.max_objects}, got {n_objects}")
    rng = np.random.default_rng(seed)
    m = MAX_OBJECTS
    out: dict[str, np.ndarray] = {
        "n_objects": np.zeros(n, np.int64),
        "shape": np.full((n, m), -1, np.int64),
        "colour": np.full((n, m), -1, np.int64),
        "size": np.full((n, m), -1, np.int64),
        "cell": np.full((n, m), -1, np.int64),
        "radius_px": np.zeros((n, m), np.float32),
        "cx_px": np.zeros((n, m), np.float32),
        "cy_px": np.zeros((n, m), np.float32),
    }
    for i in range(n):
        k = n_objects if n_objects is not None else int(rng.integers(1, config.max_objects + 1))
        out["n_objects"][i] = k
        for j, (s, c, z, cell) in enumerate(_draw_object_slots(rng, k, config, config.heldout)):
            lo, hi = SIZE_RADIUS_PX[SIZES[z]]
            row, col = divmod(cell, 3)
            out["shape"][i, j], out["colour"][i, j], out["size"][i, j], out["cell"][i, j] = s, c, z, cell
            out["radius_px"][i, j] = rng.uniform(lo, hi)
            out["cx_px"][i, j] = CELL_CENTRES[col] * IMAGE_SIZE + rng.uniform(-config.jitter_px, config.jitter_px)
            out["cy_px"][i, j] = CELL_CENTRES[row] * IMAGE_SIZE + rng.uniform(-config.jitter_px, config.jitter_px)
    texture = rng.integers(0, len(TEXTURES), size=n)
    bg_colour = rng.integers(0, len(BACKGROUND_COLOURS), size=n)
    texture_params = np.stack(
        [rng.uniform(0, math.pi, n), rng.uniform(10, 24, n), rng.uniform(0, 2 * math.pi, n), rng.uniform(0.08, 0.16, n)],
        axis=1,
    ).astype(np.float32)
    noise_params = np.stack(
        [rng.uniform(-0.25, 0.25, (n, _NOISE_WAVES)), rng.uniform(-0.25, 0.25, (n, _NOISE_WAVES)),
         rng.uniform(0, 2 * math.pi, (n, _NOISE_WAVES)), rng.uniform(0.3, 1.0, (n, _NOISE_WAVES))],
        axis=2,
    ).astype(np.float32)  # fmt: skip
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    return Scenes(
        **tensors,
        texture=torch.from_numpy(texture.astype(np.int64)),
        bg_colour=torch.from_numpy(bg_colour.astype(np.int64)),
        texture_params=torch.from_numpy(texture_params),
        noise_params=torch.from_numpy(noise_params),
    )


def shape_mask(kind: int, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside-mask of shape `SHAPES[kind]` for offsets from the object centre.

    Args:
        kind: index into SHAPES.
        dx, dy: [..., H, W] float offsets in pixels (y grows downwards).
        r: [..., 1, 1] float radius (half-extent) in pixels.
    Returns:
        [..., H, W] bool.
    """
    name = SHAPES[kind]
    if name == "square":
        return torch.maximum(dx.abs(), dy.abs()) < 0.85 * r
    if name == "triangle":
        # Upward triangle: apex (0, -r), base corners (±0.95 r, 0.6 r).
        return (dy < 0.6 * r) & ((dy + r) * 0.95 >= 1.6 * dx.abs())
    if name == "cross":
        adx, ady = dx.abs(), dy.abs()
        return ((adx < 0.3 * r) & (ady < r)) | ((ady < 0.3 * r) & (adx < r))
    d = torch.sqrt(dx * dx + dy * dy)
    if name == "circle":
        return d < r
    if name == "ring":
        return (d < r) & (d > 0.55 * r)
    # Five-pointed star: radius interpolates between the tips (r) and the notches (0.45 r).
    theta = torch.atan2(dx, -dy)  # 0 points up
    seg = math.radians(72.0)
    phi = torch.remainder(theta + seg / 2, seg) / (seg / 2) - 1.0  # 0 at a tip, ±1 at notches
    return d < r - 0.55 * r * phi.abs()


def shape_masks(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Inside-masks of every shape (`shape_mask` for each): [len(SHAPES), ..., H, W] bool."""
    return torch.stack([shape_mask(k, dx, dy, r) for k in range(len(SHAPES))])


def _texture_mix(kind: str, scenes: Scenes, grid_y: torch.Tensor, grid_x: torch.Tensor, checker_scale: float) -> torch.Tensor:
    """Texture `kind`'s mixing weight in [0, 1] between the two background tones, [N,H,W].

    grid_y, grid_x are in units of the 128-px frame; `checker_scale` is the checker
    frequency factor (the supersampling factor, as the training renders at 128 px had it,
    so a render at any size shows the same checkers)."""
    if kind == "solid":
        return torch.zeros_like(grid_x)
    device = grid_x.device
    p = scenes.texture_params.to(device)
    angle, period, phase = p[:, 0, None, None], p[:, 1, None, None], p[:, 2, None, None]
    if kind == "noise":
        w = scenes.noise_params.to(device)  # [N,6,4]
        waves = torch.sin(
            w[:, :, 0, None, None] * grid_x[:, None] + w[:, :, 1, None, None] * grid_y[:, None] + w[:, :, 2, None, None]
        ) * w[:, :, 3, None, None]
        return _normalise(waves.sum(dim=1))
    if kind == "checkers":
        cx, cy = torch.floor(grid_x * checker_scale / period * 2), torch.floor(grid_y * checker_scale / period * 2)
        return torch.remainder(cx + cy, 2.0)
    u = grid_x * torch.cos(angle) + grid_y * torch.sin(angle)  # [N,H,W]
    if kind == "gradient":
        return _normalise(u)
    return (torch.sin(2 * math.pi * u / period + phase) > 0).float()  # stripes


def _normalise(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
    return (x - lo) / (hi - lo)


def _background(scenes: Scenes, grid_y: torch.Tensor, grid_x: torch.Tensor, checker_scale: float) -> torch.Tensor:
    device = grid_x.device
    base = torch.tensor(list(BACKGROUND_COLOURS.values()), device=device)[scenes.bg_colour.to(device)]  # [N,3]
    # The second tone is lighter on dark colours and darker on light ones.
    lum = base.mean(dim=1, keepdim=True)
    contrast = scenes.texture_params.to(device)[:, 3:4]
    other = torch.where(lum < 0.45, base + contrast, base - contrast).clamp(0, 1)
    # Each scene's own texture only: rows are grouped by texture kind.
    mix = torch.zeros_like(grid_x)
    for k, kind in enumerate(TEXTURES):
        rows = (scenes.texture == k).nonzero().flatten()
        if len(rows) and kind != "solid":
            mix[rows.to(device)] = _texture_mix(kind, scenes.select(rows), grid_y[: len(rows)], grid_x[: len(rows)], checker_scale)
    return base[:, :, None, None] * (1 - mix[:, None]) + other[:, :, None, None] * mix[:, None]


def render(
    scenes: Scenes, *, device: torch.device | str = "cpu", supersample: int = 2, size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render scenes.

    Scene geometry is in units of the 128-px frame, so `size` renders the same scenes at
    any resolution (objects, textures and anti-aliasing scale with it): the ground truth
    of super-resolution at size 128·S.

    Args:
        scenes: N scenes.
        device: where to compute.
        supersample: anti-aliasing factor (1 = hard edges).
        size: image side in pixels (≥ 8).
    Returns:
        images: [N, 3, size, size] float32 in [0, 1].
        masks: [N, 3, size, size] bool, one per object slot (empty slots are all False).
    """
    if size < 8:
        raise InvalidInputError(f"render size must be >= 8 px, got {size}")
    n, s = len(scenes), size * supersample
    coords = (torch.arange(s, device=device, dtype=torch.float32) + 0.5) / (supersample * size / IMAGE_SIZE)
    grid_y, grid_x = torch.meshgrid(coords, coords, indexing="ij")
    grid_y, grid_x = grid_y.expand(n, s, s), grid_x.expand(n, s, s)
    image = _background(scenes, grid_y, grid_x, checker_scale=float(supersample))
    palette = torch.tensor(list(OBJECT_COLOURS.values()), device=device)
    coverage = []
    for j in range(MAX_OBJECTS):
        mask = torch.zeros((n, s, s), dtype=torch.bool, device=device)
        # Each object's own shape only: rows are grouped by shape.
        for k in range(len(SHAPES)):
            rows = ((scenes.n_objects > j) & (scenes.shape[:, j] == k)).nonzero().flatten()
            if len(rows) == 0:
                continue
            d_rows = rows.to(device)
            cx = scenes.cx_px[rows, j].to(device)[:, None, None]
            cy = scenes.cy_px[rows, j].to(device)[:, None, None]
            r = scenes.radius_px[rows, j].to(device)[:, None, None]
            mask[d_rows] = shape_mask(k, grid_x[: len(rows)] - cx, grid_y[: len(rows)] - cy, r)
        colour = palette[scenes.colour[:, j].clamp(min=0).to(device)]
        m = mask[:, None].float()
        image = image * (1 - m) + colour[:, :, None, None] * m
        coverage.append(m)
    cover = torch.cat(coverage, dim=1)
    if supersample > 1:
        image = torch.nn.functional.avg_pool2d(image, supersample)
        cover = torch.nn.functional.avg_pool2d(cover, supersample)
    return image.clamp(0, 1), cover > 0.5
