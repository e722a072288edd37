"""The judge of meg-tiny: does an image show what its prompt asked for?

Two measures:

- **Prompt fidelity** (`detect_objects`, `score_prompt`): a deterministic detector built
  on the renderer's knowledge. Object colours are saturated and backgrounds are not, so
  pixels are segmented by saturation and nearest palette colour; each connected
  component is classified by fitting every shape template of the renderer
  (`meg.models.world.shape_masks`) to its bounding box and keeping the best IoU; size
  comes from the fitted radius, position from the box centre's 3×3 cell. A requested
  object scores the fraction of its requested attributes (colour, shape, and size and
  position where the prompt gives them) met by its best-matching detected object;
  prompt fidelity is the mean over objects, averaged over prompts.
- **Distribution distance** (`FeatureNet`, `frechet_distance`): the Fréchet distance
  between Gaussian fits of 128-d features of generated and rendered images, from a
  small CNN the project trains on renders (`meg train judge`), not downloaded weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg, ndimage

from meg.errors import InvalidInputError, ModelNotFoundError
from meg.models.captions import PromptObject, PromptSpec
from meg.models.world import (
    BACKGROUND_COLOURS,
    CELL_CENTRES,
    IMAGE_SIZE,
    MAX_OBJECTS,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_RADIUS_PX,
    SIZES,
    TEXTURES,
    Scenes,
    shape_masks,
)

__all__ = [
    "DetectedObject",
    "DetectorConfig",
    "FeatureNet",
    "FidelityReport",
    "detect_objects",
    "frechet_distance",
    "scene_from_spec",
    "scene_targets",
    "score_prompt",
    "score_prompts",
]

_COLOURS = list(OBJECT_COLOURS)
_PALETTE = np.array(list(OBJECT_COLOURS.values()), np.float32)
# Half-width / half-height of each shape's box, and its box centre's vertical offset from
# the shape centre, in units of the radius (from the geometry in world.shape_masks).
_HALF_W = {"circle": 1.0, "square": 0.85, "triangle": 0.95, "star": 0.951, "ring": 1.0, "cross": 1.0}
_HALF_H = {"circle": 1.0, "square": 0.85, "triangle": 0.8, "star": 0.905, "ring": 1.0, "cross": 1.0}
_BOX_DY = {"circle": 0.0, "square": 0.0, "triangle": -0.2, "star": -0.095, "ring": 0.0, "cross": 0.0}


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the detector (pixels are RGB in [0, 1])."""

    min_saturation: float = 0.33
    """Backgrounds stay under 0.25 saturation, object colours are above 0.5."""
    min_value: float = 0.25
    max_colour_distance: float = 0.35
    """Pixels farther than this (RGB Euclidean) from every palette colour are ignored."""
    min_area_px: int = 30
    small_medium_radius_px: float = 12.0
    medium_large_radius_px: float = 18.0


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    position: str
    radius_px: float
    centre_px: tuple[float, float]
    area_px: int
    iou: float


def _fit_shape(mask: np.ndarray, box: tuple[slice, slice]) -> tuple[str, float, float, float, float]:
    """Best (shape, iou, radius, cx, cy) of the renderer's templates for one component."""
    ys, xs = box
    bw, bh = xs.stop - xs.start, ys.stop - ys.start
    bcx, bcy = (xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2
    pad = 6
    y0, y1 = max(0, ys.start - pad), min(mask.shape[0], ys.stop + pad)
    x0, x1 = max(0, xs.start - pad), min(mask.shape[1], xs.stop + pad)
    crop = torch.from_numpy(mask[y0:y1, x0:x1])
    gy, gx = torch.meshgrid(torch.arange(y0, y1) + 0.5, torch.arange(x0, x1) + 0.5, indexing="ij")
    best = ("circle", -1.0, 0.0, bcx, bcy)
    for k, shape in enumerate(SHAPES):
        r0 = 0.5 * (bw / 2 / _HALF_W[shape] + bh / 2 / _HALF_H[shape])
        for scale in (0.92, 1.0, 1.08):
            r = r0 * scale
            cx, cy = bcx, bcy - _BOX_DY[shape] * r
            template = shape_masks(gx - cx, gy - cy, torch.tensor(r))[k]
            inter = (template & crop).sum().item()
            union = (template | crop).sum().item()
            iou = inter / max(union, 1)
            if iou > best[1]:
                best = (shape, iou, r, cx, cy)
    return best


def _cell(cx: float, cy: float) -> str:
    col = min(2, int(cx / (IMAGE_SIZE / 3)))
    row = min(2, int(cy / (IMAGE_SIZE / 3)))
    return POSITIONS[3 * row + col]


def detect_objects(image: torch.Tensor | np.ndarray, config: DetectorConfig = DetectorConfig()) -> list[DetectedObject]:
    """Objects in one image [3, 128, 128] (float RGB in [0, 1]), largest first."""
    img = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, np.float32)
    if img.shape != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise InvalidInputError(f"detector expects an image of shape (3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(img.shape)}")
    rgb = img.transpose(1, 2, 0)
    vmax, vmin = rgb.max(axis=2), rgb.min(axis=2)
    saturation = (vmax - vmin) / np.maximum(vmax, 1e-6)
    distance = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=3)  # [H,W,8]
    nearest = distance.argmin(axis=2)
    candidate = (saturation > config.min_saturation) & (vmax > config.min_value) & (distance.min(axis=2) < config.max_colour_distance)
    found: list[DetectedObject] = []
    for c, colour in enumerate(_COLOURS):
        mask = candidate & (nearest == c)
        if mask.sum() < config.min_area_px:
            continue
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        boxes = ndimage.find_objects(labels)
        for index in range(n):
            component = labels == index + 1
            area = int(component.sum())
            if area < config.min_area_px:
                continue
            shape, iou, r, cx, cy = _fit_shape(component, boxes[index])
            size = (
                "small" if r < config.small_medium_radius_px
                else "medium" if r < config.medium_large_radius_px else "large"
            )  # fmt: skip
            found.append(DetectedObject(colour, shape, size, _cell(cx, cy), float(r), (float(cx), float(cy)), area, float(iou)))
    return sorted(found, key=lambda o: -o.area_px)


def _attributes(obj: PromptObject) -> list[str]:
    return [k for k in ("colour", "shape", "size", "position") if getattr(obj, k) is not None]


def score_prompt(spec: PromptSpec, detected: list[DetectedObject]) -> dict[str, Any]:
    """Match requested objects to detected ones (greedy on score, each used once).

    Returns {"fidelity": mean object score, "exact": all attributes met, "attributes":
    {name: [hits, requested]}, "extra_objects": detections left unmatched}.
    """
    if not spec.objects:
        raise InvalidInputError("prompt requests no object (no shape or colour word found)")
    pairs = []
    for i, obj in enumerate(spec.objects):
        attrs = _attributes(obj)
        for j, det in enumerate(detected):
            hits = {a: getattr(obj, a) == getattr(det, a) for a in attrs}
            pairs.append((sum(hits.values()) / max(1, len(attrs)), i, j, hits))
    pairs.sort(key=lambda p: -p[0])
    used_obj: set[int] = set()
    used_det: set[int] = set()
    scores = [0.0] * len(spec.objects)
    attributes: dict[str, list[int]] = {a: [0, 0] for a in ("colour", "shape", "size", "position")}
    matched: dict[int, dict[str, bool]] = {}
    for score, i, j, hits in pairs:
        if i in used_obj or j in used_det:
            continue
        used_obj.add(i)
        used_det.add(j)
        scores[i] = score
        matched[i] = hits
    for i, obj in enumerate(spec.objects):
        for a in _attributes(obj):
            attributes[a][1] += 1
            attributes[a][0] += int(matched.get(i, {}).get(a, False))
    return {
        "fidelity": float(np.mean(scores)),
        "exact": bool(all(s == 1.0 for s in scores)),
        "attributes": attributes,
        "extra_objects": len(detected) - len(used_det),
    }


@dataclass(frozen=True)
class FidelityReport:
    """Aggregate of `score_prompt` over prompts."""

    n_prompts: int
    fidelity: float
    exact: float
    attribute_accuracy: dict[str, float]
    per_prompt: list[float]

    def to_dict(self) -> dict[str, object]:
        return {
            "n_prompts": self.n_prompts,
            "fidelity": self.fidelity,
            "exact": self.exact,
            "attribute_accuracy": self.attribute_accuracy,
        }


def score_prompts(specs: list[PromptSpec], images: torch.Tensor, config: DetectorConfig = DetectorConfig()) -> FidelityReport:
    """Score images [N,3,128,128] in [0,1] against their prompts' specs."""
    if len(specs) != len(images):
        raise InvalidInputError(f"{len(specs)} prompts but {len(images)} images")
    results: list[dict[str, Any]] = [score_prompt(s, detect_objects(img, config)) for s, img in zip(specs, images, strict=True)]
    totals: dict[str, list[int]] = {}
    for r in results:
        for a, (hit, req) in r["attributes"].items():  # type: ignore[union-attr]
            t = totals.setdefault(a, [0, 0])
            t[0] += hit
            t[1] += req
    per_prompt = [float(r["fidelity"]) for r in results]  # type: ignore[arg-type]
    return FidelityReport(
        n_prompts=len(results),
        fidelity=float(np.mean(per_prompt)),
        exact=float(np.mean([r["exact"] for r in results])),
        attribute_accuracy={a: h / q for a, (h, q) in totals.items() if q},
        per_prompt=per_prompt,
    )


def scene_from_spec(spec: PromptSpec, rng: np.random.Generator) -> Scenes:
    """One scene that satisfies `spec`; attributes the prompt leaves open are drawn from rng."""
    objects = [o for o in spec.objects][:MAX_OBJECTS]
    if not objects:
        raise InvalidInputError("prompt requests no object")
    n = len(objects)
    taken_cells = {POSITIONS.index(o.position) for o in objects if o.position}
    free_cells = [c for c in range(9) if c not in taken_cells]
    rng.shuffle(free_cells)
    taken_colours = {o.colour for o in objects if o.colour}
    free_colours = [c for c in _COLOURS if c not in taken_colours]
    rng.shuffle(free_colours)
    rows: dict[str, list] = {k: [] for k in ("shape", "colour", "size", "cell", "radius_px", "cx_px", "cy_px")}
    for o in objects:
        size = o.size or (SIZES[int(rng.integers(0, 3 if n == 1 else 2))])
        cell = POSITIONS.index(o.position) if o.position else free_cells.pop()
        lo, hi = SIZE_RADIUS_PX[size]
        row, col = divmod(cell, 3)
        rows["shape"].append(SHAPES.index(o.shape) if o.shape else int(rng.integers(0, len(SHAPES))))
        rows["colour"].append(_COLOURS.index(o.colour) if o.colour else _COLOURS.index(free_colours.pop()))
        rows["size"].append(SIZES.index(size))
        rows["cell"].append(cell)
        rows["radius_px"].append(rng.uniform(lo, hi))
        rows["cx_px"].append(CELL_CENTRES[col] * IMAGE_SIZE + rng.uniform(-3, 3))
        rows["cy_px"].append(CELL_CENTRES[row] * IMAGE_SIZE + rng.uniform(-3, 3))
    pad = MAX_OBJECTS - n
    tensors = {}
    for k, v in rows.items():
        fill = -1 if k in ("shape", "colour", "size", "cell") else 0.0
        dtype = torch.int64 if fill == -1 else torch.float32
        tensors[k] = torch.tensor([v + [fill] * pad], dtype=dtype)
    texture = TEXTURES.index(spec.texture) if spec.texture else int(rng.integers(0, len(TEXTURES)))
    bg = list(BACKGROUND_COLOURS).index(spec.bg_colour) if spec.bg_colour else int(rng.integers(0, len(BACKGROUND_COLOURS)))
    return Scenes(
        n_objects=torch.tensor([n]),
        **tensors,
        texture=torch.tensor([texture]),
        bg_colour=torch.tensor([bg]),
        texture_params=torch.tensor([[rng.uniform(0, np.pi), rng.uniform(10, 24), rng.uniform(0, 2 * np.pi), rng.uniform(0.08, 0.16)]], dtype=torch.float32),
        noise_params=torch.tensor(np.stack([rng.uniform(-0.25, 0.25, 6), rng.uniform(-0.25, 0.25, 6), rng.uniform(0, 2 * np.pi, 6), rng.uniform(0.3, 1.0, 6)], axis=1)[None], dtype=torch.float32),
    )


# ------------------------------------------------------------------ distribution distance


def scene_targets(scenes: Scenes) -> torch.Tensor:
    """Multi-hot [N, 48 + 54 + 72 + 18 + 5 + 5] of what a scene contains (FeatureNet targets)."""
    n = len(scenes)
    nc, ns, npos, nz = len(_COLOURS), len(SHAPES), len(POSITIONS), len(SIZES)
    widths = [nc * ns, ns * npos, nc * npos, ns * nz, len(TEXTURES), len(BACKGROUND_COLOURS)]
    out = torch.zeros(n, sum(widths))
    offsets = np.cumsum([0, *widths])
    for j in range(MAX_OBJECTS):
        present = scenes.n_objects > j
        rows = torch.nonzero(present).flatten()
        s, c, p, z = scenes.shape[rows, j], scenes.colour[rows, j], scenes.cell[rows, j], scenes.size[rows, j]
        out[rows, offsets[0] + c * ns + s] = 1
        out[rows, offsets[1] + s * npos + p] = 1
        out[rows, offsets[2] + c * npos + p] = 1
        out[rows, offsets[3] + s * nz + z] = 1
    out[torch.arange(n), offsets[4] + scenes.texture] = 1
    out[torch.arange(n), offsets[5] + scenes.bg_colour] = 1
    return out


class FeatureNet(torch.nn.Module):
    """A small CNN: 128×128 RGB → 128-d features → scene-content logits."""

    n_outputs = 48 + 54 + 72 + 18 + 5 + 5
    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        channels = [3, 32, 64, 96, 128, 128]
        for cin, cout in zip(channels[:-1], channels[1:], strict=True):
            layers += [torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(self.feature_dim, self.n_outputs)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [N,3,128,128] in [0,1] → features [N,128]."""
        return self.body(images * 2 - 1).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().half().contiguous().cpu() for k, v in self.state_dict().items()}, folder / "feature_net.safetensors")
        (folder / "config.json").write_text(json.dumps({"class": "FeatureNet", "feature_dim": self.feature_dim, "n_outputs": self.n_outputs}) + "\n")

    @classmethod
    def load(cls, folder: Path) -> FeatureNet:
        from safetensors.torch import load_file

        path = folder / "feature_net.safetensors"
        if not path.exists():
            raise ModelNotFoundError(f"no judge feature network at {path}")
        net = cls()
        net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
        return net.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of feature sets a [N,D] and b [M,D]."""
    if len(a) < 2 or len(b) < 2:
        raise InvalidInputError(f"need at least 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
