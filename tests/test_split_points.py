"""Split point strings: parsing, canonical text, range checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meg.errors import SplitError
from meg.split.points import SplitPoint


@pytest.mark.parametrize(
    ("text", "point"),
    [
        ("device", SplitPoint("device")),
        ("decoder", SplitPoint("decoder")),
        ("image", SplitPoint("image")),
        ("step:3", SplitPoint("step", 3)),
        ("unet:2", SplitPoint("unet", 2)),
    ],
)
def test_parse_and_canonical_text(text: str, point: SplitPoint) -> None:
    assert SplitPoint.parse(text) == point
    assert str(point) == text


@given(st.sampled_from(["step", "unet"]), st.integers(min_value=1, max_value=10_000))
def test_roundtrip_indexed(kind: str, index: int) -> None:
    point = SplitPoint(kind, index)  # type: ignore[arg-type]
    assert SplitPoint.parse(str(point)) == point


@pytest.mark.parametrize("text", ["", "edge", "step", "step:0", "step:-1", "unet:", "decoder:1", "step:x", "Step:1"])
def test_bad_text_raises_naming_it(text: str) -> None:
    with pytest.raises(SplitError) as info:
        SplitPoint.parse(text)
    assert repr(text) in str(info.value) or str(text) in str(info.value)
    assert info.value.field == "split"


def test_index_rules() -> None:
    with pytest.raises(SplitError, match="takes no index"):
        SplitPoint("decoder", 2)
    with pytest.raises(SplitError, match="index >= 1"):
        SplitPoint("step", 0)
    with pytest.raises(SplitError, match="unknown split kind"):
        SplitPoint("middle")  # type: ignore[arg-type]


def test_validate_ranges() -> None:
    SplitPoint("step", 3).validate(steps=4, unet_blocks=5)
    with pytest.raises(SplitError, match="step:4"):
        SplitPoint("step", 4).validate(steps=4, unet_blocks=5)
    SplitPoint("unet", 4).validate(steps=4, unet_blocks=5)
    with pytest.raises(SplitError, match="unet:5"):
        SplitPoint("unet", 5).validate(steps=4, unet_blocks=5)
