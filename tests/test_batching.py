"""Step-level batching of the edge UNet across concurrent requests (`meg.split.batching`)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from meg.errors import DeadlineExceededError, InvalidInputError
from meg.split.batching import StepBatcher
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.points import SplitPoint


def _run_concurrently(fns: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    return results


# different seeds, prompts, step counts, guidance (with and without CFG) and split kinds
REQUESTS = [
    (GenerationInputs("a red circle", seed=1, steps=4, guidance_scale=2.5), SplitPoint("decoder")),
    (GenerationInputs("a blue square", seed=2, steps=2, guidance_scale=4.0), SplitPoint("decoder")),
    (GenerationInputs("a green star", seed=3, steps=3, guidance_scale=1.0), SplitPoint("step", 2)),
    (GenerationInputs("two crosses", seed=4, steps=4, guidance_scale=2.5), SplitPoint("step", 3)),
    (GenerationInputs("a ring", seed=5, steps=1, guidance_scale=2.5), SplitPoint("decoder")),
]


@pytest.mark.parametrize("tome_ratio", [0.0, 0.5])
def test_batched_requests_equal_their_unbatched_results(engine: SplitEngine, tome_ratio: float) -> None:
    alone = [engine.run_edge(inputs, split, tome_ratio=tome_ratio) for inputs, split in REQUESTS]
    batcher = engine.enable_batching(max_batch=8, max_wait_s=0.05)
    try:
        together = _run_concurrently([lambda i=i, s=s: engine.run_edge(i, s, tome_ratio=tome_ratio) for i, s in REQUESTS])
    finally:
        engine.disable_batching()
    assert batcher.stats.forwards < batcher.stats.calls  # calls were really shared
    assert max(batcher.stats.sizes) >= 3
    for single, batched in zip(alone, together, strict=True):
        assert not isinstance(batched, BaseException), batched
        assert single.keys() == batched.keys()
        for name in single:
            assert torch.allclose(single[name], batched[name], atol=1e-5, rtol=0), (name, (single[name] - batched[name]).abs().max())


def test_row_groups_draw_each_requests_own_tome_pattern(engine: SplitEngine) -> None:
    # the same request alone and batched next to others gets the same merge pattern: a
    # batch with a shared pattern (tomesd's) would differ for all but one row group
    inputs, split = REQUESTS[0]
    alone = engine.run_edge(inputs, split, tome_ratio=0.5)["latents"]
    other = engine.run_edge(inputs, split, tome_ratio=0.0)["latents"]
    assert (alone - other).abs().max() > 1e-4  # ToMe changes the result, so the pattern matters
    engine.enable_batching(max_batch=4, max_wait_s=0.2)
    try:
        out = _run_concurrently([lambda: engine.run_edge(inputs, split, tome_ratio=0.5),
                                 lambda: engine.run_edge(REQUESTS[3][0], SplitPoint("decoder"), tome_ratio=0.5)])  # fmt: skip
    finally:
        engine.disable_batching()
    assert torch.allclose(out[0]["latents"], alone, atol=1e-5, rtol=0)


def test_a_stopped_request_does_not_disturb_the_others(engine: SplitEngine) -> None:
    inputs, split = REQUESTS[0]
    alone = engine.run_edge(inputs, split, tome_ratio=0.5)
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    engine.enable_batching(max_batch=4, max_wait_s=0.05)
    try:
        out = _run_concurrently([lambda: engine.run_edge(inputs, split, tome_ratio=0.5),
                                 lambda: engine.run_edge(REQUESTS[3][0], split, tome_ratio=0.5, should_stop=stop_after_two)])  # fmt: skip
    finally:
        engine.disable_batching()
    assert isinstance(out[1], DeadlineExceededError)
    assert torch.allclose(out[0]["latents"], alone["latents"], atol=1e-5, rtol=0)


def test_a_failing_forward_reaches_every_caller_of_its_batch_and_the_batcher_goes_on(engine: SplitEngine) -> None:
    batcher = StepBatcher(engine.unet, engine.tome, max_batch=4, max_wait_s=0.01)
    try:
        x = torch.randn(1, 4, 8, 8)
        bad = batcher.call  # an embedding of the wrong width makes the forward pass raise
        with pytest.raises(Exception):  # noqa: B017, PT011 - the UNet's own error
            bad(x, torch.tensor(10), torch.randn(1, 7, 3))
        inputs = REQUESTS[1][0]
        cond = engine.encode_text(inputs)
        out = batcher.call(torch.randn(2, 4, 8, 8), torch.tensor(10), cond.prompt_embeds)
        assert out.shape == (2, 4, 8, 8)
    finally:
        batcher.close()


def test_bad_batcher_settings_are_refused(engine: SplitEngine) -> None:
    with pytest.raises(InvalidInputError, match="max_batch = 0"):
        StepBatcher(engine.unet, engine.tome, max_batch=0)
    with pytest.raises(InvalidInputError, match="max_wait_s = -1"):
        StepBatcher(engine.unet, engine.tome, max_wait_s=-1)
