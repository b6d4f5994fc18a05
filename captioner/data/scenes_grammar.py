"""The language of the scenes corpus: its vocabulary, the caption grammar, and the parser.

The grammar writes COCO-style captions for a scene's ground truth (its ``meta``); the parser
reads objects and motion back out of any free text, so that a model's captions can be scored
against that ground truth (:func:`score_caption`). Both live here so that every phrase the
grammar can write is one the parser understands.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from captioner.errors import DatasetError
from captioner.vocab import tokenize

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
# No gray/grey/black: backgrounds are described as gray and must never read as an object.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
MOTIONS = ("left", "right", "up", "down", "grow", "shrink")
BACKGROUNDS = ("plain", "gradient", "noise", "texture")
# Spatial relation of objects[0] to objects[1] in a two-object scene.
RELATIONS = ("left of", "right of", "above", "below")
# Three-object scenes list their objects in this order (each clearly right of the previous).
LEFT_TO_RIGHT = "left to right"
CAPTIONS_PER_ITEM = 5

# ---------------------------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------------------------

_SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
_RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_INVERSE_RELATION = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
# "a red circle with a blue square to its right": where objects[1] is, seen from objects[0].
_OTHER_SIDE = {
    "left of": ("to its right", "on its right"),
    "right of": ("to its left", "on its left"),
    "above": ("below it", "underneath it"),
    "below": ("above it", "over it"),
}
_BACKGROUND_PHRASES = {
    "plain": ("gray", "plain gray", "plain"),
    "gradient": ("gradient", "shaded gray", "gray gradient"),
    "noise": ("noisy", "noisy gray", "grainy"),
    "texture": ("textured", "textured gray", "patterned"),
}
_MOTION_PHRASES = {
    "left": (
        "moves to the left",
        "moves left",
        "is moving left",
        "is moving to the left",
        "slides left",
        "slides to the left",
        "travels to the left",
        "goes left",
    ),
    "right": (
        "moves to the right",
        "moves right",
        "is moving right",
        "is moving to the right",
        "slides right",
        "slides to the right",
        "travels to the right",
        "goes right",
    ),
    "up": (
        "moves up",
        "moves upward",
        "is moving up",
        "slides up",
        "goes up",
        "rises",
        "travels upward",
    ),
    "down": (
        "moves down",
        "moves downward",
        "is moving down",
        "slides down",
        "goes down",
        "falls",
        "sinks",
        "drops",
    ),
    "grow": (
        "grows",
        "grows bigger",
        "grows larger",
        "gets bigger",
        "is getting larger",
        "is growing",
        "expands",
        "becomes larger",
    ),
    "shrink": (
        "shrinks",
        "gets smaller",
        "is getting smaller",
        "is shrinking",
        "becomes smaller",
        "shrinks in size",
        "contracts",
    ),
}
_STILL_PHRASES = ("stays still", "does not move", "stays in place", "is not moving", "stays put")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(obj: Mapping[str, Any], rng: np.random.Generator, size_p: float) -> str:
    """'small red circle' or 'red circle': the object without its article."""
    words = [obj["colour"], obj["shape"]]
    if size_p > 0 and rng.random() < size_p:
        words.insert(0, _pick(rng, _SIZE_WORDS[obj["size"]]))
    return " ".join(words)


def _position_phrase(obj: Mapping[str, Any]) -> str:
    """Where a lone object sits, in words: 'in the top left of the image'."""
    horizontal = "left" if obj["x"] < 0.4 else "right" if obj["x"] > 0.6 else ""
    vertical = "top" if obj["y"] < 0.4 else "bottom" if obj["y"] > 0.6 else ""
    if horizontal and vertical:
        return f"in the {vertical} {horizontal} of the image"
    if horizontal:
        return f"on the {horizontal} side of the image"
    if vertical:
        return f"at the {vertical} of the image"
    return "in the middle of the image"


def _list_phrase(nouns: Sequence[str]) -> str:
    return ", ".join(nouns[:-1]) + " and " + nouns[-1] if len(nouns) > 1 else nouns[0]


def _choose_captions(rng: np.random.Generator, templates: Sequence[Callable[[], str]]) -> list[str]:
    """Runs the templates in a random order until CAPTIONS_PER_ITEM distinct captions exist."""
    captions: list[str] = []
    for index in rng.permutation(len(templates)):
        caption = templates[int(index)]()
        if caption not in captions:
            captions.append(caption)
        if len(captions) == CAPTIONS_PER_ITEM:
            return captions
    raise AssertionError("the scenes grammar has too few templates for this scene")


def image_captions(meta: Mapping[str, Any], rng: np.random.Generator) -> list[str]:
    """Writes CAPTIONS_PER_ITEM distinct captions for an image scene's ground truth.

    Every caption names every object with its colour and shape; size words, relations,
    positions and the background are mentioned in some captions and not others.
    """
    objects = meta["objects"]
    bg = _BACKGROUND_PHRASES[meta["background"]]

    def a(obj: Mapping[str, Any], size_p: float = 0.35) -> str:
        return _article(_noun(obj, rng, size_p))

    def shuffled() -> list[Mapping[str, Any]]:
        return [objects[int(i)] for i in rng.permutation(len(objects))]

    def any_order() -> str:
        return _list_phrase([a(obj) for obj in shuffled()])

    templates: list[Callable[[], str]]
    if len(objects) == 1:
        (obj,) = objects
        templates = [
            lambda: a(obj, 0.5),
            lambda: f"{a(obj)} on a {_pick(rng, bg)} background",
            lambda: f"there is {a(obj)} in the {_pick(rng, ('picture', 'image'))}",
            lambda: f"a picture of {a(obj)}",
            lambda: f"{a(obj)} {_position_phrase(obj)}",
            lambda: f"a single {_noun(obj, rng, 0.5)}",
            lambda: f"{a(obj)} against a {_pick(rng, bg)} background",
            lambda: f"one {_noun(obj, rng, 0.5)} on a {_pick(rng, bg)} background",
        ]
    elif len(objects) == 2:
        first, second = objects
        relation = meta["relation"]
        inverse = _INVERSE_RELATION[relation]
        templates = [
            lambda: f"{a(first)} {_pick(rng, _RELATION_PHRASES[relation])} {a(second)}",
            lambda: f"{a(second)} {_pick(rng, _RELATION_PHRASES[inverse])} {a(first)}",
            lambda: f"there is {any_order()}",
            lambda: f"{a(first)} is {_pick(rng, _RELATION_PHRASES[relation])} {a(second)}",
            lambda: f"{any_order()} on a {_pick(rng, bg)} background",
            lambda: f"{a(first)} with {a(second)} {_pick(rng, _OTHER_SIDE[relation])}",
            lambda: f"two shapes, {any_order()}",
            lambda: f"a picture of {any_order()}",
            lambda: (
                f"{a(first)} {_pick(rng, _RELATION_PHRASES[relation])} {a(second)}"
                f" on a {_pick(rng, bg)} background"
            ),
            lambda: f"{a(first, 0.0)} next to {a(second, 0.0)} on a {_pick(rng, bg)} background",
        ]
    else:
        left, middle, right = objects
        templates = [
            lambda: _list_phrase([a(obj) for obj in objects]),
            lambda: f"there is {any_order()}",
            lambda: f"{_list_phrase([a(obj) for obj in objects])} from left to right",
            lambda: f"from left to right, {_list_phrase([a(obj) for obj in objects])}",
            lambda: f"{a(middle)} between {a(left)} and {a(right)}",
            lambda: f"three shapes: {any_order()}",
            lambda: f"{any_order()} on a {_pick(rng, bg)} background",
            lambda: f"{a(left)} to the left of {a(middle)} and {a(right)}",
            lambda: f"{a(right)} to the right of {a(left)} and {a(middle)}",
            lambda: f"a picture of {any_order()}",
        ]
    return _choose_captions(rng, templates)


def _passes(mover: Mapping[str, Any], motion: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether a sliding mover goes past the other object (which sits off its path)."""
    if motion["kind"] in ("grow", "shrink"):
        return False
    axis = "x" if motion["kind"] in ("left", "right") else "y"
    low, high = sorted((mover[axis], motion["end"][axis]))
    return low < other[axis] < high


def clip_captions(meta: Mapping[str, Any], rng: np.random.Generator) -> list[str]:
    """Writes CAPTIONS_PER_ITEM distinct captions for a motion clip's ground truth.

    Every caption names the moving object and its motion, and names the static object too
    when there is one (so every caption can be scored for attributes and for motion).
    """
    objects = meta["objects"]
    kind = meta["motion"]["kind"]
    mover = objects[meta["motion"]["object"]]
    others = [obj for i, obj in enumerate(objects) if i != meta["motion"]["object"]]
    bg = _BACKGROUND_PHRASES[meta["background"]]

    def moving() -> str:
        return _pick(rng, _MOTION_PHRASES[kind])

    def m() -> str:
        return _article(_noun(mover, rng, 0.0))

    templates: list[Callable[[], str]]
    if not others:
        templates = [
            lambda: f"{m()} {moving()}",
            lambda: f"the {_noun(mover, rng, 0.0)} {moving()}",
            lambda: f"{m()} {moving()} on a {_pick(rng, bg)} background",
            lambda: f"a video of {m()} that {moving()}",
            lambda: f"there is {m()} and it {moving()}",
            lambda: f"{m()} {moving()} steadily",
            lambda: f"{m()} on a {_pick(rng, bg)} background {moving()}",
        ]
    else:
        (other,) = others

        def d() -> str:
            return _article(_noun(other, rng, 0.0))

        def still() -> str:
            return _pick(rng, _STILL_PHRASES)

        templates = [
            lambda: f"{m()} {moving()} while {d()} {still()}",
            lambda: f"{d()} {still()} while {m()} {moving()}",
            lambda: f"{m()} {moving()} and {d()} {still()}",
            lambda: f"{d()} and {m()} that {moving()}",
            lambda: f"there is {d()} and {m()} that {moving()}",
            lambda: f"{m()} {moving()} on a {_pick(rng, bg)} background with {d()}",
            lambda: f"a video of {m()} that {moving()} while {d()} {still()}",
        ]
        if _passes(mover, meta["motion"], other):
            templates.append(lambda: f"{m()} {moving()} past {d()}")
    return _choose_captions(rng, templates)


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

_COLOUR_WORDS = frozenset(COLOURS)
_SHAPE_WORDS = frozenset(SHAPES)
# Words allowed between a colour and its shape: "a red small circle", "a blue big square".
_MODIFIERS = frozenset(
    {"small", "little", "tiny", "large", "big", "huge", "medium", "bright", "dark", "light"}
)
# Verbs that take a direction: "moves to the left", "slides up", "heading right".
_MOVE_VERBS = frozenset(
    {"move", "moves", "moving", "moved", "slide", "slides", "sliding", "slid"}
    | {"go", "goes", "going", "went", "glide", "glides", "gliding", "glided"}
    | {"travel", "travels", "travelling", "traveling", "travelled", "traveled"}
    | {"drift", "drifts", "drifting", "drifted", "shift", "shifts", "shifting", "shifted"}
    | {"head", "heads", "heading", "headed"}
)
_DIRECTIONS = {
    "left": "left",
    "leftward": "left",
    "leftwards": "left",
    "right": "right",
    "rightward": "right",
    "rightwards": "right",
    "up": "up",
    "upward": "up",
    "upwards": "up",
    "down": "down",
    "downward": "down",
    "downwards": "down",
}
# Words that may sit between a motion verb and its direction: "moves slowly to the left".
_MOTION_FILLERS = frozenset(
    {"to", "the", "toward", "towards", "slowly", "steadily", "smoothly", "quickly", "gradually"}
)
_MOTION_FILLER_WINDOW = 3
_IMPLIED_MOTION = {
    **dict.fromkeys(("rise", "rises", "rising", "rose", "climb", "climbs", "climbing"), "up"),
    **dict.fromkeys(("ascend", "ascends", "ascending"), "up"),
    **dict.fromkeys(("fall", "falls", "falling", "fell", "drop", "drops", "dropping"), "down"),
    **dict.fromkeys(("sink", "sinks", "sinking", "sank", "descend", "descends"), "down"),
    **dict.fromkeys(("grow", "grows", "growing", "grew", "expand", "expands"), "grow"),
    **dict.fromkeys(("expanding", "expanded", "enlarge", "enlarges", "enlarging"), "grow"),
    **dict.fromkeys(("shrink", "shrinks", "shrinking", "shrank", "shrunk"), "shrink"),
    **dict.fromkeys(("contract", "contracts", "contracting", "contracted"), "shrink"),
}
# "gets bigger", "becoming smaller", "grows smaller": a change verb then a comparative.
_CHANGE_VERBS = frozenset(
    {"get", "gets", "getting", "got", "become", "becomes", "becoming", "became"}
    | {"grow", "grows", "growing", "grew", "turn", "turns", "turning"}
)
_COMPARATIVES = {"bigger": "grow", "larger": "grow", "smaller": "shrink"}
_COMPARATIVE_FILLERS = frozenset({"much", "even", "slowly", "steadily", "gradually"})
# "increases in size", "decreasing in size".
_SIZE_CHANGE = {
    **dict.fromkeys(("increase", "increases", "increasing", "increased"), "grow"),
    **dict.fromkeys(("decrease", "decreases", "decreasing", "decreased"), "shrink"),
}
_NEGATIONS = frozenset({"not", "never", "n't"})  # "doesn't" is "does n't" to the tokenizer
# Punctuation ends a phrase: "the circle is red, the square blue" names no red square. The
# vocab's tokenizer drops punctuation (the model never writes any), so the parser splits
# phrases first and reads each one's words exactly as the vocab does.
_PUNCTUATION = re.compile(r"[^\w\s'\u2019-]")
_PHRASE_END = ","


@dataclass
class ParsedCaption:
    """What a caption says about a scene: its objects and, if any, the motion it describes.

    ``objects`` lists (colour, shape) pairs in the order the caption mentions them.
    ``motion`` is one of MOTIONS, or None when the caption names no motion or contradicts itself.
    ``mover`` indexes ``objects``: the object the motion is said of (the nearest one before the
    motion phrase, else the first after it), or None.
    """

    objects: list[tuple[str, str]] = field(default_factory=list)
    motion: str | None = None
    mover: int | None = None


def _objects(tokens: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
    """(colour, shape) pairs and their token spans: a colour, modifiers, then a shape."""
    objects: list[tuple[str, str]] = []
    spans: list[tuple[int, int]] = []
    for start, token in enumerate(tokens):
        if token not in _COLOUR_WORDS:
            continue
        end = start + 1
        while end < len(tokens) and tokens[end] in _MODIFIERS:
            end += 1
        if end < len(tokens) and tokens[end] in _SHAPE_WORDS:
            objects.append((token, tokens[end]))
            spans.append((start, end))
    return objects, spans


def _skip(tokens: Sequence[str], i: int, fillers: frozenset[str], window: int) -> int:
    """The first non-filler token index from ``i`` on, skipping at most ``window`` fillers."""
    limit = min(len(tokens), i + window)
    while i < limit and tokens[i] in fillers:
        i += 1
    return i


def _motion_at(tokens: Sequence[str], i: int) -> str | None:
    """The motion kind of a phrase starting at token ``i``, or None if none starts there."""
    token = tokens[i]
    after = tokens[i + 1] if i + 1 < len(tokens) else ""
    if token in _MOVE_VERBS:
        j = _skip(tokens, i + 1, _MOTION_FILLERS, _MOTION_FILLER_WINDOW)
        if j < len(tokens) and tokens[j] == "from":  # "moves from (the) left to (the) right"
            j = _skip(tokens, j + 1, _MOTION_FILLERS, _MOTION_FILLER_WINDOW)
            if j + 1 < len(tokens) and tokens[j] in _DIRECTIONS and tokens[j + 1] == "to":
                j = _skip(tokens, j + 1, _MOTION_FILLERS, _MOTION_FILLER_WINDOW)
        return _DIRECTIONS.get(tokens[j]) if j < len(tokens) else None
    if token in _CHANGE_VERBS:
        j = _skip(tokens, i + 1, _COMPARATIVE_FILLERS, 2)
        if j < len(tokens) and tokens[j] in _COMPARATIVES:
            return _COMPARATIVES[tokens[j]]
    if token in _SIZE_CHANGE and after == "in":
        return _SIZE_CHANGE[token]
    return _IMPLIED_MOTION.get(token)


def _words(text: str) -> list[str]:
    """The caption's words as ``vocab.tokenize`` reads them, with a mark where a phrase ends."""
    words: list[str] = []
    for phrase in _PUNCTUATION.split(text):
        words += [*tokenize(phrase), _PHRASE_END]
    return words


def parse_caption(text: str) -> ParsedCaption:
    """Reads the objects and the motion that any free-text caption describes.

    An object is a colour word followed by a shape word (size words may sit between); a colour
    or a shape on its own is not an object. A motion is a verb phrase such as "moves to the
    left", "slides up", "gets bigger" or "shrinks"; a negated one ("does not move left") does
    not count, and a caption naming two different motions has no motion.
    """
    tokens = _words(text)
    objects, spans = _objects(tokens)
    mentions: list[tuple[int, str]] = []
    for i in range(len(tokens)):
        kind = _motion_at(tokens, i)
        if kind is not None and not _NEGATIONS.intersection(tokens[max(0, i - 2) : i]):
            mentions.append((i, kind))
    if not mentions or len({kind for _, kind in mentions}) > 1:
        return ParsedCaption(objects=objects)
    position, kind = mentions[0]
    before = [k for k, (_, end) in enumerate(spans) if end < position]
    after = [k for k, (start, _) in enumerate(spans) if start > position]
    mover = before[-1] if before else after[0] if after else None
    return ParsedCaption(objects=objects, motion=kind, mover=mover)


def score_caption(text: str, meta: Mapping[str, Any]) -> dict[str, bool]:
    """Scores a caption against a scene's ground truth.

    ``attributes`` is True iff the caption names exactly the scene's objects, each by colour
    and shape (a multiset comparison: a missing, extra or recoloured object fails). For a
    motion clip, ``motion`` is True iff the caption says that the moving object (by colour and
    shape) makes the right motion.
    """
    try:
        truth = Counter((obj["colour"], obj["shape"]) for obj in meta["objects"])
        motion = meta.get("motion")
        if motion is not None:
            moving = meta["objects"][motion["object"]]
            expected = ((moving["colour"], moving["shape"]), motion["kind"])
    except (AttributeError, KeyError, IndexError, TypeError) as error:
        raise DatasetError(
            f"scene meta is malformed ({error!r}): it needs 'objects' with 'colour' and 'shape',"
            " and for a clip 'motion' with 'object' and 'kind'; regenerate the corpus"
        ) from error
    parsed = parse_caption(text)
    scores = {"attributes": Counter(parsed.objects) == truth}
    if motion is not None:
        said = None if parsed.mover is None else (parsed.objects[parsed.mover], parsed.motion)
        scores["motion"] = said == expected
    return scores


__all__ = [
    "BACKGROUNDS",
    "CAPTIONS_PER_ITEM",
    "COLOURS",
    "LEFT_TO_RIGHT",
    "MOTIONS",
    "RELATIONS",
    "SHAPES",
    "ParsedCaption",
    "clip_captions",
    "image_captions",
    "parse_caption",
    "score_caption",
]
