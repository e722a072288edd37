"""One tokenizer, many threads: engines over one pipeline and the prompt check share its lock."""

from __future__ import annotations

import threading

import torch

import meg.models  # noqa: F401  (registers meg-tiny)
from meg.recipes.preview_refine import check_prompt
from meg.split import GenerationInputs, SplitEngine, load_pipeline


def test_engines_sharing_a_fast_tokenizer_and_the_prompt_check_never_race() -> None:
    pipeline = load_pipeline("meg-tiny")
    first, second = SplitEngine(pipeline), SplitEngine(pipeline)
    prompts = ["a red circle on the left", "a tiny blue star at the top right on a gray background with stripes"]
    expected = {p: first._token_ids(first.tokenizer, [p]) for p in prompts}
    errors: list[BaseException] = []

    def encode(engine: SplitEngine, n: int) -> None:
        try:
            for i in range(n):
                p = prompts[i % 2]
                assert torch.equal(engine._token_ids(engine.tokenizer, [p]), expected[p])
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def check(n: int) -> None:
        try:
            for i in range(n):
                check_prompt(prompts[i % 2], pipeline.tokenizer)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=encode, args=(first, 300)), threading.Thread(target=encode, args=(second, 300)),
               threading.Thread(target=check, args=(300,)), threading.Thread(target=check, args=(300,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    # and the engines still generate what they generated alone
    inputs = GenerationInputs(prompt=prompts[0], seed=0, height=128, width=128, steps=1)
    assert torch.equal(first.encode_text(inputs).prompt_embeds, second.encode_text(inputs).prompt_embeds)
