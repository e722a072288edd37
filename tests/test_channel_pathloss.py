"""Link budget: path loss, noise as total power or density, MEG's operating points."""

from __future__ import annotations

import math

import pytest
import torch

from meg.channel.pathloss import MEG_LINK_BUDGET, LinkBudget, log_distance_path_loss_db
from meg.errors import InvalidInputError


def test_meg_operating_points() -> None:
    assert MEG_LINK_BUDGET.path_loss_db(200.0) == pytest.approx(35.3 + 37.6 * math.log10(200))
    assert MEG_LINK_BUDGET.snr_db(200.0) == pytest.approx(2.2, abs=0.05)
    assert MEG_LINK_BUDGET.snr_db(300.0) == pytest.approx(-4.4, abs=0.05)
    assert MEG_LINK_BUDGET.rate_bps(200.0) == pytest.approx(1.41e6, rel=0.01)
    assert MEG_LINK_BUDGET.rate_bps(300.0) == pytest.approx(0.44e6, rel=0.01)


def test_noise_density_and_total_noise_agree() -> None:
    psd = LinkBudget.from_noise_psd(-154.0)
    assert psd.noise_power_dbm == pytest.approx(-94.0)
    assert psd.snr_db(250.0) == pytest.approx(MEG_LINK_BUDGET.snr_db(250.0))
    wide = LinkBudget(noise_dbm_hz=-154.0, bandwidth_hz=10e6)
    assert wide.snr_db(250.0) == pytest.approx(MEG_LINK_BUDGET.snr_db(250.0) - 10.0)
    assert MEG_LINK_BUDGET.with_tx_power(33.0).snr_db(250.0) == pytest.approx(MEG_LINK_BUDGET.snr_db(250.0) + 3.0)


def test_tensor_distances_and_slope() -> None:
    d = torch.tensor([10.0, 100.0, 1000.0], dtype=torch.float64)
    snr = MEG_LINK_BUDGET.snr_db(d)
    assert isinstance(snr, torch.Tensor)
    assert torch.allclose(snr[:-1] - snr[1:], torch.tensor([37.6, 37.6], dtype=torch.float64))
    assert log_distance_path_loss_db(1.0, 40.0, 20.0) == 40.0


def test_bad_values_name_themselves() -> None:
    with pytest.raises(InvalidInputError, match="-5") as info:
        MEG_LINK_BUDGET.snr_db(-5.0)
    assert info.value.field == "distance_m"
    with pytest.raises(InvalidInputError, match="bandwidth_hz"):
        LinkBudget(bandwidth_hz=0.0)
    with pytest.raises(InvalidInputError, match="distance_m"):
        MEG_LINK_BUDGET.path_loss_db(torch.tensor([1.0, 0.0]))
