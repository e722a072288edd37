"""Captions, synonyms, word orders and unknown-word reporting."""

from __future__ import annotations

import numpy as np

from meg.models.captions import (
    PromptObject,
    caption_scene,
    normalize_prompt,
    parse_prompt,
    unknown_words,
)
from meg.models.family import build_tokenizer
from meg.models.world import WorldConfig, sample_scenes


def test_every_generated_caption_parses_back_to_what_it_mentions() -> None:
    scenes = sample_scenes(400, 11)
    rng = np.random.default_rng(0)
    for i in range(len(scenes)):
        text, spec = caption_scene(scenes, i, rng)
        parsed = parse_prompt(text)
        assert parsed == spec, text
        assert parsed.unknown_words == (), text


def test_heldout_captions_parse_too() -> None:
    scenes = sample_scenes(100, 12, WorldConfig(heldout=True))
    rng = np.random.default_rng(1)
    for i in range(len(scenes)):
        text, spec = caption_scene(scenes, i, rng)
        assert parse_prompt(text) == spec


def test_synonyms_and_word_orders_map_to_the_same_concepts() -> None:
    want = PromptObject(colour="red", shape="circle", size="large", position="top left")
    for text in (
        "a large red circle at the top left",
        "a big crimson disc in the upper left corner",
        "top-left: a huge scarlet circle",
        "a circle, red and large, upper left",
        "a large circle that is ruby at the left top",
    ):
        assert parse_prompt(text).objects == (want,), text


def test_positions_textures_and_background_words() -> None:
    spec = parse_prompt("a blue star at the top side and a green ring on the left on a striped grey background")
    assert [o.position for o in spec.objects] == ["top", "left"]
    assert (spec.texture, spec.bg_colour) == ("stripes", "gray")
    assert parse_prompt("an azure star at the top, checkerboard backdrop").texture == "checkers"
    assert parse_prompt("a pink plus in the middle").objects[0] == PromptObject(colour="pink", shape="cross", position="center")


def test_unknown_words_are_reported_not_dropped() -> None:
    text = "a red circle next to a giraffe, photorealistic"
    assert unknown_words(text) == ["giraffe", "photorealistic"]
    canonical, unknown = normalize_prompt(text)
    assert canonical == "a red circle" and unknown == ["giraffe", "photorealistic"]
    tok = build_tokenizer()
    ids = tok(text).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens.count("[UNK]") == 2 and "giraffe" not in tokens
    assert tokens[0] == "[BOS]" and tokens[-1] == "[EOS]" and "circle" in tokens


def test_canonical_form_parses_to_itself() -> None:
    spec = parse_prompt("on a noisy beige background: a tiny lemon box bottom-right, a teal hoop centered")
    again = parse_prompt(spec.canonical())
    assert again == spec
    assert spec.canonical() == "a small yellow square at the bottom right and a cyan ring in the center on a noisy beige background"
