"""MEG token merging: layout, matching, averaging, side information, ONNX unmerge."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meg.codecs import (
    MergedLatent,
    latent_to_tokens,
    merge_latent,
    tokens_to_latent,
    unmerge_latent,
)
from meg.codecs.merge import (
    TokenGrid,
    gather_index_from_plan,
    merge_count,
    merge_latent_with_plan,
    pack_plan,
    plan_params_bytes,
    unpack_plan,
)
from meg.errors import CodecError, CorruptPayloadError

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _latent(shape: tuple[int, int, int, int] = (1, 4, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_tokens_are_four_row_elements_by_channels() -> None:
    latent = _latent((2, 4, 8, 8))
    tokens = latent_to_tokens(latent)
    assert tokens.shape == (2, 16, 16)
    # token 1 of batch 1: row 0, columns 4..7, channel-minor (element e, channel c at 4e + c)
    assert tokens[1, 1].equal(latent[1, :, 0, 4:8].T.reshape(-1))
    # the MEG reference reshape: [B, H·W, C] → [B, H·W/4, 4C]
    reference = latent.permute(0, 2, 3, 1).reshape(2, 64, 4).reshape(2, 16, 16)
    assert tokens.equal(reference)
    assert tokens_to_latent(tokens, (2, 4, 8, 8)).equal(latent)
    assert latent_to_tokens(latent, grouping=2).shape == (2, 32, 8)


def test_grid_of_the_mebs_sdxl_latent() -> None:
    """128×128 latent, grouping 4: a 64×64 grid, 1024 destinations, 3072 sources."""
    grid = TokenGrid.for_latent((1, 4, 128, 128), 4)
    assert (grid.n_tokens, grid.grid_w, grid.n_dst, grid.n_src) == (4096, 64, 1024, 3072)
    assert merge_count((1, 4, 128, 128), 0.75) == 3072
    # each cell's four tokens are a 2×2 block of the grid
    assert grid.cells[0].tolist() == [0, 1, 64, 65]
    assert grid.cells[33].tolist() == [130, 131, 194, 195]


def test_every_complete_cell_holds_exactly_one_destination() -> None:
    shape = (1, 4, 12, 20)  # 60 tokens, grid rows of 10: 3 rows of cells, 5 across
    grid = TokenGrid.for_latent(shape, 4)
    assert grid.n_dst == 15
    merged, plan = merge_latent_with_plan(_latent(shape), 0.5, generator=torch.Generator().manual_seed(4))
    assert plan.dst_choice is not None and plan.dst_choice.shape == (15,)
    dst_tokens = torch.gather(grid.cells, 1, plan.dst_choice.view(-1, 1)).view(-1)
    # destinations keep their own row; every token's row holds a destination or itself
    rows = merged.gather_index[0]
    assert len(set(rows[dst_tokens].tolist())) == 15
    _, fixed_plan = merge_latent_with_plan(_latent(shape), 0.5)
    assert fixed_plan.dst_choice is None


def test_generator_decides_destinations_deterministically() -> None:
    latent = _latent((1, 4, 16, 16))
    a = merge_latent(latent, 0.5, generator=torch.Generator().manual_seed(7))
    b = merge_latent(latent, 0.5, generator=torch.Generator().manual_seed(7))
    c = merge_latent(latent, 0.5, generator=torch.Generator().manual_seed(8))
    assert a.gather_index.equal(b.gather_index) and a.tokens.equal(b.tokens)
    assert not a.gather_index.equal(c.gather_index)


@SETTINGS
@given(
    b=st.integers(1, 2), c=st.integers(1, 4), h=st.integers(1, 10), wq=st.integers(1, 5),
    ratio=st.floats(0, 0.75), seed=st.integers(0, 100), random_dst=st.booleans(),
)
def test_merge_keeps_n_minus_r_tokens_and_unmerges_consistently(
    b: int, c: int, h: int, wq: int, ratio: float, seed: int, random_dst: bool
) -> None:
    shape = (b, c, h, 4 * wq)
    latent = _latent(shape, seed)
    n = h * wq
    generator = torch.Generator().manual_seed(seed) if random_dst else None
    try:
        merged, plan = merge_latent_with_plan(latent, ratio, generator=generator)
    except CodecError as exc:  # no complete 2×2 cell on this grid
        assert TokenGrid.for_latent(shape, 4).n_dst == 0 and int(ratio * n) > 0
        assert "no complete 2x2 token cell" in exc.message
        return
    r = int(ratio * n)
    assert merged.tokens.shape == (b, n - r, 4 * c)
    assert merged.gather_index.shape == (b, n)
    # every row is used; kept tokens (destinations and unmerged sources) hold rows 0..M-1
    # in their original order, and each merged source points at its destination's row
    grid = TokenGrid.for_latent(shape, 4)
    dst = grid.cells[:, 0] if plan.dst_choice is None else torch.gather(grid.cells, 1, plan.dst_choice.view(-1, 1)).view(-1)
    src = torch.tensor([t for t in range(n) if t not in set(dst.tolist())], dtype=torch.int64)
    for i, row in enumerate(merged.gather_index):
        assert set(row.tolist()) == set(range(n - r))
        kept = torch.ones(n, dtype=torch.bool)
        kept[src[plan.merged[i]]] = False
        assert row[kept].equal(torch.arange(n - r))
        assert row[src[plan.merged[i]]].equal(row[dst[plan.merged_into[i]]])
    # the side information rebuilds the same gather index
    data = pack_plan(plan, shape, 4)
    assert len(data) == plan_params_bytes(shape, ratio, 4, generator is not None and r > 0)
    again = unpack_plan(data, shape, ratio, 4)
    assert gather_index_from_plan(again, TokenGrid.for_latent(shape, 4)).equal(merged.gather_index)
    out = unmerge_latent(merged.tokens, merged.gather_index, merged.latent_shape)
    assert out.shape == latent.shape
    if r == 0:
        assert out.equal(latent)


def _naive_merge(latent: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bipartite soft matching written out token by token (fixed top-left destinations)."""
    tokens = latent_to_tokens(latent)[0].double()
    grid = TokenGrid.for_latent(tuple(latent.shape), 4)
    dst = grid.cells[:, 0].tolist()
    src = [t for t in range(grid.n_tokens) if t not in dst]
    unit = tokens / tokens.norm(dim=1, keepdim=True)
    best = []
    for s in src:
        sims = [float(unit[s] @ unit[d]) for d in dst]
        best.append((max(sims), -s, s, dst[int(np.argmax(sims))]))
    r = int(ratio * grid.n_tokens)
    merged = sorted(best, reverse=True)[:r]
    out = tokens.clone()
    groups: dict[int, list[int]] = {d: [d] for d in dst}
    for _, _, s, d in merged:
        groups[d].append(s)
    for members in groups.values():
        out[members] = tokens[members].mean(dim=0)
    return tokens_to_latent(out[None], tuple(latent.shape)).float()


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75])
def test_merge_matches_naive_bipartite_soft_matching(ratio: float) -> None:
    latent = _latent((1, 4, 8, 16), seed=11)
    merged = merge_latent(latent, ratio)
    out = unmerge_latent(merged.tokens, merged.gather_index, merged.latent_shape)
    torch.testing.assert_close(out, _naive_merge(latent, ratio), rtol=1e-5, atol=1e-6)


def test_identical_tokens_merge_without_loss() -> None:
    # each 2×2 cell of the grid is one repeated token: merging 3/4 loses nothing
    grid = TokenGrid.for_latent((1, 4, 8, 8), 4)  # 16 tokens, rows of 4, 4 cells
    cell_values = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    token_values = torch.empty(16, 16)
    for cell, members in enumerate(grid.cells.tolist()):
        token_values[members] = cell_values[cell]
    latent = tokens_to_latent(token_values[None], (1, 4, 8, 8))
    merged = merge_latent(latent, 0.75, generator=torch.Generator().manual_seed(2))
    assert merged.tokens.shape == (1, 4, 16)
    torch.testing.assert_close(unmerge_latent(merged.tokens, merged.gather_index, (1, 4, 8, 8)), latent)


def test_ratio_out_of_range_names_the_value() -> None:
    latent = _latent()
    for bad in (0.76, 1.0, -0.1, float("nan")):
        with pytest.raises(CodecError, match=f"merge ratio {bad!r}") as info:
            merge_latent(latent, bad)
        assert info.value.field == "merge_ratio"
    merge_latent(latent, 0.75)


def test_bad_latents_are_rejected() -> None:
    with pytest.raises(CodecError, match="floating-point latent"):
        merge_latent(torch.zeros(1, 4, 8, 8, dtype=torch.int32), 0.5)
    with pytest.raises(CodecError, match=r"got shape \(4, 8, 8\)"):
        merge_latent(torch.zeros(4, 8, 8), 0.5)
    with pytest.raises(CodecError, match="no complete 2x2 token cell"):
        merge_latent(torch.zeros(1, 4, 1, 8), 0.5)


def test_side_information_is_smaller_than_megs_16_bits_per_merged_token() -> None:
    shape = (1, 4, 128, 128)
    r = merge_count(shape, 0.5)
    assert r == 2048
    fixed = plan_params_bytes(shape, 0.5, 4, random_dst=False)
    random = plan_params_bytes(shape, 0.5, 4, random_dst=True)
    # 3072-bit source mask + 2048 × 10-bit destinations (+ 2 bits per cell when random)
    assert fixed == 1 + (3072 + 2048 * 10) // 8
    assert random == fixed + 1024 * 2 // 8
    assert 8 * random < 16 * r


def test_corrupt_side_information_is_rejected() -> None:
    shape = (1, 4, 16, 16)
    _, plan = merge_latent_with_plan(_latent(shape), 0.5, generator=torch.Generator().manual_seed(0))
    data = bytearray(pack_plan(plan, shape, 4))
    with pytest.raises(CorruptPayloadError, match="mode byte 07"):
        unpack_plan(bytes([7]) + bytes(data[1:]), shape, 0.5, 4)
    with pytest.raises(CorruptPayloadError, match="expected"):
        unpack_plan(bytes(data[:-1]), shape, 0.5, 4)
    flipped = bytearray(data)
    # 16 cells × 2 bits of destination choice, then the 48-bit source mask: flip one of its bits
    flipped[1 + (16 * 2) // 8] ^= 0x01
    with pytest.raises(CorruptPayloadError, match="merged sources, expected 32"):
        unpack_plan(bytes(flipped), shape, 0.5, 4)


def test_unmerge_exports_to_onnx_and_matches_torch() -> None:
    import onnxruntime

    shape = (1, 4, 16, 16)

    class Unmerge(torch.nn.Module):
        def forward(self, tokens: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
            return unmerge_latent(tokens, gather_index, shape)

    example = merge_latent(_latent(shape, 1), 0.5, generator=torch.Generator().manual_seed(1))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Unmerge(), (example.tokens, example.gather_index), buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=["tokens", "gather_index"], output_names=["latent"],
        )
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    # a different latent and a different merge pattern through the same graph
    other: MergedLatent = merge_latent(_latent(shape, 2), 0.5, generator=torch.Generator().manual_seed(9))
    (out,) = session.run(None, {"tokens": other.tokens.numpy(), "gather_index": other.gather_index.numpy()})
    expected = unmerge_latent(other.tokens, other.gather_index, shape)
    assert torch.from_numpy(out).equal(expected)


def test_merge_is_differentiable_with_respect_to_the_latent() -> None:
    latent = _latent((1, 4, 8, 8)).requires_grad_(True)
    merged = merge_latent(latent, 0.5, generator=torch.Generator().manual_seed(0))
    unmerge_latent(merged.tokens, merged.gather_index, merged.latent_shape).sum().backward()
    assert latent.grad is not None
    # every element reaches the output exactly once through the average of its group
    torch.testing.assert_close(latent.grad.sum(), torch.tensor(float(latent.numel())))
