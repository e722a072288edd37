"""Augmented training captions: many more phrasings of a scene than `caption_scene`.

`paraphrase_scene` varies what `caption_scene` keeps fixed: the order in which objects are
listed, the order of an object's adjectives, whether size and colour are said before the
shape, after it or in a relative clause, where the position goes, how clauses are joined,
and where (and how) the background is named. Every word is in the tokenizer's
vocabulary (`meg.models.captions.VOCABULARY`), so an already trained text encoder reads
the new captions without unknown tokens.

It deliberately avoids the constructions of the evaluation prompt writer
(`meg.models.prompt_writer`): no background-first sentences ("the background is …"), no
"sits"/"sitting", "has"/"having", "contains"/"containing", "near"/"beside"/"next"/"by"
relations and no "over"/"against" backgrounds, so prompts written by that module stay
phrasings the model was never trained on.
"""

from __future__ import annotations

import numpy as np

from meg.models.captions import (
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    FILLERS,
    SEPARATORS,
    SIZE_WORDS,
    TEXTURE_WORDS,
    PromptObject,
    PromptSpec,
    prompt_words,
)
from meg.models.world import BACKGROUND_COLOURS, TEXTURES, Scenes

__all__ = ["NOISE_WORDS", "PARAPHRASE_WORDS", "paraphrase_scene"]


def _words(table: dict[str, str], exclude: tuple[str, ...] = ()) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for word, concept in table.items():
        if word not in exclude:
            out.setdefault(concept, []).append(word)
    return out


_COLOUR = _words(COLOUR_WORDS)
_SIZE = _words(SIZE_WORDS, exclude=("smaller", "bigger", "larger"))
_BG = _words(BACKGROUND_WORDS)
_TEXTURE = _words(TEXTURE_WORDS, exclude=("noise", "checkers", "stripes", "stripe"))
# nouns only (adjectival and plural shape words would break the grammar below)
_SHAPE: dict[str, list[str]] = {
    "circle": ["circle", "disc", "disk", "dot", "ball"],
    "square": ["square", "box", "block", "tile"],
    "triangle": ["triangle"],
    "star": ["star"],
    "ring": ["ring", "donut", "doughnut", "hoop", "annulus", "loop"],
    "cross": ["cross", "plus"],
}
_PLACE_V = {"top": ["top", "upper"], "bottom": ["bottom", "lower"]}
_PREFIXES = ["", "", "", "a picture of ", "an image of ", "a drawing of ", "a painting of ", "a scene of ", "an image showing ",
             "there is ", "this picture: ", "a photo of "]  # fmt: skip
_JOINERS = [" and ", ", ", "; ", " and ", ", and ", " with ", ". "]

NOISE_WORDS: tuple[str, ...] = tuple(sorted(w for w in FILLERS | SEPARATORS if w.isalpha()))
"""Function words of the vocabulary (no concept words) that `paraphrase_scene` inserts as noise."""

PARAPHRASE_WORDS: frozenset[str] = frozenset(
    w for table in (_COLOUR, _SIZE, _BG, _TEXTURE, _SHAPE) for ws in table.values() for w in ws
)
"""Concept words `paraphrase_scene` may write (a subset of the vocabulary)."""


def _pick(rng: np.random.Generator, options: list[str], p_canonical: float = 0.5) -> str:
    """The first (canonical) option with probability p_canonical, else any option."""
    if len(options) == 1 or rng.random() < p_canonical:
        return options[0]
    return str(rng.choice(options))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _position(position: str, rng: np.random.Generator) -> str:
    parts = position.split()
    if position == "center":
        return str(rng.choice(["in the center", "in the middle", "at the centre", "centered", "in the central area",
                               "in the middle of the image", "at the center of the picture", "centred"]))  # fmt: skip
    if len(parts) == 2:
        v, h = _pick(rng, _PLACE_V[parts[0]]), parts[1]
        return str(rng.choice([f"at the {v} {h}", f"in the {v} {h} corner", f"{v} {h}", f"in the {v} {h}",
                               f"at the {h} {v}", f"{v}-{h}", f"in the {h} {v} corner", f"at the {v} {h} of the image",
                               f"located at the {v} {h}", f"placed in the {v} {h} corner", f"positioned {v} {h}"]))  # fmt: skip
    p = parts[0]
    if p in ("top", "bottom"):
        v = _pick(rng, _PLACE_V[p])
        extra = ["above"] if p == "top" else ["below", "beneath"]
        return str(rng.choice([f"at the {p}", f"at the {p} side", f"at the {p} center", f"on the {v} side",
                               f"at the {p} of the image", f"located at the {p}", f"{p}most", *extra]))  # fmt: skip
    return str(rng.choice([f"on the {p}", f"on the {p} side", f"at the {p}", f"in the middle {p}", f"{p}most",
                           f"at the {p} of the picture", f"placed on the {p}", f"positioned at the {p} side"]))  # fmt: skip


def _object_phrase(colour: str, shape: str, size: str | None, position: str | None, rng: np.random.Generator) -> str:
    c = _pick(rng, _COLOUR[colour], 0.6)
    s = _pick(rng, _SHAPE[shape], 0.6)
    z = _pick(rng, _SIZE[size], 0.5) if size else None
    form = int(rng.integers(0, 7))
    if form == 0:  # a small red star
        adjectives = [w for w in (z, c) if w]
        words = " ".join(adjectives + [s])
    elif form == 1:  # a red small star
        words = " ".join([c] + ([z] if z else []) + [s])
    elif form == 2:  # a small star in red
        words = " ".join(([z] if z else []) + [s, "in", c])
    elif form == 3:  # a star that is small and red
        clause = f"{z} and {c}" if z and rng.random() < 0.5 else (f"{c} and {z}" if z else c)
        words = f"{s} that is {clause}"
    elif form == 4:  # a red star which is small
        words = f"{c} {s} which is {z}" if z else f"{s} which is {c}"
    elif form == 5:  # a red colored star / a small star coloured red
        coloured = str(rng.choice(["colored", "coloured"]))
        words = " ".join(([z] if z else []) + [c, coloured, s]) if rng.random() < 0.5 else " ".join(([z] if z else []) + [s, coloured, c])
    else:  # a red star shaped object / a small sized red star
        words = f"{c} {s} shaped object" if not z else f"{z} sized {c} {s}"
    phrase = f"{_article(words)} {words}"
    if position:
        where = _position(position, rng)
        r = rng.random()
        if r < 0.25:
            phrase = f"{where}: {phrase}"
        elif r < 0.4:
            phrase = f"{where} {phrase}"
        else:
            phrase = f"{phrase} {where}"
    return phrase


def _background(texture: str | None, colour: str | None, rng: np.random.Generator) -> str:
    c = _pick(rng, _BG[colour], 0.6) if colour else None
    t = _pick(rng, _TEXTURE[texture], 0.5) if texture else None
    form = int(rng.integers(0, 4))
    if form == 0 or not (t and c):
        return "on a " + " ".join(w for w in (t, c) if w) + " background"
    if form == 1:
        return f"on a {c} {t} background"
    if form == 2:
        return f"on a {t} background that is {c}"
    return f"with a {t} {c} background"


def _insert_noise_words(text: str, rng: np.random.Generator, n: int) -> str:
    """`n` function words of the vocabulary inserted at random word boundaries."""
    words = text.split(" ")
    for _ in range(n):
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(NOISE_WORDS)))
    return " ".join(words)


def paraphrase_scene(scenes: Scenes, i: int, rng: np.random.Generator, *, p_size: float = 0.5, p_position: float = 0.85,
                     p_background: float = 0.6, p_noise: float = 0.4, max_words: int = 38) -> tuple[str, PromptSpec]:  # fmt: skip
    """A caption of scene i in a randomly drawn (augmented) phrasing, and what it mentions.

    Objects are listed in a random order; each names its colour and shape, its size with
    probability `p_size` and its position with probability `p_position`; the background
    (texture, colour or both) is named with probability `p_background`, before or after
    the objects. With probability `p_noise`, one to three `NOISE_WORDS` are inserted at
    random places: the text encoder is frozen after its own stage, and a vocabulary word
    that no training caption holds keeps its random initial embedding, which the UNet
    would otherwise first meet in a user's prompt. Phrasings longer than `max_words`
    tokenizer words are drawn again (the text encoder reads 40 positions, BOS and EOS
    included: longer captions would be cut).
    """
    for _ in range(50):
        text, spec = _paraphrase(scenes, i, rng, p_size, p_position, p_background)
        if rng.random() < p_noise:
            text = _insert_noise_words(text, rng, int(rng.integers(1, 4)))
        if len(prompt_words(text)) <= max_words:
            break
    return text, spec


def _paraphrase(scenes: Scenes, i: int, rng: np.random.Generator, p_size: float, p_position: float, p_background: float) -> tuple[str, PromptSpec]:
    objects = scenes.objects(i)
    order = rng.permutation(len(objects))
    phrases, mentioned = [], []
    for j in order:
        obj = objects[int(j)]
        size = obj["size"] if rng.random() < p_size else None
        position = obj["position"] if rng.random() < p_position else None
        phrases.append(_object_phrase(obj["colour"], obj["shape"], size, position, rng))
        mentioned.append(PromptObject(colour=obj["colour"], shape=obj["shape"], size=size, position=position))
    if len(phrases) == 1:
        text = phrases[0]
    else:
        joiner = str(rng.choice(_JOINERS))
        text = joiner.join(phrases) if rng.random() < 0.5 else ", ".join(phrases[:-1]) + joiner + phrases[-1]
    texture = bg_colour = None
    if rng.random() < p_background:
        use_t, use_c = rng.random() < 0.75, rng.random() < 0.8
        if not (use_t or use_c):
            use_c = True
        texture = TEXTURES[int(scenes.texture[i])] if use_t else None
        bg_colour = list(BACKGROUND_COLOURS)[int(scenes.bg_colour[i])] if use_c else None
        bg = _background(texture, bg_colour, rng)
        text = f"{text} {bg}" if rng.random() < 0.6 else f"{bg.removeprefix('on ')}: {text}"
    prefix = str(rng.choice(_PREFIXES))
    return prefix + text, PromptSpec(objects=tuple(mentioned), texture=texture, bg_colour=bg_colour)
