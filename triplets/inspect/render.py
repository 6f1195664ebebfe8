"""Contact sheets: one row per sample, six tiles and a caption, drawn with Pillow.

Columns: I | M over I | I_f = I⊙M | I_b | foreground depth | background depth. Depth maps use a
perceptual colormap (viridis; near = bright) on their normalised uint16 values, so both depth
columns share the scale bar at the bottom; the mask outline is drawn on them to compare the two
inside M. The colormap is a built-in table (17 anchors of matplotlib's CC0 viridis/magma, linearly
interpolated, within 6/255 of the original), so renders do not depend on matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from triplets.inspect.summary import depth_margin
from triplets.sample import DEPTH_MAX, TripletSample

_ANCHORS = {
    "viridis": [(68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141),
                (44, 114, 142), (38, 130, 142), (33, 145, 140), (31, 160, 136), (40, 174, 128), (63, 188, 115),
                (94, 201, 98), (132, 212, 75), (173, 220, 48), (216, 226, 25), (253, 231, 37)],
    "magma": [(0, 0, 4), (10, 8, 34), (29, 17, 71), (54, 16, 107), (81, 18, 124), (106, 28, 129), (131, 38, 129),
              (156, 46, 127), (183, 55, 121), (208, 65, 111), (231, 82, 99), (245, 107, 92), (252, 137, 97),
              (254, 167, 114), (254, 196, 136), (253, 226, 163), (252, 253, 191)],
}
COLUMNS = ("I", "M over I", "I_f = I*M", "I_b (inpainted)", "fg depth", "bg depth")
MASK_COLOR = (255, 48, 96)
BAD_COLOR = (200, 0, 0)


@cache
def colormap_lut(name: str = "viridis") -> np.ndarray:
    """``(256, 3)`` uint8 lookup table of a built-in colormap (``viridis`` or ``magma``)."""
    if name not in _ANCHORS:
        raise ValueError(f"unknown colormap {name!r}; valid: {', '.join(_ANCHORS)}")
    anchors = np.asarray(_ANCHORS[name], np.float64)
    x, xp = np.linspace(0, 1, 256), np.linspace(0, 1, len(anchors))
    lut = np.stack([np.interp(x, xp, anchors[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


def colorize(depth: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Depth ``(H, W)`` → RGB ``(H, W, 3)`` uint8. uint16 maps are read as ``/ 65535``; floats must be in [0, 1]."""
    x = depth.astype(np.float64) / DEPTH_MAX if depth.dtype == np.uint16 else depth.astype(np.float64)
    idx = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
    return colormap_lut(cmap)[idx]


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)``: mask pixels with a 4-neighbour outside the mask."""
    m = mask.astype(bool)
    p = np.pad(m, 1, mode="edge")
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """I with M tinted and outlined, ``(H, W, 3)`` uint8."""
    out = image.astype(np.float32)
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(MASK_COLOR, np.float32)
    out[mask_outline(m)] = MASK_COLOR
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def sample_tiles(s: TripletSample, cmap: str = "viridis") -> list[np.ndarray]:
    """The six ``(R, R, 3)`` uint8 tiles of a row, in :data:`COLUMNS` order."""
    edge = mask_outline(s.mask)
    fg, bg = colorize(s.fg_depth, cmap), colorize(s.bg_depth, cmap)
    fg[edge] = bg[edge] = 255
    return [s.image, overlay_mask(s.image, s.mask), s.foreground, s.background, fg, bg]


def default_tile(resolution: int) -> int:
    """Tile size for a resolution: itself, but at least 96 px (readable) and at most 256 px (small files)."""
    return min(max(resolution, 96), 256)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class SheetLayout:
    """Pixel geometry of a contact sheet (all sizes in pixels).

    A sheet is ``margin`` + a header of column titles + one row per sample (``tile`` high, then
    ``caption_lines`` text lines and ``row_gap``) + a footer holding the depth scale bar. Tiles are
    ``gap`` apart.
    """

    tile: int = 128
    gap: int = 4
    row_gap: int = 10
    margin: int = 8
    font_size: int = 11
    caption_lines: int = 3
    header: int = 18
    footer: int = 34

    @property
    def line_height(self) -> int:
        return self.font_size + 3

    @property
    def row_height(self) -> int:
        return self.tile + 2 + self.caption_lines * self.line_height + self.row_gap

    @property
    def width(self) -> int:
        return 2 * self.margin + len(COLUMNS) * self.tile + (len(COLUMNS) - 1) * self.gap

    def height(self, rows: int) -> int:
        return 2 * self.margin + self.header + rows * self.row_height + self.footer

    def size(self, rows: int) -> tuple[int, int]:
        return self.width, self.height(rows)

    def tile_origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left corner of the tile of sample ``row``, column ``col``."""
        return (self.margin + col * (self.tile + self.gap),
                self.margin + self.header + row * self.row_height)


def _longest_prefix(text: str, width: float, draw: ImageDraw.ImageDraw, font, suffix: str = "") -> int:
    """Largest ``n`` with ``text[:n] + suffix`` fitting ``width`` (binary search: O(log len) measurements)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + suffix, font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _clip(text: str, width: float, draw: ImageDraw.ImageDraw, font) -> str:
    """``text`` cut (with "...") to fit ``width``."""
    text = text[: int(width) + 1]  # every visible glyph is at least one pixel wide: the rest cannot show
    if draw.textlength(text, font=font) <= width:
        return text
    return text[:_longest_prefix(text, width, draw, font, "...")] + "..."


def _fit(text: str, width: float, draw: ImageDraw.ImageDraw, font) -> tuple[str, str]:
    """Split ``text`` into the longest word-prefix fitting ``width`` and the rest.

    Linear in the text length: only a window of ``width + 1`` characters is measured (by binary search).
    """
    window = text[: int(width) + 1]
    n = _longest_prefix(window, width, draw, font)
    if n >= len(text):
        return text.strip(), ""
    if n < len(window) and not window[n].isspace():
        space = window.rfind(" ", 0, n + 1)
        if space > 0 and window[:space].strip():
            n = space  # break at the last word boundary that fits
    n = max(n, 1)  # one very long word: cut it
    return text[:n].strip(), text[n:].lstrip()


def _caption_lines(s: TripletSample, n: int, width: float, draw, font, label: str = "") -> list[tuple[str, tuple]]:
    margin = depth_margin(s)
    area = float(s.mask.mean())
    bad = margin is None or margin <= 0
    order = "empty mask" if margin is None else f"fg-bg depth in M {margin:+.2f} " + ("REVERSED" if bad else "ok")
    head = f"{label}   " if label else ""
    lines = [(_clip(f"{head}{s.key}   mask {area:.1%}   {order}", width, draw, font),
              BAD_COLOR if bad or label else (40, 40, 40))]
    # at most n lines of at most width+1 glyphs can show: never process more of a (possibly huge) caption
    rest = " ".join(s.caption[: n * (int(width) + 2)].split()) or "(empty caption)"
    for i in range(n - 1):
        line, rest = _fit(rest, width, draw, font)
        if rest and i == n - 2:
            line = _clip(line + " " + rest, width, draw, font)
        lines.append((line, (0, 0, 0)))
        if not rest:
            break
    return lines


def _scale_bar(draw: ImageDraw.ImageDraw, img: Image.Image, layout: SheetLayout, top: int, cmap: str) -> None:
    """Colour bar under the two depth columns: normalised disparity 0 (far) → 1 (near)."""
    x0, _ = layout.tile_origin(0, len(COLUMNS) - 2)
    width, height = 2 * layout.tile + layout.gap, 10
    ramp = colorize(np.tile(np.linspace(0, 1, width), (height, 1)), cmap)
    img.paste(Image.fromarray(ramp), (x0, top))
    font = _font(layout.font_size)
    draw.text((x0, top + height + 2), "0 far", fill=(0, 0, 0), font=font)
    label = "1 near"
    draw.text((x0 + width - draw.textlength(label, font=font), top + height + 2), label, fill=(0, 0, 0), font=font)
    title = _clip("normalised disparity (both depth columns)", x0 - 2 * layout.margin, draw, font)
    draw.text((x0 - draw.textlength(title, font=font) - 8, top - 1), title, fill=(0, 0, 0), font=font)


def contact_sheet(samples: list[TripletSample], *, tile: int | None = None, cmap: str = "viridis",
                  layout: SheetLayout | None = None, labels: list[str] | None = None) -> Image.Image:
    """Render samples as an RGB contact sheet, one row per sample (see the module docstring).

    Args:
        samples: the rows; tiles are resized to ``tile`` (default: the first sample's resolution within [96, 256]).
        cmap: ``viridis`` or ``magma`` for the depth maps.
        layout: full geometry (overrides ``tile``); ``layout.size(len(samples))`` is the sheet size.
        labels: one text per row shown first on its caption line (e.g. ``"removal 0.12"`` on a worst-k sheet).
    """
    if layout is None:
        res = samples[0].image.shape[0] if samples else 128
        layout = SheetLayout(tile=tile or default_tile(res))
    img = Image.new("RGB", layout.size(len(samples)), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), _font(layout.font_size)
    for c, title in enumerate(COLUMNS):
        x, _ = layout.tile_origin(0, c)
        draw.text((x, layout.margin + 2), _clip(title, layout.tile, draw, font), fill=(0, 0, 0), font=font)
    for r, s in enumerate(samples):
        for c, arr in enumerate(sample_tiles(s, cmap)):
            tile_img = Image.fromarray(arr)
            if tile_img.size != (layout.tile, layout.tile):
                tile_img = tile_img.resize((layout.tile, layout.tile), Image.BILINEAR)
            img.paste(tile_img, layout.tile_origin(r, c))
        x, y = layout.tile_origin(r, 0)
        y += layout.tile + 2
        label = labels[r] if labels else ""
        for text, color in _caption_lines(s, layout.caption_lines, layout.width - 2 * layout.margin, draw, font,
                                          label):
            draw.text((x, y), text, fill=color, font=font)
            y += layout.line_height
    _scale_bar(draw, img, layout, layout.height(len(samples)) - layout.margin - layout.footer + 6, cmap)
    return img


def contact_sheets(samples: list[TripletSample], *, per_page: int = 8, **kwargs) -> list[Image.Image]:
    """One sheet per ``per_page`` samples (keyword arguments go to :func:`contact_sheet`)."""
    return [contact_sheet(samples[i:i + per_page], **kwargs) for i in range(0, len(samples), per_page)]
