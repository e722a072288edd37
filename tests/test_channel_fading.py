"""Channel models: noise and gain statistics against theory, shapes, blocks, determinism.

Tolerances are five Monte-Carlo standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from meg.channel.awgn import AWGN
from meg.channel.correlated import GaussMarkovFading, jakes_correlation
from meg.channel.rayleigh import RayleighBlockFading, RayleighFading, RayleighFastFading
from meg.channel.rician import RicianFading, rician_gain_moments
from meg.errors import InvalidInputError

N = 200_000




def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_awgn_noise_variance_broadcasts_per_example() -> None:
    x = torch.zeros(3, N, dtype=torch.complex64)
    noise_var = torch.tensor([[0.01], [1.0], [4.0]])
    y = AWGN()(x, noise_var, generator=_gen())
    power = y.abs().square().mean(dim=1).double()
    # |n|^2 is exponential: standard deviation of the mean = noise_var / sqrt(N)
    expected = noise_var.flatten().double()
    assert torch.all((power - expected).abs() < 5 * expected / math.sqrt(N)), power
    # the two quadratures carry half the power each and are uncorrelated
    row = y[1].to(torch.complex128)
    assert abs(row.real.var().item() - 0.5) < 5 * 0.5 * math.sqrt(2 / N)
    assert abs((row.real * row.imag).mean().item()) < 5 * 0.5 / math.sqrt(N)


def test_awgn_is_reproducible_with_a_generator_and_rejects_bad_noise() -> None:
    x = torch.ones(10, dtype=torch.complex64)
    assert torch.equal(AWGN()(x, 0.3, generator=_gen(5)), AWGN()(x, 0.3, generator=_gen(5)))
    assert not torch.equal(AWGN()(x, 0.3, generator=_gen(5)), AWGN()(x, 0.3, generator=_gen(6)))
    assert torch.equal(AWGN()(x, 0.0, generator=_gen()), x)
    with pytest.raises(InvalidInputError, match="-1"):
        AWGN()(x, -1.0)
    with pytest.raises(InvalidInputError, match="nan"):
        AWGN()(x, float("nan"))


def test_rayleigh_power_gain_is_exponential_with_mean_one() -> None:
    h = RayleighFastFading().sample_gains((N,), generator=_gen(1)).to(torch.complex128)
    power = h.abs().square()
    assert abs(power.mean().item() - 1) < 5 / math.sqrt(N)
    assert abs(power.var().item() - 1) < 5 * math.sqrt(8 / N)  # Var of the sample variance of Exp(1) ≈ 8/N
    for threshold in (0.1, 1.0, 3.0):  # P(|h|^2 > x) = e^{-x}
        p = math.exp(-threshold)
        assert abs((power > threshold).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / N)
    assert abs(h.mean().item()) < 5 / math.sqrt(N)


def test_block_fading_holds_each_gain_for_its_block() -> None:
    x = torch.ones(4, 10, dtype=torch.complex64)
    _, h = RayleighFading(block_length=4)(x, 0.0, generator=_gen(), return_gains=True)
    assert h.shape == (4, 10)
    assert torch.equal(h[:, 0:4], h[:, :1].expand(4, 4)) and torch.equal(h[:, 8:10], h[:, 8:9].expand(4, 2))
    assert not torch.equal(h[:, 0], h[:, 4])
    _, per_example = RayleighBlockFading()(x, 0.0, generator=_gen(), return_gains=True)
    assert torch.equal(per_example, per_example[:, :1].expand(4, 10))
    assert torch.unique(per_example[:, 0].real).numel() == 4


def test_returned_gains_are_the_ones_applied() -> None:
    g = _gen(2)
    x = torch.randn(2, 64, dtype=torch.complex64, generator=g)
    y, h = RayleighFastFading()(x, 0.0, generator=g, return_gains=True)
    assert torch.allclose(y, h * x)
    y_noisy = RayleighFastFading()(x, 0.25, generator=_gen(9))
    y_noisy2, h2 = RayleighFastFading()(x, 0.25, generator=_gen(9), return_gains=True)
    assert torch.equal(y_noisy, y_noisy2)
    residual = (y_noisy2 - h2 * x).abs().square().mean()
    assert 0.1 < residual.item() < 0.5


@pytest.mark.parametrize("k_factor", [0.0, 1.0, 3.0, 10.0])
def test_rician_gain_statistics_follow_k(k_factor: float) -> None:
    h = RicianFading(k_factor).sample_gains((N,), generator=_gen(int(k_factor) + 10)).to(torch.complex128)
    power = h.abs().square()
    mean_power, var_power = rician_gain_moments(k_factor)
    assert abs(power.mean().item() - mean_power) < 5 * math.sqrt(var_power / N)
    central4 = ((power - power.mean()) ** 4).mean().item()
    assert abs(power.var().item() - var_power) < 5 * math.sqrt((central4 - var_power**2) / N)
    los = math.sqrt(k_factor / (k_factor + 1))
    scattered_sd = math.sqrt(1 / (2 * (k_factor + 1)) / N)
    assert abs(h.real.mean().item() - los) < 5 * scattered_sd
    assert abs(h.imag.mean().item()) < 5 * scattered_sd
    # K recovered from the moments: K = √(1−v) / (1 − √(1−v)), v = Var|h|^2 (method of moments)
    root = math.sqrt(max(0.0, 1 - power.var().item()))
    assert abs(root / (1 - root) - k_factor) < 0.05 * (1 + k_factor)


def test_rician_phase_and_input_checks() -> None:
    h = RicianFading(1e6, los_phase_rad=math.pi / 2).sample_gains((1000,), generator=_gen())
    assert torch.allclose(h.mean(), torch.tensor(1j, dtype=torch.complex64), atol=1e-2)
    with pytest.raises(InvalidInputError, match="-2"):
        RicianFading(-2.0)
    with pytest.raises(InvalidInputError, match="0"):
        RayleighFading(block_length=0)


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, -0.3])
def test_gauss_markov_correlation_matches_its_parameter(rho: float) -> None:
    n = 50_000
    path = GaussMarkovFading(rho).sample_path(4, (n,), generator=_gen(int(abs(rho) * 10))).to(torch.complex128)
    assert path.shape == (4, n)
    for lag in (1, 3):
        corr = (path[lag] * path[0].conj()).mean()
        # Var(g_k g_0^*) = 1 + ρ^{2k} − ρ^{2k} = 1 for unit CN; the real part carries about half
        assert abs(corr.real.item() - rho**lag) < 5 * math.sqrt(1 / n), (lag, corr)
        assert abs(corr.imag.item()) < 5 * math.sqrt(1 / n)
    # stationary: every step keeps E|h|^2 = 1
    assert abs(path[3].abs().square().mean().item() - 1) < 5 / math.sqrt(n)


def test_gauss_markov_with_line_of_sight_and_state_stepping() -> None:
    process = GaussMarkovFading(0.95, k_factor=3.0)
    g = _gen(4)
    state = process.initial((20_000,), generator=g)
    for _ in range(5):
        state = process.step(state, generator=g)
    h = process.gain(state).to(torch.complex128)
    assert abs(h.real.mean().item() - math.sqrt(0.75)) < 5 * math.sqrt(0.125 / 20_000)
    assert abs(h.abs().square().mean().item() - 1) < 5 * math.sqrt(rician_gain_moments(3.0)[1] / 20_000)
    frozen = GaussMarkovFading(1.0).sample_path(3, (5,), generator=_gen())
    assert torch.equal(frozen[0], frozen[2])
    with pytest.raises(InvalidInputError, match="1.5"):
        GaussMarkovFading(1.5)


def test_jakes_correlation() -> None:
    assert jakes_correlation(0.0, 1.0) == 1.0
    # the first zero of J0 is at 2.4048: f_D T = 2.4048 / (2π)
    assert abs(jakes_correlation(10.0, 2.404825557695773 / (2 * math.pi * 10.0))) < 1e-12
    assert jakes_correlation(5.0, 0.01) == pytest.approx(0.9755, abs=1e-4)  # J0(0.1π)
    with pytest.raises(InvalidInputError, match="-1"):
        jakes_correlation(-1.0, 1.0)


def test_noise_variance_must_broadcast_to_the_signal() -> None:
    with pytest.raises(InvalidInputError, match=r"\(2, 1\)"):
        AWGN()(torch.ones(3, dtype=torch.complex64), torch.ones(2, 1))
    with pytest.raises(InvalidInputError, match=r"\(2,\)"):
        AWGN()(torch.ones(3, dtype=torch.complex64), torch.ones(2))
