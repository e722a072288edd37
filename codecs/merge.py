"""MEG feature merging: bipartite soft matching of latent tokens (PAPERS.md §1).

The edge reshapes the final latent ``[B, C, H, W]`` into tokens of ``grouping``
consecutive row elements × C channels (``[B, N, grouping·C]``, N = H·W / grouping; 16-dim
tokens for a 4-channel latent), lays the N tokens out on a grid, picks one destination
token per 2×2 cell of that grid (random with an explicit generator, or the cell's top-left
token), and averages the r = int(ratio·N) source tokens whose best cosine similarity to any
destination is highest into that destination. The device copies every destination value
back to the sources merged into it: unmerge is one gather, so it exports to ONNX.

Token grid: as in the MEG reference code, the N tokens in raster order are laid out in rows
of ``ceil(W / ceil(sqrt(grouping)))`` tokens (a 64×64 grid for a 128×128 latent with
grouping 4). Tokens outside complete 2×2 cells (a ragged last row or column) are sources.

Kept tokens are stored in ascending original token order, so the receiver rebuilds
``gather_index`` from a compact :class:`MergePlan` (see :func:`pack_plan`): which cell
position holds the destination (2 bits per cell, none when fixed), which sources were
merged (a bitmask or a sorted index list, whichever is shorter) and, per merged source, the
ordinal of its destination (``ceil(log2(n_dst))`` bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from meg.errors import CodecError, CorruptPayloadError

__all__ = [
    "MAX_MERGE_RATIO",
    "TOKEN_GROUPING",
    "MergePlan",
    "MergedLatent",
    "TokenGrid",
    "gather_index_from_plan",
    "latent_to_tokens",
    "merge_count",
    "merge_latent",
    "merge_latent_with_plan",
    "pack_plan",
    "plan_params_bytes",
    "tokens_to_latent",
    "unmerge_latent",
    "unpack_plan",
]

MAX_MERGE_RATIO = 0.75
TOKEN_GROUPING = 4
"""Latent row elements per token (MEG: 4 consecutive row elements × C channels)."""
"""With one destination per 2×2 cell, at most 3/4 of the tokens are sources."""

_STRIDE = 2  # cell side on the token grid (sy = sx = 2 in the reference)
_CELL = _STRIDE * _STRIDE


@dataclass(frozen=True)
class MergedLatent:
    """A merged latent as it crosses the link.

    Attributes:
        tokens: ``[B, M, D]`` kept tokens, M = N − r, D = grouping·C, float.
        gather_index: ``[B, N]`` int64: for each original token, its row in ``tokens``.
        latent_shape: ``(B, C, H, W)`` of the latent before merging.
        grouping: row elements per token (4 → D = 4·C = 16 for C = 4).
    """

    tokens: Tensor
    gather_index: Tensor
    latent_shape: tuple[int, int, int, int]
    grouping: int


@dataclass(frozen=True)
class TokenGrid:
    """Where the destination and source tokens of a latent shape lie.

    Attributes:
        n_tokens: N = H·W / grouping.
        grid_w: tokens per grid row.
        cells: ``[n_cells, 4]`` int64 token index of each position of each complete 2×2
            cell (position k = 2·dy + dx).
    """

    n_tokens: int
    grid_w: int
    cells: Tensor

    @property
    def n_dst(self) -> int:
        return int(self.cells.shape[0])

    @property
    def n_src(self) -> int:
        return self.n_tokens - self.n_dst

    @classmethod
    def for_latent(cls, latent_shape: tuple[int, ...], grouping: int) -> TokenGrid:
        n_tokens, grid_w, cells_y, cells_x = _grid_dims(latent_shape, grouping)
        cy = torch.arange(cells_y).view(-1, 1, 1, 1)
        cx = torch.arange(cells_x).view(1, -1, 1, 1)
        dy = torch.arange(_STRIDE).view(1, 1, -1, 1)
        dx = torch.arange(_STRIDE).view(1, 1, 1, -1)
        index = (cy * _STRIDE + dy) * grid_w + cx * _STRIDE + dx  # [cy, cx, dy, dx]
        return cls(n_tokens=n_tokens, grid_w=grid_w, cells=index.reshape(-1, _CELL))


def _grid_dims(latent_shape: tuple[int, ...], grouping: int) -> tuple[int, int, int, int]:
    """(N, tokens per grid row, complete cells down, complete cells across), no allocation."""
    _check_latent_shape(latent_shape, grouping)
    _, _, height, width = latent_shape
    n_tokens = height * width // grouping
    grid_w = max(1, math.ceil(width / math.ceil(math.sqrt(grouping))))
    # cells only in complete rows: raster order may end in a ragged row
    full_rows = n_tokens // grid_w
    return n_tokens, grid_w, full_rows // _STRIDE, grid_w // _STRIDE


def _token_counts(latent_shape: tuple[int, ...], grouping: int) -> tuple[int, int, int]:
    """(N, n_dst, n_src) for a latent shape."""
    n_tokens, _, cells_y, cells_x = _grid_dims(latent_shape, grouping)
    n_dst = cells_y * cells_x
    return n_tokens, n_dst, n_tokens - n_dst


@dataclass(frozen=True)
class MergePlan:
    """Which tokens were merged into which: everything the receiver needs.

    Attributes:
        dst_choice: ``[n_cells]`` int64 in 0..3, the destination position in each cell
            (shared by the batch), or None for the fixed top-left choice.
        merged: ``[B, n_src]`` bool, True for sources merged away (exactly r per row).
        merged_into: ``[B, r]`` int64, destination ordinal (0..n_dst−1) of each merged
            source, sources in ascending order.
    """

    dst_choice: Tensor | None
    merged: Tensor
    merged_into: Tensor


def _check_latent_shape(shape: tuple[int, ...], grouping: int) -> None:
    if grouping < 1:
        raise CodecError(f"grouping must be >= 1, got {grouping}", field="grouping")
    if len(shape) != 4:
        raise CodecError(f"token merging needs a latent [B, C, H, W], got shape {tuple(shape)}")
    if min(shape) < 1:
        raise CodecError(f"token merging needs a non-empty latent, got shape {tuple(shape)}", field="shape")
    if shape[3] % grouping:
        raise CodecError(
            f"latent width {shape[3]} of shape {tuple(shape)} is not a multiple of grouping {grouping}"
        )


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not (0.0 <= ratio <= MAX_MERGE_RATIO):  # also rejects NaN
        raise CodecError(
            f"merge ratio {ratio!r} is outside [0, {MAX_MERGE_RATIO}]", field="merge_ratio"
        )
    return ratio


def merge_count(latent_shape: tuple[int, ...], ratio: float, grouping: int = TOKEN_GROUPING) -> int:
    """r = int(ratio·N), the number of source tokens merged away for this shape.

    Raises:
        CodecError: ratio outside [0, 0.75], bad shape, or r > 0 on a grid without any
            complete 2×2 cell.
    """
    ratio = _check_ratio(ratio)
    n_tokens, n_dst, n_src = _token_counts(tuple(latent_shape), grouping)
    r = int(ratio * n_tokens)
    if r > 0 and n_dst == 0:
        raise CodecError(
            f"latent shape {tuple(latent_shape)} has no complete 2x2 token cell; "
            f"merge ratio {ratio!r} cannot be applied",
            field="merge_ratio",
        )
    return min(r, n_src)


def latent_to_tokens(latent: Tensor, grouping: int = TOKEN_GROUPING) -> Tensor:
    """``[B, C, H, W]`` → ``[B, N, grouping·C]``: each token holds ``grouping`` consecutive
    row elements, channel-minor (element e, channel c at ``e·C + c``), as the MEG reference."""
    _check_latent_shape(tuple(latent.shape), grouping)
    b, c, h, w = latent.shape
    return latent.permute(0, 2, 3, 1).reshape(b, h * w // grouping, grouping * c)


def tokens_to_latent(tokens: Tensor, latent_shape: tuple[int, int, int, int], grouping: int = TOKEN_GROUPING) -> Tensor:
    """Inverse of :func:`latent_to_tokens`: ``[B, N, grouping·C]`` → ``[B, C, H, W]``."""
    b, c, h, w = latent_shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


def unmerge_latent(
    tokens: Tensor, gather_index: Tensor, latent_shape: tuple[int, int, int, int], grouping: int = TOKEN_GROUPING
) -> Tensor:
    """Restore the full latent by copying kept tokens: one gather, then reshape/permute.

    Args:
        tokens: ``[B, M, D]`` kept tokens.
        gather_index: ``[B, N]`` int64 row of ``tokens`` for each original token.
        latent_shape: ``(B, C, H, W)``.
    Returns:
        ``[B, C, H, W]`` latent, dtype of ``tokens``. Exports to ONNX (Gather/Expand/Reshape).
    """
    index = gather_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    return tokens_to_latent(torch.gather(tokens, 1, index), latent_shape, grouping)


def merge_latent(
    latent: Tensor, ratio: float, *, generator: torch.Generator | None = None, grouping: int = TOKEN_GROUPING
) -> MergedLatent:
    """Merge the r = int(ratio·N) most similar source tokens into their destinations.

    Args:
        latent: ``[B, C, H, W]`` float latent, W a multiple of ``grouping``.
        ratio: fraction of all N tokens merged away, 0 ≤ ratio ≤ 0.75.
        generator: draws one destination per 2×2 cell (shared by the batch); None takes
            each cell's top-left token.
    Returns:
        :class:`MergedLatent` with tokens in the latent's dtype. Ratio 0 keeps every token
        and unmerges exactly.
    """
    return merge_latent_with_plan(latent, ratio, generator=generator, grouping=grouping)[0]


def merge_latent_with_plan(
    latent: Tensor, ratio: float, *, generator: torch.Generator | None = None, grouping: int = TOKEN_GROUPING
) -> tuple[MergedLatent, MergePlan]:
    """:func:`merge_latent`, also returning the :class:`MergePlan` that travels as side info.

    The matching runs on a detached CPU copy (the plan is CPU tensors); the averaging runs
    on the latent's device and is differentiable with respect to the latent.
    """
    if not latent.is_floating_point():
        raise CodecError(f"token merging needs a floating-point latent, got {latent.dtype}")
    shape = tuple(int(s) for s in latent.shape)
    r = merge_count(shape, ratio, grouping)
    grid = TokenGrid.for_latent(shape, grouping)
    batch = shape[0]
    tokens = latent_to_tokens(latent, grouping).float()

    dst_choice = None
    if generator is not None and r > 0:  # with nothing merged the choice is not needed
        dst_choice = torch.randint(_CELL, (grid.n_dst,), generator=generator, device=generator.device).cpu()
    dst_idx, src_idx = _dst_src_indices(grid, dst_choice)

    if r == 0:
        plan = MergePlan(
            dst_choice=dst_choice,
            merged=torch.zeros(batch, grid.n_src, dtype=torch.bool),
            merged_into=torch.zeros(batch, 0, dtype=torch.int64),
        )
    else:
        # cosine similarity of every source to every destination; zero tokens get norm 1
        # instead of NaN so that they are simply dissimilar to everything
        cpu_tokens = tokens.detach().cpu()
        metric = cpu_tokens / cpu_tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        best, best_dst = _most_similar(metric[:, src_idx], metric[:, dst_idx])
        # stable sort: equal scores merge the lower token index first, deterministically
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r]
        merged = torch.zeros(batch, grid.n_src, dtype=torch.bool)
        merged.scatter_(1, order, True)
        chosen = merged.nonzero()[:, 1].view(batch, r)  # ascending source ordinals
        plan = MergePlan(dst_choice=dst_choice, merged=merged, merged_into=torch.gather(best_dst, 1, chosen))

    gather_index = gather_index_from_plan(plan, grid).to(latent.device)
    kept_tokens = _average_into_kept(tokens, gather_index, grid.n_tokens - r).to(latent.dtype)
    return (
        MergedLatent(tokens=kept_tokens, gather_index=gather_index, latent_shape=shape, grouping=grouping),  # type: ignore[arg-type]
        plan,
    )


_SCORE_ROWS = 512  # source rows per block: a block of scores stays in cache


def _most_similar(src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """Best cosine similarity of each source and the ordinal of the destination reaching it.

    Args:
        src: ``[B, n_src, D]`` unit-norm source tokens.
        dst: ``[B, n_dst, D]`` unit-norm destination tokens.
    Returns:
        (best ``[B, n_src]`` float32, best_dst ``[B, n_src]`` int64).
    """
    dst_t = dst.transpose(1, 2)
    best, best_dst = [], []
    for start in range(0, src.shape[1], _SCORE_ROWS):
        scores = (src[:, start : start + _SCORE_ROWS] @ dst_t).numpy()  # [B, rows, n_dst]
        # numpy's argmax returns the first maximum (documented, so ties are deterministic)
        # and is several times faster than torch.max with indices on one thread
        index = scores.argmax(axis=-1)
        best.append(np.take_along_axis(scores, index[..., None], axis=-1)[..., 0])
        best_dst.append(index)
    return torch.from_numpy(np.concatenate(best, axis=1)), torch.from_numpy(np.concatenate(best_dst, axis=1))


def _dst_src_indices(grid: TokenGrid, dst_choice: Tensor | None) -> tuple[Tensor, Tensor]:
    """Token indices of destinations (cell order) and sources (ascending)."""
    if dst_choice is None:
        dst_idx = grid.cells[:, 0]
    else:
        dst_idx = torch.gather(grid.cells, 1, dst_choice.view(-1, 1)).view(-1)
    is_dst = torch.zeros(grid.n_tokens, dtype=torch.bool)
    is_dst[dst_idx] = True
    return dst_idx, (~is_dst).nonzero().view(-1)


def gather_index_from_plan(plan: MergePlan, grid: TokenGrid) -> Tensor:
    """``[B, N]`` int64 row in the kept tokens (ascending token order) of every token."""
    dst_idx, src_idx = _dst_src_indices(grid, plan.dst_choice)
    batch = plan.merged.shape[0]
    kept = torch.ones(batch, grid.n_tokens, dtype=torch.bool)
    kept[:, src_idx] = ~plan.merged
    row = kept.cumsum(dim=1) - 1
    merged_tokens = src_idx[plan.merged.nonzero()[:, 1]].view(batch, -1)  # [B, r]
    their_dst = dst_idx[plan.merged_into]  # [B, r] token index of the destination
    row.scatter_(1, merged_tokens, torch.gather(row, 1, their_dst))
    return row


def _average_into_kept(tokens: Tensor, gather_index: Tensor, n_kept: int) -> Tensor:
    """Mean of every group of tokens that share a row of ``gather_index`` → ``[B, M, D]``."""
    batch, _, dim = tokens.shape
    sums = tokens.new_zeros(batch, n_kept, dim).scatter_add(1, gather_index.unsqueeze(-1).expand(-1, -1, dim), tokens)
    counts = tokens.new_zeros(batch, n_kept).scatter_add_(1, gather_index, torch.ones_like(gather_index, dtype=tokens.dtype))
    return sums / counts.unsqueeze(-1)


# --- side information -------------------------------------------------------------------

_FIXED, _RANDOM = 0, 1


def _bits_for(n: int) -> int:
    """Fewest bits that hold the values 0..n−1."""
    return max(1, (n - 1).bit_length()) if n > 1 else 0


def _selection_bits(n_src: int, r: int) -> tuple[bool, int]:
    """(use a bitmask, bits per batch item) for naming r of n_src sources."""
    list_bits = r * _bits_for(n_src)
    return (n_src <= list_bits, min(n_src, list_bits))


def plan_params_bytes(latent_shape: tuple[int, ...], ratio: float, grouping: int, random_dst: bool) -> int:
    """Bytes :func:`pack_plan` writes for this shape: 1 mode byte + the packed bit fields."""
    _, n_dst, n_src = _token_counts(tuple(latent_shape), grouping)
    r = merge_count(latent_shape, ratio, grouping)
    _, select_bits = _selection_bits(n_src, r)
    bits = (2 * n_dst if random_dst else 0) + latent_shape[0] * (select_bits + r * _bits_for(n_dst))
    return 1 + (bits + 7) // 8


def _to_bits(values: Tensor, width: int) -> np.ndarray:
    """LSB-first bits of each value, ``width`` bits each → flat uint8 array of 0/1."""
    if width == 0 or values.numel() == 0:
        return np.zeros(0, dtype=np.uint8)
    v = values.reshape(-1).numpy().astype(np.uint64)
    shifts = np.arange(width, dtype=np.uint64)
    return ((v[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)


def _from_bits(bits: np.ndarray, width: int, count: int) -> np.ndarray:
    """``count`` values of ``width`` bits each (all 0 when width is 0: one possible value)."""
    if width == 0:
        return np.zeros(count, dtype=np.int64)
    weights = np.left_shift(np.int64(1), np.arange(width, dtype=np.int64))
    return (bits.reshape(-1, width).astype(np.int64) * weights).sum(axis=1)


def pack_plan(plan: MergePlan, latent_shape: tuple[int, ...], grouping: int) -> bytes:
    """Serialise a plan with the fewest bits: see the module docstring."""
    _, n_dst, n_src = _token_counts(tuple(latent_shape), grouping)
    r = int(plan.merged_into.shape[1])
    use_mask, _ = _selection_bits(n_src, r)
    fields = []
    if plan.dst_choice is not None:
        fields.append(_to_bits(plan.dst_choice, 2))
    for b in range(plan.merged.shape[0]):
        if use_mask:
            fields.append(plan.merged[b].numpy().astype(np.uint8))
        else:
            fields.append(_to_bits(plan.merged[b].nonzero().view(-1), _bits_for(n_src)))
        fields.append(_to_bits(plan.merged_into[b], _bits_for(n_dst)))
    bits = np.concatenate(fields) if fields else np.zeros(0, dtype=np.uint8)
    mode = _FIXED if plan.dst_choice is None else _RANDOM
    return bytes([mode]) + np.packbits(bits, bitorder="little").tobytes()


def unpack_plan(data: bytes, latent_shape: tuple[int, ...], ratio: float, grouping: int) -> MergePlan:
    """Read a plan written by :func:`pack_plan`, checking every field.

    Raises:
        CorruptPayloadError: wrong length, unknown mode, a selection that does not name
            exactly r distinct sources, or a destination ordinal out of range.
    """
    r = merge_count(latent_shape, ratio, grouping)
    if not data or data[0] not in (_FIXED, _RANDOM):
        raise CorruptPayloadError(
            f"merge side information has mode byte {data[:1].hex() or '(none)'}, expected 00 or 01",
            field="codec_params",
        )
    random_dst = data[0] == _RANDOM
    expected = plan_params_bytes(latent_shape, ratio, grouping, random_dst)
    if len(data) != expected:
        raise CorruptPayloadError(
            f"merge side information is {len(data)} bytes, expected {expected} for shape "
            f"{tuple(latent_shape)} at ratio {ratio!r}",
            field="codec_params",
        )
    _, n_dst, n_src = _token_counts(tuple(latent_shape), grouping)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=1), bitorder="little")
    pos = 0

    def take(n: int) -> np.ndarray:
        nonlocal pos
        out = bits[pos : pos + n]
        pos += n
        return out

    dst_choice = None
    if random_dst:
        dst_choice = torch.from_numpy(_from_bits(take(2 * n_dst), 2, n_dst))
    use_mask, _ = _selection_bits(n_src, r)
    batch = latent_shape[0]
    merged = torch.zeros(batch, n_src, dtype=torch.bool)
    merged_into = torch.zeros(batch, r, dtype=torch.int64)
    for b in range(batch):
        if use_mask:
            row = torch.from_numpy(take(n_src).astype(bool))
        else:
            picked = _from_bits(take(r * _bits_for(n_src)), _bits_for(n_src), r)
            if r and (np.any(np.diff(picked) <= 0) or picked[-1] >= n_src):
                raise CorruptPayloadError(
                    "merge side information lists sources that are not strictly increasing "
                    f"below {n_src}",
                    field="codec_params",
                )
            row = torch.zeros(n_src, dtype=torch.bool)
            row[torch.from_numpy(picked)] = True
        if int(row.sum()) != r:
            raise CorruptPayloadError(
                f"merge side information names {int(row.sum())} merged sources, expected {r}",
                field="codec_params",
            )
        merged[b] = row
        into = _from_bits(take(r * _bits_for(n_dst)), _bits_for(n_dst), r)
        if r and into.max() >= n_dst:
            raise CorruptPayloadError(
                f"merge side information names destination {int(into.max())} of {n_dst}",
                field="codec_params",
            )
        merged_into[b] = torch.from_numpy(into)
    if bits[pos:].any():
        raise CorruptPayloadError("merge side information has non-zero padding bits", field="codec_params")
    return MergePlan(dst_choice=dst_choice, merged=merged, merged_into=merged_into)
