"""Procedural scenes for pivot's miniature vision-language world: sampling, drawing, describing.

A scene is 1-4 flat-coloured shapes (circle, square, triangle, star, diamond, cross; six named
colours; small or large) on a background (solid colour, two-colour gradient or light noise) whose
colours never equal an object colour. :func:`render_scene` returns the RGB image and an
ADE20K-style class mask (0 = background/unlabeled, 1..K one per shape or one per colour, see
:data:`LABEL_CLASSES`) holding the visible (topmost) object of every pixel; objects are drawn without anti-aliasing, so
every visible pixel of an object has exactly its colour. :func:`sample_scene` only accepts scenes
whose questions have one unambiguous answer that can be re-derived from the pixels (see its
docstring). Everything is deterministic given a ``numpy.random.Generator``; only numpy and PIL
are used. The world writer that uses these scenes is :mod:`llava.data.synthetic`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
"""Object shapes; shape ``SHAPES[k]`` has class id ``k + 1`` in masks."""

CLASS_NAMES: tuple[str, ...] = ("unlabeled", *SHAPES)
"""Mask class names by id (``ade/classes.json``); 0 is background/unlabeled as in ADE20K."""

PLURALS: dict[str, str] = {shape: ("crosses" if shape == "cross" else f"{shape}s") for shape in SHAPES}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (245, 135, 20),
}
"""Object colours (exact RGB of every visible object pixel in the PNG images)."""

LABEL_CLASSES: dict[str, tuple[str, ...]] = {"shape": CLASS_NAMES, "colour": ("unlabeled", *COLOURS)}
"""Mask class names by id for each label kind: one class per shape or one per colour, 0 = unlabeled."""

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light grey": (190, 190, 190),
    "dark grey": (70, 70, 70),
    "black": (15, 15, 15),
    "beige": (225, 210, 170),
    "navy": (25, 35, 80),
}
"""Background colours; every mix of two of them stays far (> 60 per channel) from object colours."""

BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "noise")
GRADIENT_DIRECTIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal")
NOISE_AMPLITUDE = 10
"""Noise backgrounds add the same uniform integer in [-10, 10] to the three channels of a pixel."""

SIZES: dict[str, float] = {"small": 0.09, "large": 0.16}
"""Object radius as a fraction of the image size (jittered by +-10 %)."""

MIN_VISIBLE_FRACTION = 0.6
"""Objects may overlap, but each keeps at least this fraction of its pixels visible."""

MIN_VISIBLE_PIXELS = 12
POSITION_MARGIN = 0.1
"""Left/right relations are only stated when visible centres differ by this fraction of the width."""

LABEL_MARGIN = 0.85
"""The image-level label is the largest object's shape or colour; objects differing from it in shape
or colour must be smaller than this fraction of its visible area so either label is unambiguous."""

MIN_IMAGE_SIZE = 32


def article(word: str) -> str:
    """``"a"`` or ``"an"`` for ``word``."""
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Background:
    """How the background is painted; ``colours`` has one name (solid, noise) or two (gradient)."""

    kind: str
    colours: tuple[str, ...]
    direction: str = "none"
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in BACKGROUND_KINDS:
            raise ValueError(f"Background.kind {self.kind!r} is not one of {BACKGROUND_KINDS}")
        unknown = [c for c in self.colours if c not in BACKGROUND_COLOURS]
        if unknown:
            raise ValueError(f"Background colours {unknown} are not in {sorted(BACKGROUND_COLOURS)}")
        expected = 2 if self.kind == "gradient" else 1
        if len(self.colours) != expected:
            raise ValueError(f"a {self.kind} background needs {expected} colour(s), got {self.colours}")
        if self.kind == "gradient" and self.direction not in GRADIENT_DIRECTIONS:
            raise ValueError(f"gradient direction {self.direction!r} is not one of {GRADIENT_DIRECTIONS}")

    def describe(self) -> str:
        """Noun phrase such as ``"a beige to navy gradient background"``."""
        if self.kind == "gradient":
            return f"a {self.colours[0]} to {self.colours[1]} gradient background"
        if self.kind == "noise":
            return f"a textured {self.colours[0]} background"
        return f"{article(self.colours[0])} {self.colours[0]} background"


@dataclass(frozen=True)
class SceneObject:
    """One object; ``centre``/``radius`` in pixels, ``bbox`` = tight box of its full silhouette as
    ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive (``mask[y0:y1, x0:x1]`` holds every pixel)."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    radius: float
    bbox: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"SceneObject.shape {self.shape!r} is not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"SceneObject.colour {self.colour!r} is not one of {sorted(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"SceneObject.size {self.size!r} is not one of {sorted(SIZES)}")
        if self.radius <= 0:
            raise ValueError(f"SceneObject.radius must be positive, got {self.radius}")

    @property
    def class_id(self) -> int:
        """Mask class id of this object's shape."""
        return SHAPES.index(self.shape) + 1

    def label(self, kind: str) -> str:
        """The object's ``kind`` (a key of :data:`LABEL_CLASSES`): its shape or its colour."""
        if kind not in LABEL_CLASSES:
            raise ValueError(f"unknown label kind {kind!r}; known kinds: {sorted(LABEL_CLASSES)}")
        return self.shape if kind == "shape" else self.colour

    def phrase(self, with_size: bool = True) -> str:
        """``"large red circle"`` (or ``"red circle"``), without an article."""
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A scene; objects are listed in drawing order (later objects cover earlier ones)."""

    image_size: int
    background: Background
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"Scene.image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :func:`scene_from_dict` inverts it."""
        return asdict(self)


def scene_from_dict(data: dict[str, Any]) -> Scene:
    """Rebuild a :class:`Scene` from :meth:`Scene.to_dict` output (e.g. a line of ``scenes.jsonl``)."""
    background = data["background"]
    return Scene(
        image_size=int(data["image_size"]),
        background=Background(
            kind=background["kind"],
            colours=tuple(background["colours"]),
            direction=background["direction"],
            noise_seed=int(background["noise_seed"]),
        ),
        objects=tuple(
            SceneObject(
                shape=o["shape"],
                colour=o["colour"],
                size=o["size"],
                centre=(float(o["centre"][0]), float(o["centre"][1])),
                radius=float(o["radius"]),
                bbox=tuple(int(v) for v in o["bbox"]),
            )
            for o in data["objects"]
        ),
    )


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle shape of radius ``r`` centred at ``(cx, cy)``."""
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "triangle":
        t = 1.15 * r
        shift = 0.25 * t
        return [
            (cx + t * math.cos(a), cy + shift + t * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "star":
        return [
            (cx + rad * math.cos(a), cy + rad * math.sin(a))
            for k in range(10)
            for rad, a in [((r if k % 2 == 0 else 0.5 * r), -math.pi / 2 + k * math.pi / 5)]
        ]
    if shape == "cross":
        w = 0.35 * r
        pts = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"no outline for shape {shape!r}; known shapes: {SHAPES}")


def silhouette(shape: str, centre: tuple[float, float], radius: float, image_size: int) -> np.ndarray:
    """Boolean ``[image_size, image_size]`` mask of the pixels the shape covers (no anti-aliasing)."""
    canvas = Image.new("1", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        draw.polygon(_outline(shape, cx, cy, radius), fill=1)
    return np.array(canvas, dtype=bool)


def make_object(
    shape: str, colour: str, size: str, centre: tuple[float, float], radius: float, image_size: int
) -> SceneObject:
    """A :class:`SceneObject` whose ``bbox`` is measured on its rasterised silhouette."""
    pixels = silhouette(shape, centre, radius, image_size)
    if not pixels.any():
        raise ValueError(f"a {shape} at {centre} with radius {radius} covers no pixel of the image")
    ys, xs = np.nonzero(pixels)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return SceneObject(shape, colour, size, centre, radius, bbox)


def visible_masks(scene: Scene) -> list[np.ndarray]:
    """Per object, the boolean mask of its pixels not covered by a later object."""
    silhouettes = [silhouette(o.shape, o.centre, o.radius, scene.image_size) for o in scene.objects]
    covered = np.zeros((scene.image_size, scene.image_size), dtype=bool)
    visible = []
    for sil in reversed(silhouettes):
        visible.append(sil & ~covered)
        covered |= sil
    return visible[::-1]


def visible_centre(mask: np.ndarray) -> tuple[float, float]:
    """Mean ``(x, y)`` pixel index of a non-empty boolean mask."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def render_background(background: Background, image_size: int) -> np.ndarray:
    """``uint8 [image_size, image_size, 3]`` background pixels."""
    first = np.array(BACKGROUND_COLOURS[background.colours[0]], dtype=np.float64)
    if background.kind == "gradient":
        last = np.array(BACKGROUND_COLOURS[background.colours[1]], dtype=np.float64)
        ramp = np.linspace(0.0, 1.0, image_size)
        if background.direction == "horizontal":
            t = np.broadcast_to(ramp[None, :], (image_size, image_size))
        elif background.direction == "vertical":
            t = np.broadcast_to(ramp[:, None], (image_size, image_size))
        else:
            t = (ramp[None, :] + ramp[:, None]) / 2
        pixels = (1 - t)[..., None] * first + t[..., None] * last
        return np.rint(pixels).astype(np.uint8)
    pixels = np.broadcast_to(first, (image_size, image_size, 3)).copy()
    if background.kind == "noise":
        noise_rng = np.random.default_rng(background.noise_seed)
        pixels += noise_rng.integers(-NOISE_AMPLITUDE, NOISE_AMPLITUDE + 1, size=(image_size, image_size, 1))
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_scene(scene: Scene, classes: str = "shape") -> tuple[Image.Image, np.ndarray]:
    """The RGB image and the ``uint8`` class mask (0 = background, ``k`` = ``LABEL_CLASSES[classes][k]``).

    ``classes="shape"``: id ``SHAPES.index(s) + 1`` marks shape ``s``; ``"colour"``: one id per colour.
    """
    names = LABEL_CLASSES.get(classes)
    if names is None:
        raise ValueError(f"unknown mask classes {classes!r}; known: {sorted(LABEL_CLASSES)}")
    pixels = render_background(scene.background, scene.image_size)
    mask = np.zeros((scene.image_size, scene.image_size), dtype=np.uint8)
    for obj, visible in zip(scene.objects, visible_masks(scene)):
        pixels[visible] = COLOURS[obj.colour]
        mask[visible] = names.index(obj.label(classes))
    return Image.fromarray(pixels), mask


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation (8-neighbourhood)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def is_connected(mask: np.ndarray) -> bool:
    """True when the non-empty boolean ``mask`` is one 4-connected region."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return False
    mask = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    reached = np.zeros_like(mask)
    reached[0, xs[0] - xs.min()] = True
    while True:
        grown = reached.copy()
        grown[1:] |= reached[:-1]
        grown[:-1] |= reached[1:]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= mask
        if np.array_equal(grown, reached):
            return bool(np.array_equal(reached, mask))
        reached = grown


def largest_object(scene: Scene) -> int:
    """Index of the object with the most visible pixels (ties: the earliest)."""
    areas = [int(v.sum()) for v in visible_masks(scene)]
    return int(np.argmax(areas))


def _scene_is_valid(objects: list[SceneObject], silhouettes: list[np.ndarray]) -> bool:
    """Visibility, connectivity and same-shape separation constraints of :func:`sample_scene`."""
    new, new_sil = objects[-1], silhouettes[-1]
    grown = _dilate(new_sil)
    for obj, sil in zip(objects[:-1], silhouettes[:-1]):
        if obj.shape == new.shape and (grown & sil).any():
            return False
    covered = np.zeros_like(new_sil)
    for sil in reversed(silhouettes):
        visible = sil & ~covered
        count = int(visible.sum())
        if (
            count < MIN_VISIBLE_PIXELS
            or count < MIN_VISIBLE_FRACTION * sil.sum()
            or not is_connected(visible)
        ):
            return False
        covered |= sil
    return True


def _label_is_unambiguous(scene: Scene) -> bool:
    areas = [int(v.sum()) for v in visible_masks(scene)]
    top = scene.objects[int(np.argmax(areas))]
    return all(
        areas[i] < LABEL_MARGIN * max(areas)
        for i, obj in enumerate(scene.objects)
        if obj.shape != top.shape or obj.colour != top.colour
    )


def sample_background(rng: np.random.Generator) -> Background:
    """A random solid, gradient or noise background."""
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    names = list(BACKGROUND_COLOURS)
    if kind == "gradient":
        first, last = rng.choice(len(names), size=2, replace=False)
        direction = GRADIENT_DIRECTIONS[int(rng.integers(len(GRADIENT_DIRECTIONS)))]
        return Background(kind, (names[int(first)], names[int(last)]), direction)
    colour = names[int(rng.integers(len(names)))]
    seed = int(rng.integers(2**31)) if kind == "noise" else 0
    return Background(kind, (colour,), noise_seed=seed)


def _sample_object(rng: np.random.Generator, image_size: int) -> SceneObject:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    radius = round(SIZES[size] * image_size * float(rng.uniform(0.9, 1.1)), 2)
    low, high = radius + 1, image_size - 2 - radius
    centre = (round(float(rng.uniform(low, high)), 2), round(float(rng.uniform(low, high)), 2))
    return make_object(shape, colour, size, centre, radius, image_size)


def sample_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    min_objects: int = 1,
    max_objects: int = 4,
    max_attempts: int = 200,
) -> Scene:
    """Sample a scene with ``min_objects..max_objects`` objects (uniform count).

    Accepted scenes satisfy: every object lies inside the image; objects of the same shape do not
    touch (so shape counts equal connected components of the mask); objects of different shapes
    may overlap, but each keeps >= 60 % (and >= 12) of its pixels visible in one 4-connected
    region; the object with the largest visible area is larger (by :data:`LABEL_MARGIN`) than every
    object of another shape or colour, so the image-level label (shape or colour) is unambiguous.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    count = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(max_attempts):
        background = sample_background(rng)
        objects: list[SceneObject] = []
        silhouettes: list[np.ndarray] = []
        for _ in range(30 * count):
            if len(objects) == count:
                break
            candidate = _sample_object(rng, image_size)
            sil = silhouette(candidate.shape, candidate.centre, candidate.radius, image_size)
            if _scene_is_valid([*objects, candidate], [*silhouettes, sil]):
                objects.append(candidate)
                silhouettes.append(sil)
        if len(objects) == count:
            scene = Scene(image_size, background, tuple(objects))
            if _label_is_unambiguous(scene):
                return scene
    raise RuntimeError(
        f"could not place {count} objects in a {image_size}x{image_size} image in {max_attempts} attempts; "
        "use a larger image_size or a smaller max_objects"
    )


REGION_NAMES: tuple[tuple[str, str, str], ...] = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the centre", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)
"""Names of the cells of a 3x3 grid over the image, by row then column."""


def region_name(centre: tuple[float, float], image_size: int) -> str:
    """Where a point lies on the 3x3 grid of :data:`REGION_NAMES`, e.g. ``"in the top left"``."""
    col = min(int(3 * (centre[0] + 0.5) / image_size), 2)
    row = min(int(3 * (centre[1] + 0.5) / image_size), 2)
    return REGION_NAMES[row][col]


def relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """How point ``a`` lies relative to ``b``: the dominant axis of ``a - b``."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def describe_scene(scene: Scene) -> str:
    """Caption such as ``"a large red circle to the left of a small blue square on a navy background"``.

    Objects are named left to right (by visible centre); two objects are joined by their relation,
    more are listed with ``"from left to right"``.
    """
    centres = [visible_centre(v) for v in visible_masks(scene)]
    order = sorted(range(len(scene.objects)), key=lambda i: centres[i][0])
    phrases = [f"{article(scene.objects[i].size)} {scene.objects[i].phrase()}" for i in order]
    if len(order) == 1:
        body = phrases[0]
    elif len(order) == 2:
        body = f"{phrases[0]} {relation(centres[order[0]], centres[order[1]])} {phrases[1]}"
    else:
        body = f"{', '.join(phrases[:-1])} and {phrases[-1]}, from left to right,"
    return f"{body} on {scene.background.describe()}"


def list_objects(scene: Scene) -> str:
    """Short caption naming colours and shapes only, e.g. ``"a red circle and a blue square"``."""
    phrases = [f"{article(o.colour)} {o.phrase(with_size=False)}" for o in scene.objects]
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"
