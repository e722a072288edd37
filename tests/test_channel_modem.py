"""Modems: Gray labelling, unit energy, exact round trip, input checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meg.channel.modem import BITS_PER_SYMBOL, Modem
from meg.errors import InvalidInputError

MODULATIONS = ["bpsk", "qpsk", "16qam", "64qam"]




@pytest.mark.parametrize("modulation", MODULATIONS)
def test_constellation_has_unit_energy_and_distinct_points(modulation: str) -> None:
    points, labels = Modem(modulation).constellation()
    assert points.shape == (1 << BITS_PER_SYMBOL[modulation],)
    assert torch.allclose(points.abs().square().mean(), torch.tensor(1.0), atol=1e-6)
    assert torch.unique(torch.view_as_real(points), dim=0).shape[0] == points.shape[0]
    assert labels.shape == (points.shape[0], BITS_PER_SYMBOL[modulation])


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_nearest_neighbours_differ_in_exactly_one_bit(modulation: str) -> None:
    points, labels = Modem(modulation).constellation()
    distance = (points[:, None] - points[None, :]).abs()
    distance.fill_diagonal_(float("inf"))
    nearest = distance.min(dim=1).values
    for i in range(points.shape[0]):
        neighbours = torch.nonzero(torch.isclose(distance[i], nearest[i], rtol=1e-4)).flatten()
        assert len(neighbours) >= 1
        for j in neighbours:
            assert int((labels[i] != labels[j]).sum()) == 1, (modulation, i, int(j))


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_round_trip_is_exact_without_noise_and_with_small_noise(modulation: str) -> None:
    g = torch.Generator().manual_seed(3)
    modem = Modem(modulation)
    bits = torch.randint(0, 2, (4, 60 * modem.bits_per_symbol), generator=g, dtype=torch.uint8)
    symbols = modem.modulate(bits)
    assert symbols.shape == (4, 60) and symbols.dtype == torch.complex64
    assert torch.equal(modem.demodulate(symbols), bits)
    # noise well inside the decision regions (half distance of 64-QAM is 0.154)
    jitter = torch.complex(torch.rand(symbols.shape, generator=g), torch.rand(symbols.shape, generator=g)) * 0.1 - (0.05 + 0.05j)
    assert torch.equal(modem.demodulate(symbols + jitter), bits)


def test_far_outside_points_decide_to_the_edge_symbol() -> None:
    modem = Modem("16qam")
    corner = modem.modulate(torch.tensor([1, 0, 1, 0], dtype=torch.uint8))
    assert torch.equal(modem.demodulate(corner * 10), torch.tensor([1, 0, 1, 0], dtype=torch.uint8))


def test_bpsk_uses_the_real_axis() -> None:
    symbols = Modem("bpsk").modulate(torch.tensor([0, 1], dtype=torch.uint8))
    assert torch.equal(symbols, torch.tensor([-1 + 0j, 1 + 0j], dtype=torch.complex64))


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(InvalidInputError, match="8psk"):
        Modem("8psk")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="multiple of 4"):
        Modem("16qam").modulate(torch.ones(6, dtype=torch.uint8))
    with pytest.raises(InvalidInputError, match="float32"):
        Modem("qpsk").modulate(torch.ones(4))


@settings(max_examples=40, deadline=None)
@given(
    modulation=st.sampled_from(MODULATIONS),
    lead=st.lists(st.integers(min_value=1, max_value=3), max_size=2),
    symbols=st.integers(min_value=1, max_value=17),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_round_trip_for_any_shape(modulation: str, lead: list[int], symbols: int, seed: int) -> None:
    modem = Modem(modulation)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (*lead, symbols * modem.bits_per_symbol), generator=g, dtype=torch.uint8)
    out = modem.modulate(bits)
    assert out.shape == (*lead, symbols)
    assert torch.equal(modem.demodulate(out), bits)
