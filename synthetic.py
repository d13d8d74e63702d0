"""Procedural generator of Unreal-like RGB-D scenes (a stand-in for DepthEstimationUnreal).

Scene model
-----------
World axes: x to the right of the street, y up, z along the street; metres.
A scene is a horizontal ground plane (y = 0) plus a list of convex primitives:
yaw-rotated boxes (facades, walls, cars, curbs), spheres (tree crowns, hills,
scrap) and finite open cylinders (poles, trunks, wires, barrels). Every
primitive carries a material whose pattern (checkers, stripes, bricks, noise,
windows, road) is evaluated in metres on the surface, so texture shrinks with
distance exactly as perspective demands -- one of the depth cues a network can
learn. Shading is Lambertian plus ambient under a random sun, with cast shadows
from shadow rays, distance haze towards the horizon colour and a sky gradient.

Rendering is ray casting, vectorised over pixels: each primitive is tested
against all rays at once (restricted to its projected screen rectangle), and
the nearest hit wins. Camera rays are built with a unit optical-axis component,
so the ray parameter t *is* the planar z-depth that the data set stores.
Misses and hits beyond SKY_DEPTH are written as SKY_DEPTH (100 m, the real set's
sky value; loaders clip to 20 m).

Two styles mimic the real split shift: "street" (city street canyon: facades,
pavements, trees, lamp posts, parked cars, traffic ahead, car parks on open
sides) for train/test, and "yard" (a junkyard: scattered and stacked cars,
fences, sheds, poles with wires, trees, distant hills) for val.
Every image draws from its own generator seeded by (seed, split, index), so
output is independent of the worker count.
"""
import argparse
import json
import math
import multiprocessing
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from conventions import PAPER

GENERATOR_VERSION = "1.1"
SKY_DEPTH = 100.0
SPLITS = ("train", "val", "test")
STYLES = ("street", "yard")
JPEG_QUALITY = 95
# The rendered size, (height, width): DepthEstimationUnreal's.
IMAGE_HW = (144, 256)
# Camera distribution, recorded verbatim in meta.json (angles in degrees).
CAMERA_RANGES = {"height_m": [1.2, 2.5], "pitch_deg": [-8.0, 5.0],
                 "roll_deg": [-3.0, 3.0], "hfov_deg": [60.0, 90.0]}
_EPS = 1e-4
_CORNER_SIGNS = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])


# ----------------------------------------------------------------- textures
def _hash2(i, j, seed):
    """Deterministic pseudo-random value in [0, 1) per integer lattice point."""
    # int64 array arithmetic wraps silently and identically everywhere; only
    # the low 24 bits are kept, so no masking is needed along the way.
    h = i.astype(np.int64) * 374761393 + j.astype(np.int64) * 668265263 + seed * 1442695041
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 0xFFFFFF) * (1.0 / (1 << 24))


def _value_noise(u, v, seed):
    """Smooth lattice noise in [0, 1) with unit feature size."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    a, b = _hash2(iu, iv, seed), _hash2(iu + 1, iv, seed)
    c, d = _hash2(iu, iv + 1, seed), _hash2(iu + 1, iv + 1, seed)
    return (a + (b - a) * fu) + ((c + (d - c) * fu) - (a + (b - a) * fu)) * fv


@dataclass
class Material:
    """Two colours mixed by a surface pattern of feature size `scale` metres."""
    pattern: str
    color_a: tuple
    color_b: tuple = (0.0, 0.0, 0.0)
    scale: float = 1.0
    seed: int = 0

    def albedo(self, uv, footprint):
        u, v = uv[:, 0] / self.scale, uv[:, 1] / self.scale
        if self.pattern == "checkers":
            p = ((np.floor(u) + np.floor(v)) % 2).astype(float)
        elif self.pattern == "stripes":
            p = (np.floor(u * 2) % 2).astype(float)
        elif self.pattern == "bricks":  # bricks 2 x 1 scale, rows offset by half
            row = np.floor(v)
            fu = (u / 2 + 0.5 * (row % 2)) % 1.0
            p = ((fu < 0.05) | ((v % 1.0) < 0.1)).astype(float)
        elif self.pattern == "windows":  # storeys of height `scale`, glass in each bay
            bay, storey = np.floor(u / 1.2), np.floor(v)
            fu, fv = (u / 1.2) % 1.0, v % 1.0
            glass = (fu > 0.25) & (fu < 0.75) & (fv > 0.3) & (fv < 0.85) & (storey >= 0)
            p = glass * (0.7 + 0.3 * _hash2(bay, storey, self.seed))
        elif self.pattern == "road":  # asphalt with a dashed centre line at u = 0
            line = (np.abs(uv[:, 0]) < 0.08) & ((uv[:, 1] % 6.0) < 3.0)
            p = np.where(line, 1.0, 0.35 * _value_noise(u, v, self.seed))
        elif self.pattern == "noise":
            p = 0.65 * _value_noise(u, v, self.seed) + 0.35 * _value_noise(4 * u, 4 * v, self.seed + 1)
        else:
            p = np.zeros_like(u)
        # Fade the pattern to its mean once a pixel covers a whole feature:
        # cheap anti-aliasing that keeps far textures from turning into noise.
        fade = np.clip(1.5 - footprint / (0.5 * self.scale), 0.0, 1.0)
        p = p * fade + p.mean() * (1 - fade) if p.size else p
        grain = 0.9 + 0.2 * _value_noise(uv[:, 0] * 3, uv[:, 1] * 3, self.seed + 7)
        a, b = np.asarray(self.color_a), np.asarray(self.color_b)
        return (a + (b - a) * p[:, None]) * grain[:, None]


# --------------------------------------------------------------- primitives
def _dot(a, b):
    # Written out: numpy reductions over a length-3 last axis are slow.
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


@dataclass
class GroundPlane:
    """The infinite plane y = 0, seen from above."""
    material: Material
    casts_shadow = False

    def corners(self):
        return None

    def intersect(self, o, d):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -o[..., 1] / d[..., 1]
        return np.where(t > _EPS, t, np.inf)

    def surface(self, p):
        n = np.zeros_like(p)
        n[:, 1] = 1.0
        return n, p[:, [0, 2]]


@dataclass
class Box:
    """Box with half extents `half`, rotated by `yaw` radians about the vertical."""
    center: tuple
    half: tuple
    material: Material
    yaw: float = 0.0
    casts_shadow = True

    def _rot(self):
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])

    def corners(self):
        return (_CORNER_SIGNS * np.asarray(self.half)) @ self._rot().T + np.asarray(self.center)

    def intersect(self, o, d):
        # Slab test in the box frame, one axis at a time (no length-3 reductions).
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        ox, oy, oz = (o[..., i] - self.center[i] for i in range(3))
        origin = (c * ox - s * oz, oy, s * ox + c * oz)
        direction = (c * d[..., 0] - s * d[..., 2], d[..., 1], s * d[..., 0] + c * d[..., 2])
        tnear, tfar = -np.inf, np.inf
        with np.errstate(divide="ignore", invalid="ignore"):
            for lo, ld, h in zip(origin, direction, self.half):
                inv = 1.0 / ld
                ta, tb = (-h - lo) * inv, (h - lo) * inv
                tnear = np.maximum(tnear, np.minimum(ta, tb))
                tfar = np.minimum(tfar, np.maximum(ta, tb))
        t = np.where(tnear > _EPS, tnear, tfar)
        return np.where((tfar >= tnear) & (t > _EPS), t, np.inf)

    def surface(self, p):
        r, half = self._rot(), np.asarray(self.half)
        lp = (p - np.asarray(self.center)) @ r
        axis = np.abs(lp / half).argmax(-1)
        n_local = np.zeros_like(lp)
        n_local[np.arange(len(lp)), axis] = np.sign(lp[np.arange(len(lp)), axis])
        q = lp + half  # texture origin at the box corner, so storeys start at its base
        uv = np.where((axis == 0)[:, None], q[:, [2, 1]],
                      np.where((axis == 1)[:, None], q[:, [0, 2]], q[:, [0, 1]]))
        return n_local @ r.T, uv


@dataclass
class Sphere:
    center: tuple
    radius: float
    material: Material
    casts_shadow = True

    def corners(self):
        return Box(self.center, (self.radius,) * 3, self.material).corners()

    def intersect(self, o, d):
        oc = o - np.asarray(self.center)
        a, b = _dot(d, d), _dot(d, oc)
        disc = b * b - a * (_dot(oc, oc) - self.radius ** 2)
        root = np.sqrt(np.maximum(disc, 0.0))
        t = (-b - root) / a
        t = np.where(t > _EPS, t, (-b + root) / a)
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)

    def surface(self, p):
        n = (p - np.asarray(self.center)) / self.radius
        uv = np.stack([np.arctan2(n[:, 2], n[:, 0]), np.arcsin(np.clip(n[:, 1], -1, 1))], -1)
        return n, uv * self.radius


@dataclass
class Cylinder:
    """Open cylinder from `base` along `axis` (unit) for `length` metres."""
    base: tuple
    axis: tuple
    length: float
    radius: float
    material: Material
    casts_shadow = True

    def corners(self):
        ends = np.array([self.base, np.add(self.base, np.multiply(self.axis, self.length))])
        return (ends[:, None, :] + _CORNER_SIGNS[None] * self.radius).reshape(-1, 3)

    def intersect(self, o, d):
        ax = np.asarray(self.axis)
        oc = o - np.asarray(self.base)
        dp = d - _dot(d, ax)[..., None] * ax
        op = oc - _dot(oc, ax)[..., None] * ax
        a, b = _dot(dp, dp), _dot(dp, op)
        disc = b * b - a * (_dot(op, op) - self.radius ** 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        s = _dot(oc, ax) + t * _dot(d, ax)
        ok = (disc >= 0) & (t > _EPS) & (s >= 0) & (s <= self.length)
        return np.where(ok, t, np.inf)

    def surface(self, p):
        ax = np.asarray(self.axis)
        q = p - np.asarray(self.base)
        s = q @ ax
        radial = q - s[:, None] * ax
        e1 = np.cross(ax, [0.0, 0.0, 1.0] if abs(ax[2]) < 0.9 else [1.0, 0.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(ax, e1)
        angle = np.arctan2(radial @ e2, radial @ e1)
        return radial / self.radius, np.stack([angle * self.radius, s], -1)


# ------------------------------------------------------------ scene, camera
@dataclass
class Camera:
    """Pinhole camera; focal in pixels, angles in radians, pitch > 0 looks up."""
    position: tuple
    focal: float
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0

    def rotation(self):
        """Columns: camera right, up and forward axes in world coordinates."""
        cy, sy = math.cos(self.yaw), math.sin(self.yaw)
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
        roll = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
        return yaw @ pitch @ roll


@dataclass
class Scene:
    primitives: list
    sun: tuple = (0.4, 0.8, 0.45)
    sun_strength: float = 0.8
    ambient: float = 0.45
    sky_horizon: tuple = (0.80, 0.85, 0.90)
    sky_zenith: tuple = (0.35, 0.55, 0.85)
    haze_distance: float = 250.0


def _screen_rect(corners, cam_pos, rot, focal, height, width):
    """Pixel rectangle that contains the projection of `corners` (None if off-screen)."""
    if corners is None:
        return 0, height, 0, width
    c = (corners - cam_pos) @ rot
    near = 0.05
    front = c[:, 2] >= near
    if not front.any():
        return None
    if not front.all():
        # Clip at the near plane: add where every corner pair crosses it. The
        # pairs include all hull edges, so the rectangle stays conservative.
        i, j = np.nonzero(front[:, None] & ~front[None, :])
        w = ((near - c[j, 2]) / (c[i, 2] - c[j, 2]))[:, None]
        c = np.concatenate([c[front], c[j] + w * (c[i] - c[j])])
    px = focal * c[:, 0] / c[:, 2] + width / 2
    py = height / 2 - focal * c[:, 1] / c[:, 2]
    r0, r1 = max(0, int(math.floor(py.min())) - 1), min(height, int(math.ceil(py.max())) + 1)
    c0, c1 = max(0, int(math.floor(px.min())) - 1), min(width, int(math.ceil(px.max())) + 1)
    return None if r0 >= r1 or c0 >= c1 else (r0, r1, c0, c1)


def _shadowed(scene, corners, points, sun):
    """True where a ray from `points` towards the sun hits a primitive."""
    helper = np.array([0.0, 1.0, 0.0]) if abs(sun[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(sun, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(sun, e1)
    # Sorting by one sun-space coordinate turns each caster's column test
    # into a binary search plus checks on a short slice.
    order = np.argsort(points @ e1)
    points = points[order]
    pa, pb, ps = points @ e1, points @ e2, points @ sun
    blocked = np.zeros(len(points), bool)
    for prim, c in zip(scene.primitives, corners):
        if not prim.casts_shadow:
            continue
        ca, cb = c @ e1, c @ e2
        lo, hi = np.searchsorted(pa, [ca.min(), ca.max()])
        cand = lo + np.nonzero(~blocked[lo:hi] & (pb[lo:hi] >= cb.min()) & (pb[lo:hi] <= cb.max())
                               & (ps[lo:hi] <= (c @ sun).max()))[0]
        if len(cand):
            blocked[cand] |= np.isfinite(prim.intersect(points[cand], sun[None, :]))
    blocked[order] = blocked.copy()
    return blocked


def render(scene, camera, height=IMAGE_HW[0], width=IMAGE_HW[1]):
    """Ray-cast `scene` through `camera`; returns (rgb uint8 HxWx3, depth float32 HxW).

    Pixel (row v, column u) samples its centre; with rotation-free camera its
    ray is ((u + 0.5 - W/2)/f, -(v + 0.5 - H/2)/f, 1), so the ground at camera
    height h is seen at planar depth f * h / (v + 0.5 - H/2).
    """
    rot = camera.rotation()
    origin = np.asarray(camera.position, float)
    xs = (np.arange(width) + 0.5 - width / 2) / camera.focal
    ys = -(np.arange(height) + 0.5 - height / 2) / camera.focal
    cam_dirs = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None], 1.0), -1)
    dirs = cam_dirs @ rot.T  # optical-axis component 1, so t is planar depth

    t = np.full((height, width), np.inf)
    ids = np.full((height, width), -1)
    corners = [prim.corners() for prim in scene.primitives]
    for k, prim in enumerate(scene.primitives):
        rect = _screen_rect(corners[k], origin, rot, camera.focal, height, width)
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        tk = prim.intersect(origin, dirs[r0:r1, c0:c1])
        closer = tk < t[r0:r1, c0:c1]
        t[r0:r1, c0:c1][closer] = tk[closer]
        ids[r0:r1, c0:c1][closer] = k

    rgb = _sky(scene, dirs)
    flat = np.flatnonzero(ids >= 0)
    if len(flat):
        d = dirs.reshape(-1, 3)[flat]
        th = t.ravel()[flat]
        rgb.reshape(-1, 3)[flat] = _shade_hits(scene, corners, camera, origin, d, th,
                                                   ids.ravel()[flat])
    depth = np.minimum(t, SKY_DEPTH).astype(np.float32)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), depth


def _sky(scene, dirs):
    """Vertical gradient from the horizon colour to the zenith colour."""
    elev = np.clip(dirs[..., 1] / np.linalg.norm(dirs, axis=-1), 0, 1) ** 0.6
    hor, zen = np.asarray(scene.sky_horizon), np.asarray(scene.sky_zenith)
    return hor + (zen - hor) * elev[..., None]


def _shade_hits(scene, corners, camera, origin, d, t, ids):
    """Albedo x (ambient + sun x shadow), hazed towards the horizon colour."""
    # Group hits by primitive (stable sort) so each gets contiguous slices
    # instead of a boolean mask over every hit.
    order = np.argsort(ids, kind="stable")
    d, t, ids = d[order], t[order], ids[order]
    points = origin + d * t[:, None]
    dist = t * np.sqrt(_dot(d, d))
    normals, albedo = np.empty_like(points), np.empty_like(points)
    kinds, starts = np.unique(ids, return_index=True)
    for k, a, b in zip(kinds, starts, list(starts[1:]) + [len(ids)]):
        prim = scene.primitives[k]
        n, uv = prim.surface(points[a:b])
        normals[a:b] = n
        # Metres covered by one pixel along the surface (grows at grazing angles).
        cos = np.abs(_dot(n, d[a:b])) / np.sqrt(_dot(d[a:b], d[a:b]))
        footprint = dist[a:b] / camera.focal / np.maximum(cos, 0.1)
        albedo[a:b] = prim.material.albedo(uv, footprint)
    sun = np.asarray(scene.sun, float)
    sun = sun / np.linalg.norm(sun)
    lambert = np.maximum(normals @ sun, 0.0)
    lit = np.flatnonzero(lambert > 0)
    if len(lit):
        start = points[lit] + normals[lit] * 2e-3
        lambert[lit[_shadowed(scene, corners, start, sun)]] = 0.0
    color = albedo * (scene.ambient + scene.sun_strength * lambert)[:, None]
    haze = 1 - np.exp(-dist / scene.haze_distance)
    color = color + (np.asarray(scene.sky_horizon) - color) * haze[:, None]
    out = np.empty_like(color)
    out[order] = color
    return out


# ------------------------------------------------------------ scene layouts
def _color(rng, base, jitter=0.08):
    return tuple(np.clip(np.asarray(base) + rng.uniform(-jitter, jitter, 3), 0, 1))


def _material(rng, pattern, base_a, base_b, scale):
    return Material(pattern, _color(rng, base_a), _color(rng, base_b), scale,
                    int(rng.integers(1 << 30)))


_FACADES = [(0.75, 0.70, 0.62), (0.62, 0.35, 0.28), (0.80, 0.80, 0.78),
            (0.50, 0.50, 0.52), (0.70, 0.58, 0.42), (0.45, 0.40, 0.36)]
_CAR_PAINTS = [(0.7, 0.1, 0.1), (0.1, 0.2, 0.6), (0.85, 0.85, 0.85), (0.15, 0.15, 0.15),
               (0.5, 0.5, 0.55), (0.6, 0.5, 0.2), (0.2, 0.45, 0.25)]


def _facade_material(rng):
    wall = _FACADES[rng.integers(len(_FACADES))]
    if rng.random() < 0.25:
        return _material(rng, "bricks", wall, (0.85, 0.82, 0.78), rng.uniform(0.25, 0.4))
    return _material(rng, "windows", wall, (0.15, 0.2, 0.28), rng.uniform(2.8, 3.6))


def _tree(rng, x, z, prims):
    trunk_h, crown_r = rng.uniform(1.8, 3.5), rng.uniform(1.2, 3.0)
    prims.append(Cylinder((x, 0.0, z), (0.0, 1.0, 0.0), trunk_h + crown_r * 0.5,
                          rng.uniform(0.1, 0.25), _material(rng, "noise", (0.35, 0.25, 0.15),
                                                            (0.2, 0.15, 0.1), 0.3)))
    prims.append(Sphere((x, trunk_h + crown_r * 0.8, z), crown_r,
                        _material(rng, "noise", (0.2, 0.45, 0.15), (0.1, 0.25, 0.08), 0.4)))


def _car(rng, x, z, yaw, y0, prims):
    length, width = rng.uniform(3.8, 4.8), rng.uniform(1.6, 1.9)
    paint = _CAR_PAINTS[rng.integers(len(_CAR_PAINTS))]
    body = _material(rng, "noise", paint, np.multiply(paint, 0.6), rng.uniform(0.3, 1.0))
    prims.append(Box((x, y0 + 0.65, z), (width / 2, 0.4, length / 2), body, yaw))
    cabin = _material(rng, "stripes", paint, (0.1, 0.12, 0.15), rng.uniform(0.5, 0.8))
    prims.append(Box((x, y0 + 1.3, z), (width / 2 - 0.1, 0.3, length / 3), cabin, yaw))


def _van(rng, x, z, yaw, prims):
    """A delivery van or small truck: one tall box, taller than a car, with a banded side."""
    length, width, height = rng.uniform(5.0, 8.0), rng.uniform(2.0, 2.5), rng.uniform(2.2, 3.2)
    paint = _CAR_PAINTS[rng.integers(len(_CAR_PAINTS))]
    body = _material(rng, "stripes", paint, np.multiply(paint, 0.7), rng.uniform(0.6, 1.5))
    prims.append(Box((x, 0.3 + height / 2, z), (width / 2, height / 2, length / 2), body, yaw))


def _camera(rng, x, z, yaw, width):
    """Random height, pitch, roll and focal length within CAMERA_RANGES."""
    r = CAMERA_RANGES
    hfov = math.radians(rng.uniform(*r["hfov_deg"]))
    return Camera(position=(x, rng.uniform(*r["height_m"]), z),
                  focal=(width / 2) / math.tan(hfov / 2), yaw=yaw,
                  pitch=math.radians(rng.uniform(*r["pitch_deg"])),
                  roll=math.radians(rng.uniform(*r["roll_deg"])))


def _lighting(rng, prims):
    azimuth, elevation = rng.uniform(0, 2 * math.pi), rng.uniform(0.35, 1.2)
    sun = (math.cos(elevation) * math.cos(azimuth), math.sin(elevation),
           math.cos(elevation) * math.sin(azimuth))
    overcast = rng.random() < 0.25
    return Scene(prims, sun=sun, sun_strength=0.3 if overcast else rng.uniform(0.6, 0.9),
                 ambient=rng.uniform(0.55, 0.7) if overcast else rng.uniform(0.3, 0.45),
                 sky_horizon=_color(rng, (0.82, 0.84, 0.86) if overcast else (0.78, 0.85, 0.92), 0.04),
                 sky_zenith=_color(rng, (0.65, 0.68, 0.72) if overcast else (0.3, 0.5, 0.85), 0.06),
                 haze_distance=rng.uniform(150, 400))


def _open_lot(rng, side, edge, far, prims):
    """The open side of a street beyond x = side·edge: a low wall, and half the time a car park behind it."""
    h = rng.uniform(0.4, 1.2)
    prims.append(Box((side * (edge + 0.3), h / 2, far / 2), (0.3, h / 2, far / 2 + 30),
                     _material(rng, "bricks", (0.55, 0.5, 0.45), (0.7, 0.7, 0.68), 0.2)))
    if rng.random() < 0.5:  # cars at any angle
        for _ in range(rng.integers(2, 10)):
            x, z = side * (edge + rng.uniform(3.5, 25)), rng.uniform(3, 50)
            _car(rng, x, z, rng.choice([0.0, math.pi / 2]) + rng.normal(0, 0.3), 0.0, prims)


def street_scene(rng, width=IMAGE_HW[1]):
    """City street canyon: road, curbs, facades or open lots, trees, lamp posts, parked cars, traffic."""
    road, pave = rng.uniform(3.0, 6.5), rng.uniform(1.5, 4.0)
    far = rng.uniform(60, 220)
    prims = [GroundPlane(_material(rng, "road", (0.25, 0.25, 0.26), (0.9, 0.9, 0.85), 0.6))]
    curb = _material(rng, "checkers", (0.6, 0.58, 0.55), (0.5, 0.48, 0.46), rng.uniform(0.4, 0.8))
    for side in (-1, 1):
        prims.append(Box((side * (road + pave / 2 + 1), 0.075, far / 2), (pave / 2 + 1, 0.075, far / 2 + 30), curb))
        # Some sides are open (a park or a car park): these scenes supply the
        # sky-heavy tail of the depth distribution.
        open_side = rng.random() < 0.45
        if open_side:
            _open_lot(rng, side, road + pave, far, prims)
        z = -30.0
        while z < far and not open_side:
            span = rng.uniform(8, 30)
            if rng.random() > 0.2:
                setback = rng.uniform(0, 2.5) if rng.random() < 0.3 else 0.0
                depth, h = rng.uniform(8, 20), rng.uniform(5, 30)
                x = side * (road + pave + setback + depth / 2)
                prims.append(Box((x, h / 2, z + span / 2), (depth / 2, h / 2, span / 2),
                                 _facade_material(rng)))
            z += span
        if rng.random() < 0.6:
            for z in np.arange(rng.uniform(2, 12), min(far, 90), rng.uniform(7, 15)):
                _tree(rng, side * (road + 0.9), z, prims)
        pole = _material(rng, "plain", (0.3, 0.3, 0.32), (0, 0, 0), 1.0)
        for z in np.arange(rng.uniform(0, 20), min(far, 100), rng.uniform(15, 30)):
            prims.append(Cylinder((side * (road + 0.4), 0.0, z), (0.0, 1.0, 0.0),
                                  rng.uniform(5, 8), 0.09, pole))
        for z in rng.uniform(1, 40, rng.integers(0, 7)):
            _car(rng, side * (road - 1.1), z, 0.0, 0.0, prims)
    if rng.random() < 0.5:  # the street ends at a cross building
        h = rng.uniform(10, 40)
        prims.append(Box((0, h / 2, far + 10), (60, h / 2, 10), _facade_material(rng)))
    for _ in range(rng.integers(0, 4)):  # traffic in the lanes ahead, sometimes close
        x, z = rng.uniform(-road + 2.3, road - 2.3), rng.uniform(4.5, 45)
        if rng.random() < 0.75:
            _car(rng, x, z, rng.normal(0, 0.15), 0.0, prims)
        else:
            _van(rng, x, z + 1.5, rng.normal(0, 0.1), prims)
    for _ in range(rng.integers(0, 4)):  # street furniture on the pavements
        x, z = rng.choice([-1, 1]) * (road + rng.uniform(0.5, pave)), rng.uniform(2, 40)
        s = rng.uniform(0.3, 0.9)
        mat = _material(rng, "checkers", _color(rng, (0.5, 0.5, 0.5), 0.3), (0.2, 0.2, 0.2), s / 2)
        prims.append(Sphere((x, s, z), s, mat) if rng.random() < 0.5
                     else Box((x, s, z), (s, s, s), mat, rng.uniform(0, math.pi)))
    yaw = rng.uniform(-0.45, 0.45) if rng.random() < 0.65 else rng.choice([-1, 1]) * rng.uniform(0.5, 1.3)
    # Keep the camera clear of the parked cars, which occupy road - 2.05 .. road - 0.15.
    cam = _camera(rng, rng.uniform(-road + 2.3, road - 2.3), 0.0, yaw, width)
    return _lighting(rng, prims), cam


def yard_scene(rng, width=IMAGE_HW[1]):
    """Junkyard: dirt ground, fences, sheds, scattered and stacked cars, poles and wires."""
    prims = [GroundPlane(_material(rng, "noise", (0.45, 0.38, 0.3), (0.3, 0.27, 0.22), rng.uniform(0.3, 1.2)))]
    fence = _material(rng, "stripes", (0.55, 0.55, 0.58), (0.4, 0.4, 0.42), rng.uniform(0.15, 0.4))
    half = rng.uniform(15, 34)
    for ax in range(4):  # a fence around the yard, built from panels with gaps
        for s in np.arange(-half, half, 6.0):
            if rng.random() < 0.15:
                continue
            h = rng.uniform(2.0, 3.5)
            u, v = s + 3.0, half * (1 if ax % 2 else -1)
            x, z = (u, v) if ax < 2 else (v, u)
            prims.append(Box((x, h / 2, z), (3.0, h / 2, 0.1), fence, 0.0 if ax < 2 else math.pi / 2))
    for _ in range(rng.integers(1, 4)):  # sheds near the fence
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 0.9) * half
        w, h = rng.uniform(3, 10), rng.uniform(3, 7)
        prims.append(Box((r * math.cos(a), h / 2, r * math.sin(a)), (w / 2, h / 2, rng.uniform(2, 5)),
                         _facade_material(rng), rng.uniform(0, math.pi)))
    for _ in range(rng.integers(8, 22)):  # cars, some stacked two high
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(3.5, half * 0.9)
        x, z, yaw = r * math.cos(a), r * math.sin(a), rng.uniform(0, math.pi)
        _car(rng, x, z, yaw, 0.0, prims)
        if rng.random() < 0.3:
            _car(rng, x, z, yaw + rng.uniform(-0.3, 0.3), 1.65, prims)
    pole = _material(rng, "noise", (0.4, 0.3, 0.2), (0.3, 0.22, 0.15), 0.5)
    wire = _material(rng, "plain", (0.1, 0.1, 0.1), (0, 0, 0), 1.0)
    a, r = rng.uniform(0, 2 * math.pi), rng.uniform(5, 15)
    start, step = np.array([r * math.cos(a), r * math.sin(a)]), rng.uniform(15, 30)
    heading = rng.uniform(0, 2 * math.pi)
    tops = []
    for i in range(rng.integers(3, 6)):  # a line of poles with two wires between them
        x, z = start + i * step * np.array([math.cos(heading), math.sin(heading)])
        h = rng.uniform(6, 9)
        prims.append(Cylinder((x, 0.0, z), (0.0, 1.0, 0.0), h, 0.12, pole))
        tops.append(np.array([x, h - 0.3, z]))
    for p, q in zip(tops, tops[1:]):
        for dy in (0.0, -0.6):
            span = q - p
            prims.append(Cylinder(tuple(p + [0, dy, 0]), tuple(span / np.linalg.norm(span)),
                                  float(np.linalg.norm(span)), 0.04, wire))
    for _ in range(rng.integers(2, 8)):
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(6, half * 1.5)
        _tree(rng, r * math.cos(a), r * math.sin(a), prims)
    for _ in range(rng.integers(0, 6)):  # scrap: barrels and rounded heaps
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(2.5, half * 0.8)
        x, z = r * math.cos(a), r * math.sin(a)
        mat = _material(rng, "noise", _color(rng, (0.45, 0.3, 0.2), 0.2), (0.2, 0.15, 0.1), 0.2)
        prims.append(Cylinder((x, 0.0, z), (0.0, 1.0, 0.0), 0.9, 0.3, mat) if rng.random() < 0.5
                     else Sphere((x, -0.5, z), rng.uniform(1.0, 2.5), mat))
    for _ in range(rng.integers(0, 3)):  # distant hills close the horizon
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(120, 220)
        rad = rng.uniform(40, 100)
        prims.append(Sphere((r * math.cos(a), -0.85 * rad, r * math.sin(a)), rad,
                            _material(rng, "noise", (0.35, 0.42, 0.3), (0.25, 0.3, 0.2), 8.0)))
    cam = _camera(rng, 0.0, 0.0, rng.uniform(0, 2 * math.pi), width)
    return _lighting(rng, prims), cam


_BUILDERS = {"street": street_scene, "yard": yard_scene}


def render_scene(rng, style, height=IMAGE_HW[0], width=IMAGE_HW[1]):
    """Sample a random scene of `style` from `rng` and render it."""
    if style not in _BUILDERS:
        raise ValueError(f"unknown style {style!r}; choose from {', '.join(STYLES)}")
    scene, camera = _BUILDERS[style](rng, width)
    return render(scene, camera, height, width)


# ------------------------------------------------------------------ writing
def _write_atomic(path, write):
    """Write via a temporary name and rename, so no half-written final file exists.

    utils.atomic_path does the same for the rest of the project, but importing utils would
    import torch: this generator runs with NumPy and Pillow alone.
    """
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def pair_paths(split, index, form):
    """(RGB path, depth path) relative to the output root of one pair, in the layout that `form` chooses."""
    if form.lists:  # as users of BTS and Monodepth2 name their files: any names, listed in SPLIT.txt
        return f"images/{split}/scene_{index:05d}.jpg", f"depth/{split}/scene_{index:05d}.png"
    depth_ext = "png" if form.png16 else "npy"
    return f"rgb/{split}/{index}.jpeg", f"depth/{split}/{index}.{depth_ext}"


def drop_measurements(depth, rng, holes, holes_top):
    """The depth a sensor with gaps would record: 0 (no measurement) in the top `holes_top` of the rows, which a
    LiDAR's beams never reach, and in a random `holes` fraction of the other pixels."""
    depth = depth.copy()
    depth[: int(round(holes_top * depth.shape[0]))] = 0.0
    if holes > 0:
        depth[rng.random(depth.shape) < holes] = 0.0
    return depth


def write_png16(fh, depth, depth_scale):
    """Depth in metres as a 16-bit PNG of depth × depth_scale; what does not fit (the sky's 100 m in millimetres)
    is written as 0, no measurement, as a depth sensor records the sky."""
    scaled = np.round(depth.astype(np.float64) * depth_scale)
    scaled[scaled > np.iinfo(np.uint16).max] = 0
    Image.fromarray(scaled.astype(np.uint16)).save(fh, format="PNG")


def _render_and_write(task):
    out, split, index, seed, style, height, width, form = task
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    rgb, depth = render_scene(rng, style, height, width)
    if form.holes or form.holes_top:
        depth = drop_measurements(depth, rng, form.holes, form.holes_top)
    rgb_path, depth_path = (os.path.join(out, p) for p in pair_paths(split, index, form))
    # Fixed quality and no optimisation passes keep the JPEG bytes reproducible.
    _write_atomic(rgb_path, lambda fh: Image.fromarray(rgb).save(fh, format="JPEG", quality=JPEG_QUALITY))
    if form.png16 or form.lists:
        _write_atomic(depth_path, lambda fh: write_png16(fh, depth, form.depth_scale))
    else:
        _write_atomic(depth_path, lambda fh: np.save(fh, depth))
    return split


def _check_args(counts, styles, seed, workers, height, width):
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, n in counts.items():
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} count must be a non-negative integer, got {n!r}")
    for name, style in styles.items():
        if style not in STYLES:
            raise ValueError(f"{name} style must be one of {', '.join(STYLES)}, got {style!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if height < 8 or width < 8:
        raise ValueError(f"image size must be at least 8 x 8, got {height} x {width}")


def _prepare_dirs(out, form):
    try:
        for kind in ("images", "depth") if form.lists else ("rgb", "depth"):
            for split in SPLITS:
                os.makedirs(os.path.join(out, kind, split), exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"cannot write to output directory {out!r}: {err.strerror or err}") from None


def ensure_dataset(out, n_train, n_val, n_test, seed=0, progress=True):
    """Generate a data set into `out` unless it already holds a training split (then it is used as it is)."""
    if os.path.isdir(os.path.join(out, "rgb", "train")) or os.path.isfile(os.path.join(out, "train.txt")):
        print(f"using the data set in {out}")
        return
    print(f"synthesising {n_train}/{n_val}/{n_test} train/val/test scenes into {out}")
    generate_dataset(out, n_train, n_val, n_test, seed=seed, workers=max(1, min(8, os.cpu_count() or 1)),
                     progress=progress)


class OwnDataForm(NamedTuple):
    """How to write the scenes when they stand in for a user's own data set (the defaults: DepthEstimationUnreal's
    layout, float .npy depth, every pixel measured).

    lists: files with free names listed in ROOT/SPLIT.txt (implies png16); png16: depth as 16-bit PNG of
    metres × depth_scale; holes: the fraction of pixels left unmeasured (0) at random; holes_top: the
    fraction of rows at the top never measured, as a LiDAR's."""

    lists: bool = False
    png16: bool = False
    depth_scale: float = PAPER.depth_scale
    holes: float = 0.0
    holes_top: float = 0.0


def generate_dataset(out, n_train, n_val, n_test, seed=0, val_style="yard", test_style="street",
                     workers=1, height=IMAGE_HW[0], width=IMAGE_HW[1], progress=True, form=None):
    """Render a synthetic DepthEstimationUnreal-style data set into `out`; returns its meta."""
    counts = {"train": n_train, "val": n_val, "test": n_test}
    styles = {"train": "street", "val": val_style, "test": test_style}
    _check_args(counts, styles, seed, workers, height, width)
    form = form or OwnDataForm()
    if not (0 <= form.holes < 1 and 0 <= form.holes_top < 1 and form.depth_scale > 0):
        raise ValueError(f"holes and holes_top must be in [0, 1) and depth_scale positive, got {form}")
    out = os.fspath(out)
    _prepare_dirs(out, form)
    tasks = [(out, split, i, int(seed), styles[split], height, width, form)
             for split in SPLITS for i in range(counts[split])]
    with tqdm(total=len(tasks), desc="synthesising", unit="pair", disable=not progress) as bar:
        if workers == 1 or len(tasks) < 2:
            for task in tasks:
                bar.update(_render_and_write(task) and 1)
        else:
            # spawn, not fork: callers may hold threads (e.g. torch) that fork would copy.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_render_and_write, tasks, chunksize=4):
                    bar.update(1)
    if form.lists:
        for split in SPLITS:
            lines = "".join(" ".join(pair_paths(split, i, form)) + "\n" for i in range(counts[split]))
            header = f"# {split} split: RGB_PATH DEPTH_PATH, relative to this folder\n"
            _write_atomic(os.path.join(out, f"{split}.txt"), lambda fh, text=header + lines: fh.write(text.encode()))
    meta = {"generator": "synthetic.py", "generator_version": GENERATOR_VERSION, "seed": int(seed),
            "counts": counts, "styles": styles, "val_style": val_style, "test_style": test_style,
            "height": height, "width": width, "sky_depth_m": SKY_DEPTH,
            "depth": "planar z-depth along the optical axis, metres, float32",
            "rgb": f"JPEG quality {JPEG_QUALITY}", "camera_ranges": CAMERA_RANGES, **form._asdict()}
    _write_atomic(os.path.join(out, "meta.json"),
                  lambda fh: fh.write((json.dumps(meta, indent=2) + "\n").encode()))
    return meta


# ------------------------------------------------------------------ the peers' benchmark layouts
# The focal lengths (pixels) the peers' lists give: NYU Depth v2's Kinect, KITTI's left colour camera.
BENCHMARK_FOCAL = {"nyu": 518.8579, "kitti": 721.5377}
# What a benchmark set's scenes stand in for: NYU's two scene folders per split; KITTI's two drives, whose
# frame numbers repeat (as KITTI's do), so only the folders tell their frames apart.
NYU_SCENES = {"train": ("kitchen_0001a", "bedroom_0002b"), "test": ("bathroom", "office")}
KITTI_DRIVES = ("2011_09_26_drive_0001_sync", "2011_09_26_drive_0002_sync")
# KITTI's projected LiDAR depth: no return above the horizon, and most pixels below it hold none.
KITTI_LIDAR = {"holes_top": 0.35, "holes": 0.8}


def benchmark_paths(kind, split, index, n):
    """(RGB path relative to the data root, depth path relative to the depth root) of pair `index` of `n` in a
    benchmark layout: NYU's scene/rgb_N.jpg and scene/sync_depth_N.png; KITTI's date/drive/image_02/data/N.png
    beside drive/proj_depth/groundtruth/image_02/N.png. The first half of a split is in the first scene or
    drive, the second half in the second, numbered from 0 in each."""
    half = (n + 1) // 2
    place, frame = (0, index) if index < half else (1, index - half)
    if kind == "nyu":
        scene = NYU_SCENES[split][place]
        frame += 1000 * SPLITS.index(split)  # NYU's frame numbers differ between train and test
        return f"{scene}/rgb_{frame:05d}.jpg", f"{scene}/sync_depth_{frame:05d}.png"
    drive = KITTI_DRIVES[place]
    frame += 1000 * SPLITS.index(split)
    return (f"{drive[:10]}/{drive}/image_02/data/{frame:010d}.png",
            f"{drive}/proj_depth/groundtruth/image_02/{frame:010d}.png")


def benchmark_list_line(kind, split, index, n, no_depth):
    """One line of a benchmark split list in the peers' format, RGB DEPTH FOCAL: NYU's training list writes its
    paths with a leading `/`, as BTS's does, and KITTI's first training line too; DEPTH None for a frame
    without ground truth."""
    rgb, depth = benchmark_paths(kind, split, index, n)
    if no_depth:
        depth = "None"
    if split == "train" and (kind == "nyu" or index == 0):
        rgb, depth = "/" + rgb, depth if no_depth else "/" + depth
    return f"{rgb} {depth} {BENCHMARK_FOCAL[kind]}\n"


def generate_benchmark_set(out, kind, n_train, n_test, height, width, seed=0, no_depth=1, progress=True):
    """Synthetic scenes written as NYU Depth v2 (kind "nyu") or KITTI ("kitti") are shipped to the peers:
    their folders, 16-bit depth PNGs (millimetres for NYU; x 256 and LiDAR-sparse for KITTI) and the split lists
    train.txt and test.txt in the peers' format, with `no_depth` frames of each list written with DEPTH None
    (their RGB exists, their depth does not). No val split, as the peers ship none.

    NYU: everything under `out`, the lists in it. KITTI: RGB under OUT/raw with the lists, depth under OUT/gt
    (--data-dir OUT/raw --gt-dir OUT/gt). Returns (data root, depth root)."""
    if kind not in BENCHMARK_FOCAL:
        raise ValueError(f"benchmark layout must be one of {', '.join(BENCHMARK_FOCAL)}, got {kind!r}")
    counts = {"train": n_train, "test": n_test}
    _check_args(counts, {}, seed, 1, height, width)
    out = os.fspath(out)
    data_root, depth_root = (out, out) if kind == "nyu" else (os.path.join(out, "raw"), os.path.join(out, "gt"))
    depth_scale = 1000.0 if kind == "nyu" else 256.0
    tasks = [(split, i) for split, n in counts.items() for i in range(n + no_depth)]
    for split, i in tqdm(tasks, desc=f"synthesising ({kind})", unit="pair", disable=not progress):
        n = counts[split] + no_depth
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        rgb, depth = render_scene(rng, "street", height, width)
        rgb_rel, depth_rel = benchmark_paths(kind, split, i, n)
        rgb_path, depth_path = os.path.join(data_root, rgb_rel), os.path.join(depth_root, depth_rel)
        os.makedirs(os.path.dirname(rgb_path), exist_ok=True)
        if kind == "nyu":
            _write_atomic(rgb_path, lambda fh, a=rgb: Image.fromarray(a).save(fh, format="JPEG", quality=JPEG_QUALITY))
        else:
            _write_atomic(rgb_path, lambda fh, a=rgb: Image.fromarray(a).save(fh, format="PNG"))
            depth = drop_measurements(depth, rng, **KITTI_LIDAR)
        if i >= counts[split]:
            continue  # a frame without ground truth: its RGB only
        os.makedirs(os.path.dirname(depth_path), exist_ok=True)
        _write_atomic(depth_path, lambda fh, d=depth: write_png16(fh, d, depth_scale))
    for split, n in counts.items():
        lines = "".join(benchmark_list_line(kind, split, i, n + no_depth, i >= n) for i in range(n + no_depth))
        _write_atomic(os.path.join(data_root, f"{split}.txt"), lambda fh, text=lines: fh.write(text.encode()))
    return data_root, depth_root


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a synthetic Unreal-like RGB-D data set.")
    parser.add_argument("--out", default="data/synthetic", help="output root (default: %(default)s)")
    parser.add_argument("--train", type=int, default=400, help="train pairs")
    parser.add_argument("--val", type=int, default=100, help="val pairs")
    parser.add_argument("--test", type=int, default=100, help="test pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-style", choices=STYLES, default="yard")
    parser.add_argument("--test-style", choices=STYLES, default="street")
    parser.add_argument("--workers", type=_positive_int, default=min(8, os.cpu_count() or 1),
                        help="processes; the output is identical for any number (default: the cores, up to 8)")
    parser.add_argument("--height", type=_positive_int, default=IMAGE_HW[0])
    parser.add_argument("--width", type=_positive_int, default=IMAGE_HW[1])
    own = parser.add_argument_group("writing the scenes as a user's own data set might be (see the README's "
                                    "'Your own data')")
    own.add_argument("--lists", action="store_true",
                     help="free file names (images/SPLIT/scene_N.jpg, depth/SPLIT/scene_N.png) listed in SPLIT.txt; "
                          "implies --png16")
    own.add_argument("--png16", action="store_true",
                     help="depth as 16-bit PNG of metres x --depth-scale; the sky, beyond 65 m, as 0 (no measurement)")
    own.add_argument("--depth-scale", type=float, default=PAPER.depth_scale,
                     help="16-bit PNG units per metre (default: 1000, mm)")
    own.add_argument("--holes", type=float, default=0.0,
                     help="fraction of the pixels left unmeasured (0) at random (default: 0)")
    own.add_argument("--holes-top", type=float, default=0.0,
                     help="fraction of the rows at the top never measured, as a LiDAR's (default: 0)")
    own.add_argument("--benchmark", choices=sorted(BENCHMARK_FOCAL), default=None,
                     help="write NYU Depth v2's or KITTI's layout and split lists in the peers' format instead (train "
                          "and test, one frame of each without ground truth; KITTI: OUT/raw and OUT/gt), at "
                          "--height x --width")
    args = parser.parse_args(argv)
    if args.benchmark:
        try:
            data_root, depth_root = generate_benchmark_set(args.out, args.benchmark, args.train, args.test,
                                                           args.height, args.width, args.seed)
        except ValueError as err:
            raise SystemExit(f"synthetic.py: error: {err}") from None
        print(f"wrote a {args.benchmark}-shaped set: --data-dir {data_root}"
              + (f" --gt-dir {depth_root}" if depth_root != data_root else ""))
        return
    form = OwnDataForm(args.lists, args.png16 or args.lists, args.depth_scale, args.holes, args.holes_top)
    try:
        meta = generate_dataset(args.out, args.train, args.val, args.test, args.seed, args.val_style,
                                args.test_style, args.workers, args.height, args.width, form=form)
    except ValueError as err:
        raise SystemExit(f"synthetic.py: error: {err}") from None
    print(f"wrote {sum(meta['counts'].values())} pairs to {args.out}")


if __name__ == "__main__":
    main()
