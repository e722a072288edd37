"""The independent evaluation prompt writer, the augmented training captions, and prompt sets with ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from meg.errors import InvalidInputError
from meg.models.captions import (
    PromptObject,
    PromptSpec,
    caption_scene,
    parse_prompt,
    prompt_words,
    unknown_words,
)
from meg.models.evaluate import ground_truth_fidelity, read_prompt_set
from meg.models.paraphrase import NOISE_WORDS, paraphrase_scene
from meg.models.prompt_writer import (
    MAX_WORDS,
    load_prompt_set,
    save_prompt_set,
    write_prompt,
    write_prompt_set,
)
from meg.models.registry import MODELS_ROOT
from meg.models.world import HELDOUT_PAIRS, sample_scenes

SHIPPED = MODELS_ROOT / "meg-tiny" / "prompts"
# constructions only the evaluation writer uses
WRITER_ONLY = ("sitting", "the background is", "next to", " beside ", " near ", "contains", "it shows",
               "this drawing has", "the image has", "over a", "against a", "one ")  # fmt: skip


def test_writer_ground_truth_is_the_scene_it_describes() -> None:
    scenes = sample_scenes(60, 3)
    rng = np.random.default_rng(0)
    for i in range(len(scenes)):
        text, spec = write_prompt(scenes, i, rng)
        truth = {(o["colour"], o["shape"]): o for o in scenes.objects(i)}
        assert len(spec.objects) == len(truth), text
        for obj in spec.objects:
            scene_obj = truth[(obj.colour, obj.shape)]
            assert obj.size in (None, scene_obj["size"]) and obj.position in (None, scene_obj["position"]), text
        assert unknown_words(text) == [], text
        assert len(prompt_words(text)) <= MAX_WORDS, text


def test_writer_sets_are_seeded_and_use_training_pairs_only() -> None:
    a, b = write_prompt_set(40, 9), write_prompt_set(40, 9)
    assert a == b and a != write_prompt_set(40, 10)
    assert all((o.colour, o.shape) not in HELDOUT_PAIRS for _, spec in a for o in spec.objects)


def test_writer_constructions_never_occur_in_training_captions() -> None:
    scenes = sample_scenes(300, 4)
    rng = np.random.default_rng(1)
    # noise words aside (single words at random places, see the next test)
    training = [caption_scene(scenes, i, rng)[0] for i in range(300)] + [paraphrase_scene(scenes, i, rng, p_noise=0)[0] for i in range(300)]
    for text in training:
        assert not any(c in f" {text} " for c in WRITER_ONLY), text
    written = [t for t, _ in write_prompt_set(300, 4)]
    assert np.mean([any(c in f" {t} " for c in WRITER_ONLY) for t in written]) > 0.8


def test_augmented_captions_parse_back_and_vary_the_order() -> None:
    scenes = sample_scenes(300, 5, n_objects=3)
    rng = np.random.default_rng(2)
    first_colours = set()
    for i in range(len(scenes)):
        text, spec = paraphrase_scene(scenes, i, rng, p_noise=0)
        assert parse_prompt(text) == spec, text
        assert unknown_words(text) == [] and len(prompt_words(text)) <= 38, text
        first_colours.add(spec.objects[0].colour == scenes.objects(i)[0]["colour"])
    assert first_colours == {True, False}  # objects are not always listed in scene order


def test_augmented_captions_hold_every_function_word() -> None:
    scenes = sample_scenes(1000, 6)
    rng = np.random.default_rng(3)
    seen = {w for i in range(len(scenes)) for w in prompt_words(paraphrase_scene(scenes, i, rng)[0])}
    assert set(NOISE_WORDS) <= seen
    rng = np.random.default_rng(3)
    quiet = {w for i in range(len(scenes)) for w in prompt_words(paraphrase_scene(scenes, i, rng, p_noise=0)[0])}
    assert not {"near", "sitting", "contains", "beside"} & quiet


def test_shipped_independent_set_is_reproducible_and_the_judge_reads_its_renders() -> None:
    prompts, specs = read_prompt_set(SHIPPED / "independent.jsonl")
    assert len(prompts) == 200
    assert list(zip(prompts, specs, strict=True)) == write_prompt_set(200, 4242)
    report = ground_truth_fidelity(prompts[:64], specs=specs[:64])
    assert report.fidelity >= 0.95


def test_fidelity_scores_against_the_given_ground_truth(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from meg.models import evaluate, judge
    from meg.models.world import Scenes, render

    prompts = ["a red circle", "a blue square at the top left"]
    rng = np.random.default_rng(0)
    scenes = [judge.scene_from_spec(parse_prompt(p), rng) for p in prompts]
    images, _ = render(Scenes(**{k: torch.cat([getattr(s, k) for s in scenes]) for k in Scenes.__dataclass_fields__}))
    monkeypatch.setattr(evaluate, "generate", lambda *args, **kwargs: images)
    assert evaluate.evaluate_fidelity("meg-tiny", prompts, steps=1)["fidelity"] == 1.0
    wrong = [PromptSpec(objects=(PromptObject(colour="green", shape="star"),)), parse_prompt(prompts[1])]
    assert evaluate.evaluate_fidelity("meg-tiny", prompts, steps=1, specs=wrong)["fidelity"] == 0.5
    with pytest.raises(InvalidInputError, match="2 prompts but 1 specs"):
        evaluate.evaluate_fidelity("meg-tiny", prompts, steps=1, specs=wrong[:1])


def test_prompt_set_files_round_trip_and_reject_bad_lines(tmp_path: Path) -> None:
    pairs = write_prompt_set(5, 1)
    save_prompt_set(pairs, tmp_path / "set.jsonl")
    texts, specs = load_prompt_set(tmp_path / "set.jsonl")
    assert list(zip(texts, specs, strict=True)) == pairs
    (tmp_path / "plain.txt").write_text("# comment\na red circle\n")
    assert read_prompt_set(tmp_path / "plain.txt") == (["a red circle"], [parse_prompt("a red circle")])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a red circle"}\n')
    with pytest.raises(InvalidInputError, match="line 1"):
        load_prompt_set(tmp_path / "bad.jsonl")
