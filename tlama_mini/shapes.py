"""A seeded synthetic image-caption data set for training a tiny vision-language model on a CPU.

Each image holds one coloured shape (square, circle, triangle or cross) in one quadrant, of a
random size, jittered position and shade, on a noisy dark background; its caption is made from the
same parameters: "a red circle at top left". Nothing is downloaded and the same seed gives the
same images. Captions use a word-level vocabulary (`VOCAB`), with the image token first:

    <img> x tokens_per_image, <bos>, a, red, circle, at, top, left, <eos>

Legend: I images, S image_size, T sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("square", "circle", "triangle", "cross")
ROWS, COLUMNS = ("top", "bottom"), ("left", "right")
SPECIALS = ("<pad>", "<img>", "<bos>", "<eos>")
VOCAB = (*SPECIALS, "a", "at", *COLOURS, *SHAPES, *ROWS, *COLUMNS)
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
PAD, IMG, BOS, EOS = (WORD_ID[s] for s in SPECIALS)
CAPTION_LEN = 6  # a, colour, shape, at, row, column


@dataclass(frozen=True)
class Shape:
    """What one image shows: the caption's words plus how it is drawn (centre and half-size in pixels)."""

    colour: str
    shape: str
    row: str
    column: str
    cx: float
    cy: float
    half: float

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} at {self.row} {self.column}"


def random_shape(image_size: int, g: torch.Generator) -> Shape:
    """Draw the parameters of one shape: a uniform choice of each word, size and jitter inside its quadrant."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def uniform(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    colour, shape, row, column = pick(list(COLOURS)), pick(SHAPES), pick(ROWS), pick(COLUMNS)
    q = image_size / 2  # side of a quadrant
    half = uniform(0.36, 0.44) * q
    cx = (q if column == "right" else 0) + q / 2 + uniform(-1, 1) * (q / 2 - half)
    cy = (q if row == "bottom" else 0) + q / 2 + uniform(-1, 1) * (q / 2 - half)
    return Shape(colour, shape, row, column, cx, cy, half)


def shape_mask(s: Shape, image_size: int) -> torch.Tensor:
    """Which pixels the shape covers: (S, S) bool, pixel centres at (x + 0.5, y + 0.5)."""
    c = torch.arange(image_size, dtype=torch.float32) + 0.5
    dx, dy = c[None, :] - s.cx, c[:, None] - s.cy  # (1, S), (S, 1)
    if s.shape == "square":
        return (dx.abs() <= s.half * 0.85) & (dy.abs() <= s.half * 0.85)
    if s.shape == "circle":
        return dx ** 2 + dy ** 2 <= s.half ** 2
    if s.shape == "triangle":  # apex up: narrower towards the top
        return (dy.abs() <= s.half) & (dx.abs() <= (dy + s.half) / 2)
    arm = s.half * 0.35  # cross
    return ((dx.abs() <= arm) & (dy.abs() <= s.half)) | ((dy.abs() <= arm) & (dx.abs() <= s.half))


def draw(s: Shape, image_size: int, g: torch.Generator) -> torch.Tensor:
    """The image of one shape: (3, S, S) float in [0, 1], noisy background, slightly varied shade."""
    img = 0.15 * torch.rand(3, image_size, image_size, generator=g)
    colour = torch.tensor(COLOURS[s.colour]) * (0.85 + 0.15 * torch.rand((), generator=g))  # (3,)
    mask = shape_mask(s, image_size)
    return torch.where(mask, colour[:, None, None].expand_as(img), img)


def make_shapes(n: int, *, seed: int, image_size: int = 16) -> tuple[torch.Tensor, list[Shape]]:
    """n images (n, 3, S, S) and their parameters; the same seed gives the same data set."""
    if n <= 0 or image_size < 8:
        raise ValueError(f"need n > 0 images of image_size >= 8 pixels; got n={n}, image_size={image_size}")
    g = torch.Generator().manual_seed(seed)
    shapes = [random_shape(image_size, g) for _ in range(n)]
    return torch.stack([draw(s, image_size, g) for s in shapes]), shapes


def encode_caption(caption: str) -> list[int]:
    words = caption.split()
    unknown = [w for w in words if w not in WORD_ID or w in SPECIALS]
    if unknown:
        raise ValueError(f"words {unknown} are not in the shapes vocabulary {VOCAB[len(SPECIALS):]}")
    return [WORD_ID[w] for w in words]


def decode_caption(ids: list[int] | torch.Tensor) -> str:
    """Word ids -> caption text, stopping at <eos>."""
    words = []
    for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        if i == EOS:
            break
        words.append(VOCAB[i] if 0 <= i < len(VOCAB) else f"<{i}?>")
    return " ".join(words)


def prompt_tokens(n: int, tokens_per_image: int) -> torch.Tensor:
    """The prompt of each row: the image's tokens, then <bos>. (n, tokens_per_image + 1)."""
    return torch.tensor([IMG] * tokens_per_image + [BOS]).repeat(n, 1)


def training_batch(shapes: list[Shape], tokens_per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (I, T) for captioning: the prompt, the caption, <eos>. Targets
    are -100 (ignored) wherever the next token is part of the prompt, so only the caption is learnt."""
    rows = [prompt_tokens(1, tokens_per_image)[0].tolist() + encode_caption(s.caption) + [EOS] for s in shapes]
    seq = torch.tensor(rows)  # (I, T + 1)
    targets = seq[:, 1:].clone()
    targets[:, :tokens_per_image] = -100  # the next token is <img> or <bos>: given, not predicted
    return seq[:, :-1], targets
