"""Procedural synthetic faces with full ground truth.

Every face is drawn from a seed and an index: identity parameters (face shape, eye spacing, colours, ...)
and CelebA-named binary attributes sampled from configurable priors. The renderer paints layered shapes at a
supersampled resolution and area-averages them down, so edges are anti-aliased at any of 32..256 px. Each
face comes with a 19-class CelebAMask-HQ label map, a CelebA-Dialog-style caption, and can be re-rendered
with one attribute changed (a ground-truth counterfactual of the same identity).

Determinism: a face depends only on (seed, index, RENDERER_VERSION) and the priors.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch

RENDERER_VERSION = 1

SEG_CLASSES = [
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
]
SEG = {name: i for i, name in enumerate(SEG_CLASSES)}

HAIR_COLOURS = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"]
SKIN_TONES = ["light", "medium", "dark"]
ATTRIBUTES = [
    "Male", "Young", "Smiling", "Mouth_Slightly_Open", "Eyeglasses", "Wearing_Lipstick", "Bags_Under_Eyes",
    "Bangs", *HAIR_COLOURS, "No_Beard", "Pale_Skin", "Wearing_Hat", "Wearing_Earrings", "Wearing_Necklace",
]

# Marginal priors; an entry may instead map "Parent=value" to a conditional probability. Hair colour and
# skin tone are categorical (exactly one hair colour; Pale_Skin follows the light tone).
DEFAULT_PRIORS: dict = {
    "Male": 0.5,
    "Young": 0.7,
    "Smiling": 0.5,
    "Mouth_Slightly_Open": 0.4,
    "Eyeglasses": 0.2,
    "Wearing_Lipstick": {"Male=0": 0.6, "Male=1": 0.0},
    "Bags_Under_Eyes": {"Young=1": 0.1, "Young=0": 0.5},
    "Bangs": 0.25,
    "hair_colour": {"Young=1": [0.35, 0.25, 0.4, 0.0], "Young=0": [0.25, 0.15, 0.25, 0.35]},
    "No_Beard": {"Male=0": 1.0, "Male=1": 0.6},
    "skin_tone": [0.5, 0.3, 0.2],
    "Wearing_Hat": 0.05,
    "Wearing_Earrings": {"Male=0": 0.3, "Male=1": 0.03},
    "Wearing_Necklace": {"Male=0": 0.15, "Male=1": 0.02},
}

ZOOM = 1.2  # how much the face fills the frame

_SKIN_RGB = np.array([[236, 200, 178], [200, 148, 108], [118, 78, 54]], np.float32)
_HAIR_RGB = np.array([[28, 24, 24], [222, 188, 110], [110, 70, 40], [176, 176, 180]], np.float32)


@dataclasses.dataclass(frozen=True)
class Face:
    """Everything that determines one rendered face."""

    attributes: dict[str, int]
    skin_tone: int
    identity: dict[str, float]

    def with_attributes(self, **changes: int) -> Face:
        """The same identity with attributes changed (keeping the categorical groups consistent)."""
        unknown = set(changes) - set(ATTRIBUTES)
        if unknown:
            raise KeyError(f"unknown attribute(s) {sorted(unknown)}; known: {ATTRIBUTES}")
        attrs = dict(self.attributes)
        skin_tone = self.skin_tone
        for name, value in changes.items():
            value = int(value)
            if name in HAIR_COLOURS:
                if not value:
                    raise ValueError(f"{name}=0 is ambiguous: set the new hair colour to 1 instead")
                attrs.update({h: int(h == name) for h in HAIR_COLOURS})
            elif name == "Pale_Skin":
                skin_tone = 0 if value else max(skin_tone, 1)
            else:
                attrs[name] = value
        if not attrs["Male"]:
            attrs["No_Beard"] = 1
        attrs["Pale_Skin"] = int(skin_tone == 0)
        return Face(attrs, skin_tone, self.identity)


def _prob(spec, attrs: Mapping[str, int]):
    if not isinstance(spec, Mapping):
        return spec
    for key, value in spec.items():
        parent, _, level = key.partition("=")
        if parent not in attrs:
            raise KeyError(f"prior condition {key!r}: {parent} must be sampled before it")
        if attrs[parent] == int(level):
            return value
    raise KeyError(f"prior {dict(spec)} has no entry for the sampled parents")


def sample_face(rng: np.random.Generator, priors: Mapping | None = None) -> Face:
    """Draw identity parameters and attributes; `priors` overrides entries of DEFAULT_PRIORS."""
    priors = {**DEFAULT_PRIORS, **(priors or {})}
    unknown = set(priors) - set(DEFAULT_PRIORS)
    if unknown:
        raise KeyError(f"unknown prior(s) {sorted(unknown)}; known: {sorted(DEFAULT_PRIORS)}")
    u = rng.uniform
    identity = {
        "face_width": u(0.36, 0.44), "face_height": u(0.50, 0.58), "jaw": u(0.15, 0.45),
        "face_x": u(-0.04, 0.04), "face_y": u(-0.04, 0.04),
        "eye_spacing": u(0.15, 0.2), "eye_size": u(0.065, 0.085), "eye_y": u(-0.1, -0.04),
        "brow_gap": u(0.07, 0.1), "brow_arch": u(0.0, 0.03), "brow_width": u(0.07, 0.1),
        "nose_length": u(0.13, 0.2), "nose_width": u(0.05, 0.08),
        "mouth_width": u(0.11, 0.16), "mouth_y": u(0.26, 0.32), "lip_thickness": u(0.025, 0.04),
        "hair_volume": u(0.06, 0.14), "hair_length": u(0.0, 1.0), "hairline": u(0.45, 0.62),
        "skin_shade": u(-0.08, 0.08), "hair_shade": u(-0.15, 0.15), "iris_hue": u(0.0, 1.0),
        "bg_hue": u(0.0, 1.0), "bg_value": u(0.35, 0.9), "cloth_hue": u(0.0, 1.0), "light": u(-0.3, 0.3),
        "glasses_round": u(0.0, 1.0),
    }
    attrs: dict[str, int] = {}
    for name in ("Male", "Young", "Smiling", "Mouth_Slightly_Open", "Eyeglasses", "Wearing_Lipstick",
                 "Bags_Under_Eyes", "Bangs"):
        attrs[name] = int(rng.random() < _prob(priors[name], attrs))
    hair = rng.choice(len(HAIR_COLOURS), p=np.asarray(_prob(priors["hair_colour"], attrs), float))
    attrs.update({h: int(i == hair) for i, h in enumerate(HAIR_COLOURS)})
    for name in ("No_Beard", "Wearing_Hat", "Wearing_Earrings", "Wearing_Necklace"):
        attrs[name] = int(rng.random() < _prob(priors[name], attrs))
    skin_tone = int(rng.choice(3, p=np.asarray(_prob(priors["skin_tone"], attrs), float)))
    attrs["Pale_Skin"] = int(skin_tone == 0)
    return Face({a: attrs[a] for a in ATTRIBUTES}, skin_tone, identity)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return 255 * np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


def _rgb(colour, dtype=None) -> np.ndarray:
    """A colour as channel-first [3, 1, 1] (or unchanged if it already has a spatial extent)."""
    colour = np.asarray(colour, dtype)
    return colour.reshape(3, 1, 1) if colour.ndim == 1 else colour


class _Canvas:
    """Painter's-algorithm canvas in normalised coordinates u (right) and v (down), both in [-1, 1].

    Every shape is evaluated only inside a window (a bounding box plus a margin of 2 pixels) that `window` selects:
    `u` is then a row [1, W] and `v` a column [H, 1] of pixel-centre coordinates that broadcast to the window. Each
    pixel goes through exactly the float32 operations that a whole-canvas evaluation would apply to it, so the image
    is the same; shapes must lie inside the window they are painted in. Colours are channel-first ([3, 1, 1] or
    [3, H, W]), and so is `rgb` [3, res, res]: numpy's inner loops then run along rows rather than over 3 channels.
    """

    def __init__(self, res: int, windows: bool = True):
        self.res, self.windows = res, windows
        self.coords = ((np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1) / ZOOM
        self.scale, self.offset = res * ZOOM / 2, res / 2 - 0.5  # coordinate -> pixel index
        self.rgb = np.empty((3, res, res), np.float32)
        self.label = np.zeros((res, res), np.uint8)
        self.window(-2, 2, -2, 2)

    def _span(self, lo: float, hi: float) -> slice:
        """The pixels whose centres lie in [lo, hi], and 2 more on either side."""
        first = min(max(math.floor(lo * self.scale + self.offset) - 2, 0), self.res)
        return slice(first, min(max(math.ceil(hi * self.scale + self.offset) + 3, first), self.res))

    def window(self, u0: float, u1: float, v0: float, v1: float) -> tuple[np.ndarray, np.ndarray]:
        """Paint next inside [u0, u1] x [v0, v1] (anywhere with windows=False); returns the window's (u, v)."""
        if not self.windows:
            u0 = v0 = -2.0
            u1 = v1 = 2.0
        self.rows, self.cols = self._span(v0, v1), self._span(u0, u1)
        self.u, self.v = self.coords[None, self.cols], self.coords[self.rows, None]
        return self.u, self.v

    def ellipse_window(self, cx, cy, rx, ry) -> tuple[np.ndarray, np.ndarray]:
        return self.window(cx - rx, cx + rx, cy - ry, cy + ry)

    def paint(self, region: np.ndarray, colour, label: int | None = None):
        if not isinstance(colour, np.ndarray) or colour.ndim == 1 or colour.dtype != np.float32:
            colour = _rgb(colour, np.float32)
        np.copyto(self.rgb[:, self.rows, self.cols], colour, where=region)
        if label is not None:
            np.copyto(self.label[self.rows, self.cols], label, where=region)

    def ellipse(self, cx, cy, rx, ry):
        return ((self.u - cx) / rx) ** 2 + ((self.v - cy) / ry) ** 2 <= 1


def render(face: Face, size: int = 64, supersample: int | None = None,
           windows: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Render a face: uint8 RGB [size, size, 3] and int64 labels [size, size] (majority over subpixels).

    `windows=False` evaluates every shape on the whole canvas (slow; the same image, which the tests check).
    """
    if size < 16 or size > 1024:
        raise ValueError(f"size={size}: synthetic faces are rendered at 16..1024 px")
    ss = supersample or max(2, min(3, 384 // size))
    cv = _Canvas(size * ss, windows)
    _draw(cv, face)
    # area average in a fixed order (the float32 sums of torch's mean over the subpixels, which v1 used): each
    # subpixel row of a block summed left to right, then the row sums top to bottom, divided by ss²
    cols = cv.rgb.reshape(3, size * ss, size, ss)
    row_sums = cols[..., 0] + cols[..., 1] if ss > 1 else cols[..., 0].copy()
    for j in range(2, ss):
        row_sums += cols[..., j]
    row_sums = row_sums.reshape(3, size, ss, size)
    rgb = row_sums[:, :, 0] + row_sums[:, :, 1] if ss > 1 else row_sums[:, :, 0].copy()
    for i in range(2, ss):
        rgb += row_sums[:, :, i]
    rgb /= np.float32(ss * ss)
    # labels: the subpixels' common label, or at edges their majority (ties to the lower class)
    sub = cv.label.reshape(size, ss, size, ss)
    label = sub[:, 0, :, 0].astype(np.int64)
    rows = cv.label.reshape(size * ss, size, ss)
    flat = rows[..., 0] == rows[..., 0]  # each subpixel row of a block: all its labels equal
    for j in range(1, ss):
        flat &= rows[..., 0] == rows[..., j]
    flat, first = flat.reshape(size, ss, size), rows[..., 0].reshape(size, ss, size)
    uniform = flat[:, 0].copy()  # and the rows' labels equal
    for i in range(1, ss):
        uniform &= flat[:, i] & (first[:, 0] == first[:, i])
    rows, cols = np.nonzero(~uniform)
    blocks = sub[rows, :, cols, :].reshape(len(rows), ss * ss)
    n = len(SEG_CLASSES)
    votes = np.bincount((np.arange(len(rows))[:, None] * n + blocks).ravel(), minlength=len(rows) * n)
    label[rows, cols] = votes.reshape(-1, n).argmax(1)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0).copy(), label


def _draw(cv: _Canvas, face: Face) -> None:
    a, p = face.attributes, face.identity
    male, young, smile = a["Male"], a["Young"], a["Smiling"]
    skin = _rgb(np.clip(_SKIN_RGB[face.skin_tone] * (1 + p["skin_shade"]), 0, 255))
    hair_rgb = _rgb(np.clip(_HAIR_RGB[HAIR_COLOURS.index(next(h for h in HAIR_COLOURS if a[h]))]
                            * (1 + p["hair_shade"] * (0.3 if a["Gray_Hair"] else 1)), 0, 255))
    cx, cy = p["face_x"], p["face_y"]
    fw = p["face_width"] * (1.06 if male else 1.0)
    fh = p["face_height"]
    jaw = p["jaw"] * (0.6 if male else 1.0)

    # background: vertical gradient of one muted hue
    top, bottom = _rgb(_hsv(p["bg_hue"], 0.35, p["bg_value"])), _rgb(_hsv(p["bg_hue"], 0.45, p["bg_value"] * 0.7))
    u, v = cv.window(-2, 2, -2, 2)
    t = ((v + 1) / 2)[None]
    cv.rgb[:] = top * (1 - t) + bottom * t

    # shading helpers, evaluated in the current window
    def strands():
        return 0.88 + 0.12 * np.sin(40 * cv.u + 6 * np.sin(7 * cv.v))[None]

    def light():
        return (1 + 0.15 * p["light"] * cv.u)[None]

    long_hair = not male and p["hair_length"] > 0.25
    hair_top = cy - fh - p["hair_volume"] * (0.6 if male else 1.0)
    if long_hair:  # hair behind the head and shoulders
        length = cy + 0.3 + 0.5 * p["hair_length"]
        u, v = cv.ellipse_window(cx, (hair_top + length) / 2, fw + 0.14, (length - hair_top) / 2)
        back = cv.ellipse(cx, (hair_top + length) / 2, fw + 0.14, (length - hair_top) / 2)
        cv.paint(back & (v > cy - 0.2), hair_rgb * strands() * 0.85, SEG["hair"])

    # neck and clothes
    u, v = cv.window(cx - fw * 0.45, cx + fw * 0.45, cy + fh * 0.5, 2)
    neck = (np.abs(u - cx) < fw * 0.45) & (v > cy + fh * 0.5)
    cv.paint(neck, skin * 0.85 * light(), SEG["neck"])
    u, v = cv.window(-2, 2, cy + fh + 0.18, 2)
    shoulders = (v > cy + fh + 0.18 + 0.35 * ((u - cx) / 1.0) ** 2)
    cv.paint(shoulders, _rgb(_hsv(p["cloth_hue"], 0.55, 0.6)) * light(), SEG["cloth"])
    if a["Wearing_Necklace"]:
        u, v = cv.window(cx - fw * 0.45, cx + fw * 0.45, cy + fh + 0.065, cy + fh + 0.095 + 0.5 * (fw * 0.45) ** 2)
        arc = np.abs(v - (cy + fh + 0.08 + 0.5 * (u - cx) ** 2)) < 0.015
        cv.paint(arc & (np.abs(u - cx) < fw * 0.45), [235, 200, 60], SEG["neck_l"])

    # ears, earrings
    for side, label in ((-1, SEG["l_ear"]), (1, SEG["r_ear"])):
        ex = cx + side * fw * 0.98
        cv.ellipse_window(ex, cy - 0.02, 0.06, 0.1)
        cv.paint(cv.ellipse(ex, cy - 0.02, 0.06, 0.1), skin * 0.92 * light(), label)
        if a["Wearing_Earrings"]:
            cv.ellipse_window(ex, cy + 0.11, 0.022, 0.022)
            cv.paint(cv.ellipse(ex, cy + 0.11, 0.022, 0.022), [240, 210, 70], SEG["ear_r"])

    # face: an ellipse that narrows towards the chin
    def face_region():
        dy = (cv.v - cy) / fh
        width = fw * (1 - jaw * np.clip(dy, 0, 1) ** 2)
        return ((cv.u - cx) / width) ** 2 + dy ** 2 <= 1

    u, v = cv.ellipse_window(cx, cy, fw, fh)
    dy = (v - cy) / fh
    radial = np.clip(((u - cx) / fw) ** 2 + dy ** 2, 0, 1)[None]
    cv.paint(face_region(), skin * (1 - 0.12 * radial) * light(), SEG["skin"])
    if not young:  # forehead wrinkles and nasolabial folds
        for k in range(3):
            row = cy - fh * 0.55 + k * 0.045
            u, v = cv.window(cx - fw * 0.5, cx + fw * 0.5, row - 0.04, row + 0.04)
            line = np.abs(v - (cy - fh * 0.55 + k * 0.045) - 0.03 * np.sin(8 * (u - cx))) < 0.006
            cv.paint(line & (np.abs(u - cx) < fw * 0.5) & face_region(), skin * 0.8)
        for side in (-1, 1):
            reach = p["mouth_width"] + 0.02 + 0.25 * p["mouth_y"] + 0.01
            u, v = cv.window(cx - reach, cx + reach, cy + 0.08, cy + p["mouth_y"] + 0.02)
            fold = np.abs((u - cx) - side * (p["mouth_width"] + 0.02 + 0.25 * (v - cy - 0.12))) < 0.007
            cv.paint(fold & (v > cy + 0.08) & (v < cy + p["mouth_y"] + 0.02), skin * 0.82)

    # hair on top, with a hairline (lower with bangs)
    u, v = cv.ellipse_window(cx, cy - p["hair_volume"] * 0.5, fw + p["hair_volume"] * 0.6, fh + p["hair_volume"] * 0.5)
    head = cv.ellipse(cx, cy - p["hair_volume"] * 0.5, fw + p["hair_volume"] * 0.6, fh + p["hair_volume"] * 0.5)
    hairline = cy - fh * (p["hairline"] if not a["Bangs"] else 0.28) + 0.04 * np.cos(6 * (u - cx))
    side_hair = (np.abs(u - cx) > fw * 0.82) & (v < cy - 0.05 + (0.2 if long_hair else 0))
    hair_region = head & ((v < hairline) | side_hair)
    if a["Bangs"]:
        hair_region |= head & (v < hairline + 0.05 * np.abs(np.sin(18 * (u - cx))))
    cv.paint(hair_region, hair_rgb * strands() * light(), SEG["hair"])

    # beard: hair-coloured lower face, labelled as skin (CelebAMask-HQ has no beard class)
    if not a["No_Beard"]:
        u, v = cv.window(cx - fw, cx + fw, cy + p["mouth_y"] - 0.24, cy + fh)
        beard = face_region() & (v > cy + p["mouth_y"] - 0.09 - 0.15 * ((u - cx) / fw) ** 2) & (
            np.abs(u - cx) < fw * 0.95)
        cv.paint(beard, hair_rgb * strands() * 0.9, SEG["skin"])

    # eyes, bags, brows
    ey = cy + p["eye_y"]
    er = p["eye_size"]
    eye_open = 0.42 if smile else 0.52
    iris = _rgb(_hsv(p["iris_hue"] * 0.6, 0.6, 0.45))
    for side, eye_label, brow_label in ((-1, SEG["l_eye"], SEG["l_brow"]), (1, SEG["r_eye"], SEG["r_brow"])):
        ex = cx + side * p["eye_spacing"]
        if a["Bags_Under_Eyes"]:
            cv.ellipse_window(ex, ey + er * 0.55, er * 1.05, er * 0.45)
            bag = cv.ellipse(ex, ey + er * 0.55, er * 1.05, er * 0.45) & ~cv.ellipse(ex, ey + er * 0.2, er, er * 0.5)
            cv.paint(bag, skin * 0.7)
        cv.ellipse_window(ex, ey, er * 1.1, er * eye_open * 1.25)
        outline = cv.ellipse(ex, ey, er * 1.1, er * eye_open * 1.25)
        cv.paint(outline, [40, 30, 30], eye_label)
        cv.paint(cv.ellipse(ex, ey, er, er * eye_open), [245, 245, 240], eye_label)
        cv.paint(cv.ellipse(ex, ey, er * 0.5, er * 0.5) & outline, iris, eye_label)
        cv.paint(cv.ellipse(ex, ey, er * 0.22, er * 0.22) & outline, [10, 10, 10], eye_label)
        bx, bw = ex + side * 0.01, p["brow_width"]
        thick = 0.022 if male else 0.014
        u, v = cv.window(bx - bw, bx + bw, ey - p["brow_gap"] - p["brow_arch"] - thick, ey - p["brow_gap"] + thick)
        brow_y = ey - p["brow_gap"] - p["brow_arch"] * (1 - ((u - bx) / bw) ** 2)
        brow = (np.abs(v - brow_y) < thick * (1 - 0.5 * np.clip(side * (u - bx) / bw, 0, 1))) & (np.abs(u - bx) < bw)
        cv.paint(brow, hair_rgb * 0.7 if not a["Blond_Hair"] else hair_rgb * 0.6, brow_label)

    # nose: a soft wedge with nostrils
    ny0, ny1 = ey + 0.02, ey + 0.02 + p["nose_length"]
    u, v = cv.window(cx - p["nose_width"], cx + p["nose_width"], ny0, ny1)
    frac = np.clip((v - ny0) / (ny1 - ny0), 0, 1)
    nose = (v > ny0) & (v < ny1) & (np.abs(u - cx) < p["nose_width"] * (0.35 + 0.65 * frac))
    cv.paint(nose, skin * (0.9 - 0.08 * frac[None]) * light(), SEG["nose"])
    for side in (-1, 1):
        cv.ellipse_window(cx + side * p["nose_width"] * 0.45, ny1 - 0.015, 0.018, 0.011)
        cv.paint(cv.ellipse(cx + side * p["nose_width"] * 0.45, ny1 - 0.015, 0.018, 0.011), skin * 0.45)

    # mouth: lips around a centre line whose corners rise when smiling; dark gap and teeth when open
    mx, my, mw = cx, cy + p["mouth_y"], p["mouth_width"] * (1.15 if smile else 1.0)
    lips = p["lip_thickness"]
    u, v = cv.window(mx - mw, mx + mw, my - 0.05 - 0.02 - lips, my + 0.005 + 0.02 + lips * 1.2)
    x = np.clip((u - mx) / mw, -1, 1)
    inside = np.abs(u - mx) < mw
    centre = my - (0.05 if smile else -0.005) * x ** 2
    taper = np.sqrt(1 - x ** 2)
    gap = (0.035 if a["Mouth_Slightly_Open"] else 0.0) * taper + 0.004
    lip_rgb = _rgb([200, 40, 60], np.float32) if a["Wearing_Lipstick"] else skin * _rgb([0.85, 0.62, 0.62])
    t_lip = p["lip_thickness"] * taper
    cv.paint(inside & (v < centre - gap / 2) & (v > centre - gap / 2 - t_lip), lip_rgb * 0.95, SEG["u_lip"])
    cv.paint(inside & (v > centre + gap / 2) & (v < centre + gap / 2 + t_lip * 1.2), lip_rgb, SEG["l_lip"])
    opening = inside & (np.abs(v - centre) <= gap / 2)
    cv.paint(opening, [70, 20, 25], SEG["mouth"])
    if a["Mouth_Slightly_Open"] and smile:
        cv.paint(opening & (v < centre - gap * 0.05) & (np.abs(x) < 0.7), [240, 240, 232], SEG["mouth"])

    # glasses: frames around both eyes and a bridge
    if a["Eyeglasses"]:
        gr, gh = er * 1.7, er * (1.35 if p["glasses_round"] > 0.5 else 1.1)
        rim = 0.014
        u, v = cv.window(cx - fw, cx + fw, ey - gh - rim, ey + gh + rim)
        frame = np.zeros((v.shape[0], u.shape[1]), bool)
        for side in (-1, 1):
            gx = cx + side * p["eye_spacing"]
            frame |= cv.ellipse(gx, ey, gr + rim, gh + rim) & ~cv.ellipse(gx, ey, gr, gh)
            arm = (np.abs(v - (ey - gh * 0.4)) < rim * 0.7) & (side * (u - gx) > gr) & (side * (u - cx) < fw)
            frame |= arm
        bridge = (np.abs(v - (ey - gh * 0.3)) < rim * 0.7) & (np.abs(u - cx) < p["eye_spacing"] - gr)
        cv.paint(frame | bridge, [25, 25, 30], SEG["eye_g"])

    if a["Wearing_Hat"]:
        u, v = cv.window(cx - fw - 0.2, cx + fw + 0.2, cy - fh * 0.75 - 0.3, cy - fh * 0.62 + 0.05)
        brim = cv.ellipse(cx, cy - fh * 0.62, fw + 0.2, 0.05)
        crown = cv.ellipse(cx, cy - fh * 0.75, fw + 0.06, 0.3) & (v < cy - fh * 0.62)
        cv.paint(brim | crown, _rgb(_hsv((p["cloth_hue"] + 0.5) % 1, 0.5, 0.45)) * light(), SEG["hat"])


_AGE = {1: ["in his twenties", "in her twenties", "young"], 0: ["in his fifties", "in her fifties", "middle-aged"]}


def caption(face: Face) -> str:
    """A CelebA-Dialog-style caption of the attributes (deterministic)."""
    a = face.attributes
    he, his, noun = ("He", "his", "man") if a["Male"] else ("She", "her", "woman")
    hair = next(h for h in HAIR_COLOURS if a[h]).split("_")[0].lower()
    parts = [f"This {noun} is {'smiling' if a['Smiling'] else 'not smiling'}"
             + (" with the mouth slightly open." if a["Mouth_Slightly_Open"] else ".")]
    parts.append(f"{he} has {hair} hair" + (" with bangs." if a["Bangs"] else "."))
    if not a["No_Beard"]:
        parts.append(f"{he} has a beard of medium length.")
    worn = [w for w, k in (("eyeglasses", "Eyeglasses"), ("lipstick", "Wearing_Lipstick"), ("a hat", "Wearing_Hat"),
                           ("earrings", "Wearing_Earrings"), ("a necklace", "Wearing_Necklace")) if a[k]]
    if worn:
        parts.append(f"{he} wears " + (", ".join(worn[:-1]) + " and " + worn[-1] if len(worn) > 1 else worn[0]) + ".")
    if a["Bags_Under_Eyes"]:
        parts.append(f"There are bags under {his} eyes.")
    age = "in " + ("his" if a["Male"] else "her") + (" twenties" if a["Young"] else " fifties")
    parts.append(f"{he} is {age}, with {SKIN_TONES[face.skin_tone]} skin.")
    return " ".join(parts)


class SyntheticFaces(torch.utils.data.Dataset):
    """Dataset of synthetic faces: ds[i] -> dict(image, mask, attributes, caption, index, name).

    Faces are rendered on demand (deterministic per seed and index); `cache=True` keeps rendered items in memory;
    `shards=DIR` renders them once into DIR (with `workers` processes) and reads them from there (facelab.data.shards).
    """

    attribute_names = ATTRIBUTES

    def __init__(self, size: int = 64, length: int = 10000, seed: int = 0, priors: Mapping | None = None,
                 start: int = 0, cache: bool = False, shards: str | None = None, workers: int | None = None):
        self.size, self.length, self.seed, self.start = int(size), int(length), int(seed), int(start)
        self.priors = dict(priors or {})
        sample_face(np.random.default_rng(0), self.priors)  # validate priors now, not in a worker
        self._cache: dict[int, dict] | None = {} if cache else None
        self._shards = None
        if shards:
            from facelab.data.shards import Shards

            self._shards = Shards(self, shards, workers)

    def __len__(self) -> int:
        return self.length

    def face(self, index: int) -> Face:
        rng = np.random.default_rng([self.seed, self.start + index, RENDERER_VERSION])
        return sample_face(rng, self.priors)

    def item(self, face: Face, index: int) -> dict:
        rgb, label = render(face, self.size)
        return self._item(rgb, label, [face.attributes[a] for a in ATTRIBUTES], face.skin_tone, caption(face), index)

    def _item(self, rgb: np.ndarray, label: np.ndarray, attributes: list, skin_tone: int, text: str,
              index: int) -> dict:
        return {
            "image": torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1,
            "mask": torch.from_numpy(label),
            "attributes": torch.tensor(attributes, dtype=torch.float32),
            "skin_tone": skin_tone,
            "caption": text,
            "index": index,
            "name": f"{self.start + index:06d}",
        }

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic faces")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        if self._shards is not None:
            item = self._item(*self._shards.record(index), index)
        else:
            item = self.item(self.face(index), index)
        if self._cache is not None:
            self._cache[index] = item
        return item

    def counterfactual(self, index: int, **changes: int) -> dict:
        """The face at `index` re-rendered with attributes changed, e.g. counterfactual(3, Smiling=1)."""
        return self.item(self.face(index).with_attributes(**changes), index)

    def identity(self, index: int) -> dict[str, float]:
        return dict(self.face(index).identity)
