"""Labelled picture grids: a header over every column, a caption under every row (``cnc sample``'s ``sheet.png``,
``cnc eval``'s ``grid.png``, the HTML report's worst-sample strips).

A grid says what it shows without the docs at hand: each column is titled (``fg photo``, ``fg depth``, a model's
name...), each row carries its own text (seed, sample key, prompt). Tiles may be PIL images, ``(H, W, 3)`` uint8
arrays, ``(H, W)`` uint8 / uint16 maps or float maps in [0, 1]; ``None`` leaves a cell blank. Drawn with Pillow
(the font helpers of :mod:`triplets.inspect.render`), so renders do not depend on matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from triplets.inspect.render import _clip, _fit, _font

#: Text colours: column headers, a row's first line, the rest of its caption.
HEADER_COLOR, TITLE_COLOR, TEXT_COLOR = (0, 0, 0), (40, 40, 140), (40, 40, 40)


@dataclass
class GridRow:
    """One row: its tiles (one per column; ``None`` = blank) and its caption (the first line drawn bold-coloured,
    then the rest wrapped over the remaining caption lines)."""

    tiles: Sequence
    title: str = ""
    text: str = ""


def to_rgb_tile(tile, size: tuple[int, int]) -> Image.Image:
    """A tile as an RGB PIL image of ``size`` = (width, height).

    ``(H, W)`` uint16 maps are read as ``/ 65535``, float arrays as values in [0, 1] (clipped), uint8 as is.
    """
    if isinstance(tile, Image.Image):
        img = tile
    else:
        arr = np.asarray(tile)
        if arr.dtype == np.uint16:
            arr = (arr.astype(np.float64) / 65535 * 255).round().astype(np.uint8)
        elif arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        img = Image.fromarray(arr)
    img = img.convert("RGB")
    return img if img.size == size else img.resize(size, Image.BILINEAR)


@dataclass(frozen=True)
class GridGeometry:
    """Pixel geometry of a :func:`labelled_grid` (tests locate tiles with :meth:`tile_box`)."""

    columns: int
    rows: int
    tile_w: int
    tile_h: int
    header_h: int
    row_h: int
    line_h: int
    footer_h: int
    gap: int = 4
    margin: int = 8

    @property
    def size(self) -> tuple[int, int]:
        return (2 * self.margin + self.columns * self.tile_w + (self.columns - 1) * self.gap,
                2 * self.margin + self.header_h + self.rows * self.row_h + self.footer_h)

    def tile_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a tile (PIL ``crop`` box)."""
        x = self.margin + col * (self.tile_w + self.gap)
        y = self.margin + self.header_h + row * self.row_h
        return x, y, x + self.tile_w, y + self.tile_h

    def header_box(self, col: int) -> tuple[int, int, int, int]:
        x = self.margin + col * (self.tile_w + self.gap)
        return x, self.margin, x + self.tile_w, self.margin + self.header_h

    def caption_box(self, row: int) -> tuple[int, int, int, int]:
        _, top, _, bottom = self.tile_box(row, 0)
        return self.margin, bottom + 2, self.size[0] - self.margin, top + self.row_h


def grid_geometry(columns: Sequence[str], n_rows: int, tile: tuple[int, int] | int, *, caption_lines: int = 3,
                  gap: int = 4, margin: int = 8, font_size: int | None = None, footer: str = "",
                  n_cols: int | None = None) -> GridGeometry:
    """The geometry :func:`labelled_grid` draws with the same arguments."""
    tw, th = (tile, tile) if isinstance(tile, int) else tile
    fs = font_size or grid_font_size(tw)
    font, line = _font(fs), fs + 4
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header_lines = max((len(_two_lines(t, tw, probe, font)) for t in columns), default=1)
    return GridGeometry(columns=max(len(columns), n_cols or 0), rows=n_rows, tile_w=tw, tile_h=th,
                        header_h=line * header_lines + 4, row_h=th + 2 + caption_lines * line + 6, line_h=line,
                        footer_h=line if footer else 0, gap=gap, margin=margin)


def grid_font_size(tile_w: int) -> int:
    """Text size for a tile width: 1/20 of it within [11, 22] px."""
    return int(min(22, max(11, tile_w // 20)))


def labelled_grid(columns: Sequence[str], rows: Sequence[GridRow], tile: tuple[int, int] | int, *,
                  caption_lines: int = 3, gap: int = 4, margin: int = 8, font_size: int | None = None,
                  footer: str = "") -> Image.Image:
    """Render ``rows`` under the ``columns`` headers.

    Args:
        columns: one title per column (wrapped onto two lines, then clipped, to the tile width).
        rows: the rows (each with ``len(columns)`` tiles at most).
        tile: tile size, ``(width, height)`` or a square side, in pixels.
        caption_lines: text lines under each row (title + wrapped text).
        font_size: default :func:`grid_font_size` of the tile width.
        footer: one line at the bottom (e.g. the sampling settings).

    Returns:
        An RGB image of :func:`grid_geometry`'s ``size``.
    """
    g = grid_geometry(columns, len(rows), tile, caption_lines=caption_lines, gap=gap, margin=margin,
                      font_size=font_size, footer=footer, n_cols=max((len(r.tiles) for r in rows), default=0))
    font = _font(font_size or grid_font_size(g.tile_w))
    img = Image.new("RGB", g.size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for c, title in enumerate(columns):
        x, y, _, _ = g.header_box(c)
        for i, text in enumerate(_two_lines(title, g.tile_w, draw, font)):
            draw.text((x, y + i * g.line_h), text, fill=HEADER_COLOR, font=font)
    text_w = g.size[0] - 2 * margin
    for r, row in enumerate(rows):
        for c, t in enumerate(row.tiles):
            if t is not None:
                img.paste(to_rgb_tile(t, (g.tile_w, g.tile_h)), g.tile_box(r, c)[:2])
        x, y, _, _ = g.caption_box(r)
        lines: list[tuple[str, tuple]] = []
        if row.title:
            lines.append((_clip(row.title, text_w, draw, font), TITLE_COLOR))
        rest = " ".join(row.text[: caption_lines * (text_w + 2)].split())
        while rest and len(lines) < caption_lines:
            text, rest = _fit(rest, text_w, draw, font)
            if rest and len(lines) == caption_lines - 1:
                text = _clip(text + " " + rest, text_w, draw, font)
            lines.append((text, TEXT_COLOR))
        for i, (text, color) in enumerate(lines):
            draw.text((x, y + i * g.line_h), text, fill=color, font=font)
    if footer:
        draw.text((margin, g.size[1] - margin - g.line_h), _clip(footer, text_w, draw, font), fill=TEXT_COLOR,
                  font=font)
    return img


def _two_lines(title: str, width: float, draw, font) -> tuple[str, ...]:
    """A column title on one line, or wrapped onto two (the second clipped)."""
    first, rest = _fit(title, width, draw, font)
    return (first,) if not rest else (first, _clip(rest, width, draw, font))


__all__ = ["GridGeometry", "GridRow", "grid_geometry", "labelled_grid", "to_rgb_tile"]
