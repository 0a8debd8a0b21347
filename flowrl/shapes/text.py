"""Text rendering in the embedded "shapes" domain: signs with a short word, for OCR rewards and benchmarks.

A text scene is one rectangular sign of a colour from :data:`~flowrl.shapes.render.COLORS` with one upper-case word
of :data:`WORDS` centred on it in white or black (whichever contrasts with the sign, :data:`TEXT_COLOR`), near the
image centre (:data:`MAX_JITTER`), on the grey background of the shapes domain. It is drawn at 4× resolution and
box-filtered to 64×64 like the shape scenes. The font is Pillow's bundled scalable font
(``ImageFont.load_default(size=...)``, Aileron Regular; it needs Pillow built with FreeType, as every PyPI wheel is),
so rendering needs no system fonts.

Prompts follow Flow-GRPO's OCR prompt format — the word in double quotes, e.g. ``a blue sign that says "STOP"``.
Their metadata records are ``{"prompt", "tag", "text", "color"}`` (``color`` is ``None`` when the prompt names no
colour); the ``ocr`` reward reads ``metadata["text"]``.

:func:`make_text_splits` makes the disjoint splits that ``scripts/make_prompts.py`` writes: pretraining captions, RL
training prompts (only :data:`RL_WORDS`) and held-out prompts. Held-out prompts are tagged ``ocr`` (a word RL trains
on, in a prompt it never sees) or ``ocr_new_word`` (one of :data:`HELDOUT_WORDS`, which RL never sees but pretraining
does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flowrl.shapes.render import BACKGROUND, COLORS, IMAGE_SIZE, SUPERSAMPLE

# 24 common 3–4 letter words, each one token of the CLIP BPE (so the text encoder sees the word, not its letters).
# The vocabulary is small on purpose: a 2.3 M-parameter MMDiT must learn the glyphs of a word from its single token
# (with 60 words it had learnt none after 1,500 steps, assets/README.md).
WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "STOP", "OPEN", "FISH", "BOOK", "TREE", "MOON", "STAR", "HOME", "CAFE",
    "BUS", "CAR", "HAT", "CUP", "MILK", "SALE", "EXIT", "PARK", "SHOP", "FOOD", "TAXI", "ZOO",
)
# RL never trains on these (every fourth word); the held-out file tags their prompts ``ocr_new_word``.
HELDOUT_WORDS: tuple[str, ...] = WORDS[3::4]
RL_WORDS: tuple[str, ...] = tuple(w for w in WORDS if w not in HELDOUT_WORDS)
# Text colour per sign colour: white on dark signs, black on light ones.
TEXT_COLOR: dict[str, str] = {
    "red": "white", "orange": "black", "yellow": "black", "green": "white", "blue": "white", "purple": "white",
    "pink": "black", "brown": "white", "black": "white", "white": "black",
}
# Prompt templates (Flow-GRPO OCR style: the target text between double quotes). ``{c}`` is a colour name.
TEMPLATES_COLOR = ('a {c} sign that says "{w}"', 'a {c} sign with the word "{w}"', 'the word "{w}" on a {c} sign')
TEMPLATES_PLAIN = ('a sign that says "{w}"', 'a sign with the word "{w}"')
FONT_SIZE = 18          # px at IMAGE_SIZE (cap height ≈ 13 px)
MAX_TEXT_WIDTH = 55     # px: longer words are drawn with a smaller font so that the sign fits
PAD_X, PAD_Y = 3, 2     # px of sign around the text
# px: signs are centred up to this offset. Anywhere in the image, the tiny model had learnt sign size and colour but
# no legible glyph after 2,500 steps (assets/README.md); near the centre each word is a few fixed glyph patterns.
MAX_JITTER = 4.0


@dataclass(frozen=True)
class TextSign:
    """One sign of a text scene.

    Attributes:
        word: the text drawn (any string the font can draw; :data:`WORDS` in the embedded data).
        color: sign colour, a key of :data:`~flowrl.shapes.render.COLORS`.
        cx, cy: centre of the sign in pixels (x to the right, y downwards).
        font_size: font size in pixels at ``IMAGE_SIZE`` (before supersampling).
    """

    word: str
    color: str
    cx: float
    cy: float
    font_size: float = FONT_SIZE


@functools.lru_cache(maxsize=64)
def _font(size_px: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size_px)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType: only a fixed-size bitmap font
        raise RuntimeError("text rendering needs Pillow with FreeType support (every PyPI wheel has it); "
                           "reinstall Pillow with `pip install --force-reinstall pillow`")
    return font


def text_size(word: str, font_size: float) -> tuple[float, float]:
    """Width and height in pixels (at ``IMAGE_SIZE``) of ``word`` drawn at ``font_size``."""
    font = _font(int(round(font_size * SUPERSAMPLE)))
    x0, y0, x1, y1 = font.getbbox(word)
    return (x1 - x0) / SUPERSAMPLE, (y1 - y0) / SUPERSAMPLE


def fitted_font_size(word: str, max_width: float = MAX_TEXT_WIDTH, size: float = FONT_SIZE) -> float:
    """``size``, or the largest size (in quarter pixels) at which ``word`` is at most ``max_width`` px wide."""
    w, _ = text_size(word, size)
    return size if w <= max_width else _floor_quarter(size * max_width / w)


def _floor_quarter(x: float) -> float:
    return int(x * SUPERSAMPLE) / SUPERSAMPLE


def sign_box(sign: TextSign) -> tuple[float, float, float, float]:
    """The sign's rectangle ``(x0, y0, x1, y1)`` in pixels: the text's extent plus ``PAD_X`` / ``PAD_Y``."""
    w, h = text_size(sign.word, sign.font_size)
    return (sign.cx - w / 2 - PAD_X, sign.cy - h / 2 - PAD_Y, sign.cx + w / 2 + PAD_X, sign.cy + h / 2 + PAD_Y)


def render_text_scene(signs: list[TextSign], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Render ``signs`` (later ones on top) on the grey background of the shapes domain.

    Returns:
        ``uint8`` array ``[image_size, image_size, 3]`` (RGB, 0–255).

    Raises:
        ValueError: an unknown sign colour.
    """
    s = SUPERSAMPLE
    img = Image.new("RGB", (image_size * s, image_size * s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for sign in signs:
        if sign.color not in COLORS:
            raise ValueError(f"unknown sign colour {sign.color!r}; expected one of {tuple(COLORS)}")
        font = _font(int(round(sign.font_size * s)))
        draw.rectangle(tuple(round(v * s) for v in sign_box(sign)), fill=COLORS[sign.color])
        x0, y0, x1, y1 = font.getbbox(sign.word)
        tx = sign.cx * s - (x1 - x0) / 2 - x0
        ty = sign.cy * s - (y1 - y0) / 2 - y0
        draw.text((tx, ty), sign.word, font=font, fill=COLORS[TEXT_COLOR[sign.color]])
    img = img.resize((image_size, image_size), Image.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def sign_for_metadata(metadata: dict, rng: np.random.Generator, image_size: int = IMAGE_SIZE,
                      jitter: float = MAX_JITTER) -> TextSign:
    """A random sign satisfying an OCR metadata record: its ``text``, its ``color`` (random when ``None``), a font
    size between 90 % and 100 % of the fitted size, and its centre within ``jitter`` px of the image centre (kept
    so that the whole sign is inside the image).

    Raises:
        ValueError: the record has no ``text``, or the text cannot fit in the image.
    """
    word = metadata.get("text")
    if not word:
        raise ValueError(f"OCR metadata record {metadata!r} has no 'text'")
    color = metadata.get("color") or str(rng.choice(list(TEXT_COLOR)))
    size = fitted_font_size(word) * float(rng.uniform(0.9, 1.0))
    w, h = text_size(word, size)
    half_w, half_h = w / 2 + PAD_X + 1, h / 2 + PAD_Y + 1
    if 2 * half_w > image_size or 2 * half_h > image_size:
        raise ValueError(f"text {word!r} does not fit a {image_size}px image")
    c = image_size / 2
    cx = float(np.clip(c + rng.uniform(-jitter, jitter), half_w, image_size - half_w))
    cy = float(np.clip(c + rng.uniform(-jitter, jitter), half_h, image_size - half_h))
    return TextSign(word, color, cx, cy, size)


def text_prompts(words: tuple[str, ...] = WORDS) -> list[dict]:
    """Every OCR prompt of the domain for ``words``: each word with each coloured template and colour, and with each
    plain template (``color: None``). Records ``{"prompt", "tag": "ocr", "text", "color"}``, in a fixed order."""
    out = []
    for w in words:
        for t in TEMPLATES_COLOR:
            out += [{"prompt": t.format(c=c, w=w), "tag": "ocr", "text": w, "color": c} for c in TEXT_COLOR]
        out += [{"prompt": t.format(w=w), "tag": "ocr", "text": w, "color": None} for t in TEMPLATES_PLAIN]
    return out


def make_text_splits(seed: int = 0, test_per_word: int = 4) -> dict[str, list[dict]]:
    """Disjoint prompt splits of the text domain.

    Returns:
        ``{"pretrain", "train", "test"}``. ``test``: ``test_per_word`` random coloured prompts per word of
        :data:`WORDS` (tag ``ocr`` for :data:`RL_WORDS`, ``ocr_new_word`` for :data:`HELDOUT_WORDS`);
        ``pretrain``: every other prompt (all words); ``train`` (RL): the ``pretrain`` prompts of :data:`RL_WORDS`.
        No prompt string is in two of ``test`` and ``pretrain``/``train``.
    """
    rng = np.random.default_rng(seed)
    test, pretrain = [], []
    for w in WORDS:
        recs = text_prompts((w,))
        colored = [i for i, r in enumerate(recs) if r["color"] is not None]
        held = set(rng.choice(colored, size=test_per_word, replace=False).tolist())
        for i, r in enumerate(recs):
            if i in held:
                test.append({**r, "tag": "ocr" if w in RL_WORDS else "ocr_new_word"})
            else:
                pretrain.append(r)
    train = [r for r in pretrain if r["text"] in RL_WORDS]
    return {"pretrain": pretrain, "train": train, "test": test}


def sample_text_caption(rng: np.random.Generator, records: list[dict]) -> tuple[np.ndarray, str]:
    """One captioned text scene for pretraining: a random record of ``records`` rendered by
    :func:`sign_for_metadata`. Returns the ``uint8 [64, 64, 3]`` image and the prompt."""
    md = records[int(rng.integers(len(records)))]
    return render_text_scene([sign_for_metadata(md, rng)]), md["prompt"]
