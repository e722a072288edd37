"""Captions of the meg-tiny world: paraphrase templates, synonyms and a prompt parser.

`caption_scene` writes a caption for a scene in one of many phrasings and returns what it
mentioned as a `PromptSpec`; `parse_prompt` reads free text back into a `PromptSpec`,
mapping synonyms ("crimson", "striped", "upper left") onto the world's concepts, accepting
other word orders, and reporting every word it does not know in `unknown_words` instead of
dropping it silently. `VOCABULARY` is every word the tokenizer knows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from meg.models.world import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scenes,
)

__all__ = [
    "CaptionConfig",
    "PromptObject",
    "PromptSpec",
    "VOCABULARY",
    "caption_scene",
    "normalize_prompt",
    "parse_prompt",
    "prompt_words",
    "unknown_words",
]

# word -> canonical concept, per kind
COLOUR_WORDS: dict[str, str] = {c: c for c in OBJECT_COLOURS} | {
    "crimson": "red", "scarlet": "red", "ruby": "red", "cherry": "red",
    "amber": "orange", "tangerine": "orange",
    "golden": "yellow", "gold": "yellow", "lemon": "yellow",
    "emerald": "green", "lime": "green", "jade": "green",
    "turquoise": "cyan", "aqua": "cyan", "teal": "cyan",
    "azure": "blue", "cobalt": "blue", "sapphire": "blue", "navy": "blue",
    "violet": "purple", "lilac": "purple", "lavender": "purple", "indigo": "purple",
    "rose": "pink", "fuchsia": "pink", "magenta": "pink", "salmon": "pink",
}  # fmt: skip
SHAPE_WORDS: dict[str, str] = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES} | {
    "crosses": "cross", "disc": "circle", "disk": "circle", "dot": "circle", "ball": "circle",
    "round": "circle", "box": "square", "block": "square", "tile": "square",
    "triangular": "triangle", "starry": "star", "donut": "ring", "doughnut": "ring",
    "hoop": "ring", "annulus": "ring", "loop": "ring", "plus": "cross", "x": "cross",
}  # fmt: skip
SIZE_WORDS: dict[str, str] = {s: s for s in SIZES} | {
    "tiny": "small", "little": "small", "mini": "small", "smaller": "small",
    "mid": "medium", "average": "medium", "moderate": "medium",
    "big": "large", "huge": "large", "giant": "large", "bigger": "large", "larger": "large",
}  # fmt: skip
PLACE_WORDS: dict[str, str] = {
    "top": "top", "upper": "top", "above": "top", "topmost": "top",
    "bottom": "bottom", "lower": "bottom", "below": "bottom", "beneath": "bottom", "bottommost": "bottom",
    "left": "left", "leftmost": "left", "right": "right", "rightmost": "right",
    "center": "center", "centre": "center", "middle": "center", "central": "center",
    "centered": "center", "centred": "center",
}  # fmt: skip
TEXTURE_WORDS: dict[str, str] = {
    "solid": "solid", "plain": "solid", "flat": "solid", "uniform": "solid",
    "gradient": "gradient", "fading": "gradient", "graded": "gradient", "shaded": "gradient",
    "striped": "stripes", "stripes": "stripes", "stripe": "stripes", "stripy": "stripes", "lined": "stripes",
    "checkered": "checkers", "checkers": "checkers", "checkerboard": "checkers",
    "chequered": "checkers", "checked": "checkers",
    "noisy": "noise", "noise": "noise", "grainy": "noise", "speckled": "noise",
    "mottled": "noise", "cloudy": "noise",
}  # fmt: skip
BACKGROUND_WORDS: dict[str, str] = {c: c for c in BACKGROUND_COLOURS} | {
    "grey": "gray", "ivory": "white", "tan": "beige", "sand": "beige", "sandy": "beige", "cream": "beige",
}  # fmt: skip
SEPARATORS = frozenset({"and", ",", ";", ".", "with", "next", "beside"})
FILLERS = frozenset(
    ["a", "an", "the", "at", "in", "on", "of", "is", "are", "there", "this", "image", "picture", "photo", "drawing", "painting", "scene", "shape", "shaped", "object", "thing", "located", "placed", "positioned", "sits", "sitting", "side", "corner", "background", "over", "against", "near", "which", "that", "it", "to", "one", "colored", "coloured", "sized", "sign", "showing", "shows", "some", "edge", "part", "area", "region", "its", "has", "having", "containing", "contains", ":", "-", "by"]
)
_TEXTURE_CAPTION = {"solid": "plain", "gradient": "gradient", "stripes": "striped", "checkers": "checkered", "noise": "noisy"}
_TEXTURE_ADJECTIVES = {
    "solid": ["solid", "flat", "uniform"], "gradient": ["fading", "shaded"],
    "stripes": ["stripy", "lined"], "checkers": ["chequered", "checkerboard"],
    "noise": ["grainy", "speckled", "mottled"],
}  # fmt: skip
_TEXTURE_NOUN = {"solid": None, "gradient": "a gradient", "stripes": "stripes", "checkers": "checkers", "noise": "noise"}

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        set(COLOUR_WORDS) | set(SHAPE_WORDS) | set(SIZE_WORDS) | set(PLACE_WORDS) | set(TEXTURE_WORDS)
        | set(BACKGROUND_WORDS) | SEPARATORS | FILLERS
    )
)  # fmt: skip
_WORD_RE = re.compile(r"[a-z]+|[^\sa-z]")


@dataclass(frozen=True)
class PromptObject:
    """One requested object; None where the prompt does not say."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None

    def phrase(self) -> str:
        words = [w for w in ("a", self.size, self.colour, self.shape or "shape") if w]
        text = " ".join(words)
        if self.position == "center":
            text += " in the center"
        elif self.position:
            text += f" at the {self.position}"
        return text


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for, in the world's canonical terms."""

    objects: tuple[PromptObject, ...]
    texture: str | None = None
    bg_colour: str | None = None
    unknown_words: tuple[str, ...] = field(default=(), compare=False)

    def canonical(self) -> str:
        """The prompt re-written in the world's canonical words and one fixed order."""
        text = " and ".join(o.phrase() for o in self.objects)
        bg = " ".join(w for w in (_TEXTURE_CAPTION.get(self.texture or ""), self.bg_colour) if w)
        return f"{text} on a {bg} background" if bg else text


def _tokens(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def prompt_words(text: str) -> list[str]:
    """The words of `text` as the tokenizer splits them (runs of letters, single other
    characters); the text encoder reads at most `FamilyConfig.max_tokens` - 2 of them."""
    return _tokens(text)


def unknown_words(text: str) -> list[str]:
    """Words of `text` outside the world's vocabulary, in order of first appearance."""
    seen: list[str] = []
    for w in _tokens(text):
        if w not in VOCABULARY and w not in seen and w.strip():
            seen.append(w)
    return seen


def _position(flags: list[str]) -> str | None:
    if not flags:
        return None
    v = next((f for f in flags if f in ("top", "bottom")), None)
    h = next((f for f in flags if f in ("left", "right")), None)
    row = {"top": 0, None: 1, "bottom": 2}[v]
    col = {"left": 0, None: 1, "right": 2}[h]
    return POSITIONS[3 * row + col]


def parse_prompt(text: str) -> PromptSpec:
    """Read a free-text prompt into a `PromptSpec`.

    Colour, size and place words attach to the shape word in the same clause (clauses are
    split at "and", commas, "with", ...); a clause without a shape gives its words to the
    previous object when that object lacks them, else to the next one.
    """
    words = _tokens(text)
    texture = next((TEXTURE_WORDS[w] for w in words if w in TEXTURE_WORDS), None)
    bg_colour = next((BACKGROUND_WORDS[w] for w in words if w in BACKGROUND_WORDS), None)
    clauses: list[list[str]] = [[]]
    for w in words:
        if w in SEPARATORS:
            clauses.append([])
        else:
            clauses[-1].append(w)
    # each object: dict with colour, shape, size, places (list)
    objects: list[dict] = []
    orphans: list[tuple[int, dict]] = []
    for clause in clauses:
        cur: dict = {"places": []}
        found: list[dict] = []
        for w in clause:
            if w in SHAPE_WORDS:
                if "shape" in cur:
                    found.append(cur)
                    cur = {"places": []}
                cur["shape"] = SHAPE_WORDS[w]
            elif w in COLOUR_WORDS or w in SIZE_WORDS:
                key, value = ("colour", COLOUR_WORDS[w]) if w in COLOUR_WORDS else ("size", SIZE_WORDS[w])
                if key in cur and "shape" in cur:
                    found.append(cur)
                    cur = {"places": []}
                cur[key] = value
            elif w in PLACE_WORDS:
                cur["places"].append(PLACE_WORDS[w])
        if len(cur) > 1 or cur["places"]:
            found.append(cur)
        for obj in found:
            if "shape" in obj:
                objects.append(obj)
            else:
                orphans.append((len(objects), obj))
    for index, orphan in orphans:
        prev = objects[index - 1] if index > 0 else None
        nxt = objects[index] if index < len(objects) else None
        keys = [k for k in ("colour", "size") if k in orphan] + (["places"] if orphan["places"] else [])
        target = prev if prev is not None and all(not prev.get(k) for k in keys) else nxt
        if target is None:
            target = prev if prev is not None else orphan
            if target is orphan:
                objects.append(orphan)
                continue
        for k in keys:
            if k == "places":
                target["places"] = target["places"] + orphan["places"]
            else:
                target.setdefault(k, orphan[k])
    parsed = tuple(
        PromptObject(colour=o.get("colour"), shape=o.get("shape"), size=o.get("size"), position=_position(o["places"]))
        for o in objects
    )
    return PromptSpec(objects=parsed, texture=texture, bg_colour=bg_colour, unknown_words=tuple(unknown_words(text)))


def normalize_prompt(text: str) -> tuple[str, list[str]]:
    """(canonical prompt, unknown words): the prompt in the world's own words."""
    spec = parse_prompt(text)
    return spec.canonical(), list(spec.unknown_words)


@dataclass(frozen=True)
class CaptionConfig:
    """How often captions mention optional attributes and use synonyms."""

    p_position: float = 0.85
    """Probability that an object's position is mentioned."""
    p_size: float = 0.5
    """Probability that an object's size is mentioned."""
    p_background: float = 0.5
    """Probability that the background is mentioned at all."""
    p_synonym: float = 0.3
    """Probability that a concept is written with a synonym instead of its canonical word."""


def _inverse(table: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for word, concept in table.items():
        # plural and adjectival shape words would change the grammar; keep nouns only
        if word.endswith("s") and word[:-1] in table and table[word[:-1]] == concept and word != concept:
            continue
        out.setdefault(concept, []).append(word)
    return out


_SYN = {
    "colour": _inverse(COLOUR_WORDS),
    "shape": {k: [w for w in v if w not in ("round", "triangular", "starry", "x")] for k, v in _inverse(SHAPE_WORDS).items()},
    "size": {k: [w for w in v if w not in ("smaller", "bigger", "larger")] for k, v in _inverse(SIZE_WORDS).items()},
    "bg": _inverse(BACKGROUND_WORDS),
}


def _word(kind: str, concept: str, rng: np.random.Generator, config: CaptionConfig) -> str:
    options = _SYN[kind][concept]
    if len(options) > 1 and rng.random() < config.p_synonym:
        return str(rng.choice([o for o in options if o != concept]))
    return concept


def _position_phrase(position: str, rng: np.random.Generator, config: CaptionConfig) -> str:
    syn = rng.random() < config.p_synonym
    if position == "center":
        return str(rng.choice(["in the middle", "at the centre", "centered", "in the central area"] if syn else ["in the center"]))
    parts = position.split()
    if len(parts) == 2:
        v = {"top": "upper", "bottom": "lower"}[parts[0]] if syn else parts[0]
        forms = [f"at the {v} {parts[1]}", f"in the {v} {parts[1]} corner", f"{v}-{parts[1]}", f"at the {parts[1]} {v}" if syn else f"in the {v} {parts[1]}"]
        return str(rng.choice(forms))
    p = parts[0]
    if p in ("top", "bottom"):
        forms = [f"at the {p}", f"at the {p} side", f"at the {p} center"] + ([f"on the {'upper' if p == 'top' else 'lower'} side", f"{'above' if p == 'top' else 'below'}"] if syn else [])
    else:
        forms = [f"on the {p}", f"on the {p} side", f"at the {p}"] + ([f"in the middle {p}", f"{p}most"] if syn else [])
    return str(rng.choice(forms))


def caption_scene(scenes: Scenes, i: int, rng: np.random.Generator, config: CaptionConfig = CaptionConfig()) -> tuple[str, PromptSpec]:
    """A caption for scene i in a randomly drawn phrasing, and what it mentions."""
    parts: list[str] = []
    mentioned: list[PromptObject] = []
    for obj in scenes.objects(i):
        size = obj["size"] if rng.random() < config.p_size else None
        position = obj["position"] if rng.random() < config.p_position else None
        colour = _word("colour", obj["colour"], rng, config)
        shape = _word("shape", obj["shape"], rng, config)
        size_w = (_word("size", size, rng, config) + " ") if size else ""
        det = "a" if (size_w or colour)[0] not in "aeiou" else "an"
        form = int(rng.integers(0, 4))
        if form == 0 or form == 3:
            phrase = f"{det} {size_w}{colour} {shape}"
        elif form == 1:
            det = "a" if (size_w or shape)[0] not in "aeiou" else "an"
            phrase = f"{det} {size_w}{shape} in {colour}"
        else:
            det = "a" if (size_w or shape)[0] not in "aeiou" else "an"
            phrase = f"{det} {size_w}{shape} that is {colour}"
        if position:
            where = _position_phrase(position, rng, config)
            phrase = f"{where}: {phrase}" if rng.random() < 0.25 else f"{phrase} {where}"
        parts.append(phrase)
        mentioned.append(PromptObject(colour=obj["colour"], shape=obj["shape"], size=size, position=position))
    joiner = str(rng.choice([" and ", "; ", " and ", " with "]))
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + joiner + parts[-1]
    texture = bg_colour = None
    if rng.random() < config.p_background:
        t_name = TEXTURES[int(scenes.texture[i])]
        c_name = list(BACKGROUND_COLOURS)[int(scenes.bg_colour[i])]
        use_t, use_c = rng.random() < 0.8, rng.random() < 0.8
        if not (use_t or use_c):
            use_c = True
        texture = t_name if use_t else None
        bg_colour = c_name if use_c else None
        c_word = _word("bg", c_name, rng, config) if use_c else ""
        if use_t and _TEXTURE_NOUN[t_name] and rng.random() < 0.3:
            bg = f"on a {c_word + ' ' if c_word else ''}background with {_TEXTURE_NOUN[t_name]}"
        else:
            t_word = _TEXTURE_CAPTION[t_name] if use_t else ""
            if use_t and rng.random() < config.p_synonym:
                t_word = str(rng.choice(_TEXTURE_ADJECTIVES[t_name]))
            bg = "on a " + " ".join(w for w in (t_word, c_word) if w) + " background"
        text = f"{text} {bg}" if rng.random() < 0.7 else f"{bg[5:]}: {text}"
    prefix = str(rng.choice(["", "", "", "a picture of ", "an image showing ", "there is "]))
    return prefix + text, PromptSpec(objects=tuple(mentioned), texture=texture, bg_colour=bg_colour)
