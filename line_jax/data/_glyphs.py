"""notMNIST-style letter glyphs rendered from the fonts installed here.

notMNIST (Bulatov, 2011) is letters A-J drawn in many typefaces. Here the
typefaces are the TrueType / OpenType files that Debian's font packages put
under `/usr/share/fonts` (fonts-dejavu-core, fonts-dejavu-extra,
fonts-liberation, fonts-freefont-ttf, fonts-urw-base35: about 80 faces).
With the same font files and Pillow/FreeType the pixels are identical; with
none installed, Pillow's built-in font is used alone.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

LETTERS = "ABCDEFGHIJ"
FONT_DIRS = ("/usr/share/fonts/truetype", "/usr/share/fonts/opentype")
# Symbol and dingbat faces map A-J to pictograms, not letters.
_NOT_LATIN = ("D050000L", "StandardSymbols", "Dingbat", "Symbol")


@functools.lru_cache(maxsize=None)
def font_paths(dirs: tuple[str, ...] = FONT_DIRS) -> tuple[str, ...]:
  """Sorted `.ttf` / `.otf` files under `dirs`, symbol fonts left out."""
  found = set()
  for d in dirs:
    root = pathlib.Path(d)
    if root.is_dir():
      found.update(
          str(p) for p in root.rglob("*")
          if p.suffix.lower() in (".ttf", ".otf")
          and not any(tag in p.name for tag in _NOT_LATIN))
  return tuple(sorted(found))


@functools.lru_cache(maxsize=4096)
def _font(path: str | None, size: int) -> PIL.ImageFont.FreeTypeFont:
  if path is None:
    return PIL.ImageFont.load_default(size)
  return PIL.ImageFont.truetype(path, size)


def render_glyph(
    letter: str, font_path: str | None, font_size: int, dx: int, dy: int,
    side: int = 28,
) -> np.ndarray:
  """Draws one white letter on black, centred then shifted by `(dx, dy)`.

  Args:
    letter: the character to draw.
    font_path: a font file, or None for Pillow's built-in font.
    font_size: font size in pixels.
    dx, dy: shift of the glyph's box from the centre, in pixels.
    side: image side.

  Returns:
    uint8 `[side, side]`.
  """
  font = _font(font_path, font_size)
  left, top, right, bottom = font.getbbox(letter)
  x = (side - (right - left)) / 2 - left + dx
  y = (side - (bottom - top)) / 2 - top + dy
  image = PIL.Image.new("L", (side, side), 0)
  PIL.ImageDraw.Draw(image).text((x, y), letter, fill=255, font=font)
  return np.asarray(image)


def letter_glyphs(
    n: int, rng: np.random.Generator, side: int = 28,
    fonts: tuple[str, ...] | None = None,
) -> np.ndarray:
  """`n` random glyphs of A-J: random font, size and offset, drawn from `rng`.

  Args:
    n: number of images.
    rng: the only source of randomness.
    side: image side.
    fonts: font files; defaults to `font_paths()`.

  Returns:
    uint8 `[n, side, side]`.
  """
  fonts = font_paths() if fonts is None else fonts
  choices = fonts or (None,)
  letters = rng.integers(0, len(LETTERS), n)
  font_ids = rng.integers(0, len(choices), n)
  # Cap height ~0.7 x font size: 18-32 px fonts give 13-22 px letters.
  sizes = rng.integers(18, 33, n)
  shifts = rng.integers(-3, 4, (n, 2))
  out = np.empty((n, side, side), np.uint8)
  for i in range(n):
    out[i] = render_glyph(
        LETTERS[letters[i]], choices[font_ids[i]], int(sizes[i]),
        int(shifts[i, 0]), int(shifts[i, 1]), side)
  return out
