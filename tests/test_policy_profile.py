"""The distortion profiler runs the real split pipeline and measures what it claims."""

from __future__ import annotations

import pytest
from policy_helpers import one_thread

from meg.errors import InvalidInputError
from meg.policy.distortion import DistortionTable
from meg.policy.measure_distortion import ProfileConfig, profile_distortion

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def test_profile_tiny_random_grid() -> None:
    config = ProfileConfig(prompts=("a red cube",), steps=(2, 3), reference_steps=3, merge_ratios=(0.0, 0.5),
                           noise_sigmas=(0.0, 0.3), cost_resolutions=(64,))
    table = profile_distortion(config)
    assert isinstance(table, DistortionTable) and table.model == "tiny-random"
    mse = {(p.split, p.steps, p.merge_ratio, p.noise_sigma): p.mse for p in table.points}
    assert len(mse) == 2 * (1 + 1 + 2 * 2)
    # the unsplit reference itself: bit-exact on the device; the 8-bit image only rounds
    assert mse[("device", 3, 0.0, 0.0)] == 0.0
    assert 0.0 < mse[("image", 3, 0.0, 0.0)] < (1 / 255) ** 2
    assert mse[("decoder", 3, 0.0, 0.0)] == pytest.approx(0.0, abs=1e-10)
    # fewer steps, merging and channel noise each add distortion
    assert mse[("device", 2, 0.0, 0.0)] > 1e-6
    assert mse[("decoder", 3, 0.5, 0.0)] > mse[("decoder", 3, 0.0, 0.0)]
    assert mse[("decoder", 3, 0.0, 0.3)] > mse[("decoder", 3, 0.0, 0.0)]
    # FLOPs per partition: the decoder split moves the denoising to the edge
    assert table.flops["decoder@3"]["edge_flops"] > table.flops["decoder@3"]["device_flops"] > 0
    assert table.flops["device@3"]["edge_flops"] == 0
    assert table.cost_flops["by_resolution"]["64"]["unet_pass_flops"] > 0


def test_profile_rejects_a_reference_below_the_grid() -> None:
    with pytest.raises(InvalidInputError, match="reference_steps 3"):
        profile_distortion(ProfileConfig(steps=(2, 4), reference_steps=3))
