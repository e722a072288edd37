"""An evaluation prompt writer independent of the training captions.

`write_prompt` describes a scene of the world the way a user might, with sentence
structures that neither the training templates (`meg.models.captions.caption_scene`) nor
the augmented training captions (`meg.models.paraphrase.paraphrase_scene`) produce:

- the background first, as its own sentence ("the background is grainy slate; ...") or
  in an "over"/"against" phrase;
- objects that "sit" somewhere, scenes that "contain"/"have"/"show" objects;
- objects related to each other ("..., next to ...", "... beside ...", "... near ...");
- attributes after the noun as an appositive list ("a star, tiny and crimson");
- "one" as the article, position-first clauses with "sits", and synonyms in every slot.

It returns the text *and* the ground truth (`PromptSpec`) it was written from, so the
judge scores against what was meant, not against a parse of the text. Every word is in the
tokenizer's vocabulary, and prompts fit the text encoder's 40 positions.

`write_prompt_set` draws scenes from the world (training colour–shape pairs, a seed of
its own) and writes one prompt per scene; `save_prompt_set` / `load_prompt_set` keep a set
as JSON lines (text plus spec), the format `meg eval fidelity` reads for `.jsonl` files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from meg.errors import InvalidInputError
from meg.models.captions import PromptObject, PromptSpec, prompt_words
from meg.models.world import BACKGROUND_COLOURS, TEXTURES, Scenes, WorldConfig, sample_scenes

__all__ = ["load_prompt_set", "save_prompt_set", "spec_from_dict", "spec_to_dict", "write_prompt", "write_prompt_set"]

MAX_WORDS = 38
"""Tokenizer words per prompt (40 text positions less BOS and EOS)."""

# Words per concept, written out here rather than derived from the caption tables so that
# this writer's choices do not follow the training captions' synonym draws.
_COLOUR = {
    "red": ["red", "crimson", "scarlet", "ruby", "cherry"], "orange": ["orange", "amber", "tangerine"],
    "yellow": ["yellow", "golden", "gold", "lemon"], "green": ["green", "emerald", "lime", "jade"],
    "cyan": ["cyan", "turquoise", "aqua", "teal"], "blue": ["blue", "azure", "cobalt", "sapphire", "navy"],
    "purple": ["purple", "violet", "lilac", "lavender", "indigo"], "pink": ["pink", "rose", "fuchsia", "magenta", "salmon"],
}  # fmt: skip
_SHAPE = {
    "circle": ["circle", "disc", "disk", "dot", "ball"], "square": ["square", "box", "block", "tile"],
    "triangle": ["triangle"], "star": ["star"], "ring": ["ring", "donut", "doughnut", "hoop", "loop", "annulus"],
    "cross": ["cross", "plus"],
}  # fmt: skip
_SIZE = {"small": ["small", "tiny", "little", "mini"], "medium": ["medium", "mid", "average", "moderate"],
         "large": ["large", "big", "huge", "giant"]}  # fmt: skip
_BG_COLOUR = {"gray": ["gray", "grey"], "white": ["white", "ivory"], "black": ["black"], "beige": ["beige", "tan", "sand", "cream"],
              "slate": ["slate"]}  # fmt: skip
_TEXTURE = {"solid": ["plain", "flat", "uniform", "solid"], "gradient": ["gradient", "graded", "fading", "shaded"],
            "stripes": ["striped", "stripy", "lined"], "checkers": ["checkered", "chequered", "checked", "checkerboard"],
            "noise": ["noisy", "grainy", "speckled", "mottled", "cloudy"]}  # fmt: skip
_VERTICAL = {"top": ["top", "upper"], "bottom": ["bottom", "lower"]}


def _any(rng: np.random.Generator, options: list[str]) -> str:
    return str(rng.choice(options))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _where(position: str, rng: np.random.Generator) -> str:
    """A place phrase: "in the upper left corner", "at the rightmost edge", "in the middle" ..."""
    parts = position.split()
    if position == "center":
        return _any(rng, ["in the middle", "in the centre", "in the middle part", "in the central part", "in the middle area"])
    if len(parts) == 2:
        v, h = _any(rng, _VERTICAL[parts[0]]), parts[1]
        return _any(rng, [f"in the {v} {h} corner", f"in the {v} {h} area", f"at the {v} {h} edge", f"in the {h} {v} part",
                          f"in the {v} {h} region"])  # fmt: skip
    p = parts[0]
    if p in ("top", "bottom"):
        return _any(rng, [f"at the {p} edge", f"in the {_any(rng, _VERTICAL[p])} part", f"on the {p} edge", f"in the {p} area"])
    return _any(rng, [f"at the {p} edge", f"in the {p} part", f"on the {p} edge", f"in the {p} area", f"at the {p}most edge"])


def _object(obj: PromptObject, rng: np.random.Generator, *, lead: str | None = None) -> str:
    """One object in one of the writer's constructions; `lead` replaces the article."""
    assert obj.colour is not None and obj.shape is not None
    c, s = _any(rng, _COLOUR[obj.colour]), _any(rng, _SHAPE[obj.shape])
    z = _any(rng, _SIZE[obj.size]) if obj.size else None
    form = int(rng.integers(0, 4))
    if form == 0:  # a star, tiny and crimson
        tail = f"{z} and {c}" if z else c
        noun, rest = s, f", {tail}"
    elif form == 1:  # a crimson star, tiny
        noun, rest = f"{c} {s}", f", {z}" if z else ""
    elif form == 2:  # a tiny crimson star
        noun, rest = " ".join(w for w in (z, c, s) if w), ""
    else:  # one crimson star
        noun, rest = " ".join(w for w in (z, c, s) if w), ""
        lead = lead or "one"
    head = f"{lead or _article(noun)} {noun}{rest}"
    if obj.position:
        where = _where(obj.position, rng)
        return f"{head} sitting {where}" if rng.random() < 0.4 else f"{head} {where}"
    return head


def _background(texture: str | None, colour: str | None, rng: np.random.Generator) -> tuple[str, str]:
    """(sentence form, phrase form) of the background: "the background is grainy slate", "over a grainy slate background"."""
    words = [w for w in (_any(rng, _TEXTURE[texture]) if texture else None, _any(rng, _BG_COLOUR[colour]) if colour else None) if w]
    if len(words) == 2 and rng.random() < 0.3:
        words = [words[1], "and", words[0]]
    described = " ".join(words)
    sentence = _any(rng, [f"the background is {described}", f"{described} background", f"background: {described}"])
    phrase = _any(rng, [f"over a {described} background", f"against a {described} background"])
    return sentence, phrase


def _compose(objects: list[PromptObject], texture: str | None, bg_colour: str | None, rng: np.random.Generator) -> str:
    phrases = [_object(o, rng) for o in objects]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        relation = _any(rng, [", next to ", " beside ", " near ", "; with it ", " and "]) if len(phrases) == 2 else None
        body = phrases[0] + relation + phrases[1] if relation else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    opener = _any(rng, ["", "", "the image has ", "the picture contains ", "it shows ", "a scene containing ", "this drawing has "])
    body = opener + body
    if texture is None and bg_colour is None:
        return body
    sentence, phrase = _background(texture, bg_colour, rng)
    form = int(rng.integers(0, 3))
    if form == 0:
        return f"{sentence}; {body}"
    if form == 1:
        return f"{body}, {phrase}"
    return f"{sentence}. {body}"


def write_prompt(scenes: Scenes, i: int, rng: np.random.Generator, *, p_size: float = 0.6, p_position: float = 0.7,
                 p_background: float = 0.6) -> tuple[str, PromptSpec]:  # fmt: skip
    """A prompt for scene i and the ground truth it asks for.

    Every object names its colour and shape, its size with probability `p_size` and its
    place with probability `p_position`; the background (texture, colour or both) is named
    with probability `p_background`. Objects are listed in a random order.
    """
    objects = scenes.objects(i)
    mentioned = []
    for j in rng.permutation(len(objects)):
        o = objects[int(j)]
        mentioned.append(PromptObject(colour=o["colour"], shape=o["shape"], size=o["size"] if rng.random() < p_size else None,
                                      position=o["position"] if rng.random() < p_position else None))  # fmt: skip
    texture = bg_colour = None
    if rng.random() < p_background:
        use_texture, use_colour = rng.random() < 0.7, rng.random() < 0.8
        texture = TEXTURES[int(scenes.texture[i])] if use_texture else None
        bg_colour = list(BACKGROUND_COLOURS)[int(scenes.bg_colour[i])] if use_colour or not use_texture else None
    spec = PromptSpec(objects=tuple(mentioned), texture=texture, bg_colour=bg_colour)
    for _ in range(50):
        text = _compose(mentioned, texture, bg_colour, rng)
        if len(prompt_words(text)) <= MAX_WORDS:
            break
    return text, spec


def write_prompt_set(n: int, seed: int) -> list[tuple[str, PromptSpec]]:
    """`n` (prompt, ground truth) pairs of fresh training-distribution scenes, from `seed`."""
    scenes = sample_scenes(n, seed, WorldConfig(heldout=False))
    rng = np.random.default_rng(seed)
    return [write_prompt(scenes, i, rng) for i in range(n)]


def spec_to_dict(spec: PromptSpec) -> dict:
    return {"objects": [{k: getattr(o, k) for k in ("colour", "shape", "size", "position")} for o in spec.objects],
            "texture": spec.texture, "bg_colour": spec.bg_colour}  # fmt: skip


def spec_from_dict(data: dict) -> PromptSpec:
    return PromptSpec(objects=tuple(PromptObject(**o) for o in data["objects"]), texture=data.get("texture"), bg_colour=data.get("bg_colour"))


def save_prompt_set(pairs: list[tuple[str, PromptSpec]], path: Path) -> None:
    """One JSON object per line: {"prompt": text, "spec": {...}}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": text, "spec": spec_to_dict(spec)}) + "\n" for text, spec in pairs))


def load_prompt_set(path: Path) -> tuple[list[str], list[PromptSpec]]:
    """(prompts, ground truths) of a JSON-lines prompt set."""
    if not path.exists():
        raise InvalidInputError(f"prompts file {str(path)!r} does not exist")
    texts, specs = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(str(record["prompt"]))
            specs.append(spec_from_dict(record["spec"]))
        except (ValueError, KeyError, TypeError) as error:
            raise InvalidInputError(f"line {n} of {str(path)!r} is not a prompt record ({error})") from error
    if not texts:
        raise InvalidInputError(f"prompts file {str(path)!r} holds no prompt")
    return texts, specs
