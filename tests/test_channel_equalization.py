"""Zero-forcing and MMSE equalisation: bias and mean squared error against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from meg.channel.awgn import AWGN
from meg.channel.equalization import equalize, mmse_equalize, zf_equalize
from meg.channel.modem import Modem
from meg.channel.rayleigh import RayleighFastFading
from meg.errors import InvalidInputError

N = 200_000




def _qpsk(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return Modem("qpsk").modulate(torch.randint(0, 2, (2 * N,), generator=g, dtype=torch.uint8))


@pytest.mark.parametrize("gain", [1.0 + 0.0j, 0.3 - 0.4j, 2.0j])
def test_fixed_gain_error_variances(gain: complex) -> None:
    noise_var = 0.2
    x = _qpsk(1)
    h = torch.full_like(x, gain)
    y = AWGN()(h * x, noise_var, generator=torch.Generator().manual_seed(2))
    power = abs(gain) ** 2
    x_zf, var_zf = zf_equalize(y, h, noise_var)
    x_mmse, var_mmse = mmse_equalize(y, h, noise_var)
    assert torch.allclose(var_zf, torch.tensor(noise_var / power))
    assert torch.allclose(var_mmse, torch.tensor(noise_var / (power + noise_var)))
    for estimate, variance in ((x_zf, noise_var / power), (x_mmse, noise_var / (power + noise_var))):
        mse = (estimate - x).to(torch.complex128).abs().square().mean().item()
        # the squared error is about exponential: its mean has standard error ≈ variance/√N
        assert abs(mse - variance) < 5 * 2 * variance / math.sqrt(N)
    # ZF is unbiased, MMSE shrinks by β = |h|^2 / (|h|^2 + N0)
    beta = power / (power + noise_var)
    assert abs((x_zf * x.conj()).mean().real.item() - 1) < 0.01
    assert abs((x_mmse * x.conj()).mean().real.item() - beta) < 0.01


def test_mmse_beats_zf_under_rayleigh_and_decisions_agree() -> None:
    noise_var = 0.1
    x = _qpsk(3)
    y, h = RayleighFastFading()(x, noise_var, generator=torch.Generator().manual_seed(4), return_gains=True)
    x_zf, _ = equalize(y, h, noise_var, "zf")
    x_mmse, mse_mmse = equalize(y, h, noise_var, "mmse")
    err_zf = (x_zf - x).abs().square().mean().item()
    err_mmse = (x_mmse - x).abs().square().mean().item()
    assert err_mmse < 0.5 * err_zf  # ZF's error blows up in deep fades
    assert abs(err_mmse - mse_mmse.mean().item()) < 0.01
    modem = Modem("qpsk")
    assert torch.equal(modem.demodulate(x_zf), modem.demodulate(x_mmse))  # a positive rescaling


def test_per_example_noise_variance_and_bad_method() -> None:
    y = torch.ones(2, 3, dtype=torch.complex64)
    h = torch.full((2, 3), 2.0 + 0j)
    _, variance = mmse_equalize(y, h, torch.tensor([[0.0], [4.0]]))
    assert torch.allclose(variance, torch.tensor([[0.0] * 3, [0.5] * 3]))
    with pytest.raises(InvalidInputError, match="ml"):
        equalize(y, h, 0.1, "ml")  # type: ignore[arg-type]
