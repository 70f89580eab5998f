"""
The built-in world: a stand-in FLAME head and a SingingHead-layout data set made from nothing, so that every
command runs with no download. Nothing of the method lives here; the library sees it through `stand_in_flame`,
`load_flame` and `builtin_data`. Holds, in the order the data set is made:
- the stand-in head (`procedural_head`): FLAME-format arrays of a deformed sphere with a face, 100 shape and
  50 expression blendshapes, pose correctives, 5 joints, 68 landmarks, region masks, lips cut to open;
- the singers (`make_person`), their songs (`compose_song`), voices (`sing`), background music (`play_music`)
  and the motion law, a known function of the sound (`song_motion`);
- the filmed person (`filmed_body`, `film`): the stand-in head made up, dressed and lit like a portrait video;
- `generate_dataset` / `builtin_data` (made once, rebuilt when BUILTIN_VERSION changes), and which head a data
  set or a checkpoint needs (`require_head`, `flame_record`, `resolve_flame`).

The motion law, per frame t (covering audio [t/30, (t+1)/30) s): the jaw opens by jaw_gain * 0.3 rad *
envelope * the vowel's openness; the mouth follows the vowel (/a/ open, /e/ /i/ spread, /o/ /u/ rounded); the
brows rise with the pitch; the head nods (global and half as much neck x-rotation) at every beat; plus each
person's offsets and a little smooth noise. Files are in the release's layout (data.py), with videos of one
person's val, test and first train sequences.

Depends on numpy, scipy, torch and our flame.py, audio.py, render.py and data.py.

Use alone:
    python builtin.py                     # make (first use) and summarise the built-in data set
    root = builtin_data()                 # Path of data/builtin
    head = stand_in_flame()               # a flame.Flame
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d, uniform_filter1d

import render
from audio import FPS, SAMPLE_RATE
from data import (CLIP_SECONDS, DEFAULT_CAM, N_POSE, SPLITS, Progress, SingingHead, audio_path, bgm_path, flame_path,
                  split_path, video_path, write_flame_pickle, write_video, write_wav)
from flame import MOTION_DIM, N_EXPR, N_JOINTS, N_POSE_FEATURES, N_SHAPE, Flame, file_sha256
from render import FILL_LIGHT, KEY_LIGHT, vertex_normals

BUILTIN_ROOT = Path(__file__).parent / "data" / "builtin"
BUILTIN_VERSION = 2                   # bump when the generator changes: an older built-in set is rebuilt
TEST_SHARE, VAL_SHARE = 0.15, 0.05    # the release's 80 / 5 / 15 % split by sequence


# ----------------------------------------------------------------------------- the stand-in head

# Grid of a deformed UV sphere, polar angle a from +y (0 top, pi bottom), azimuth phi from +z towards +x.
N_RINGS, N_LON = 68, 74
RING_DENSITY, LON_DENSITY = 0.45, 0.5     # how much denser rings/meridians are at the face than elsewhere
FACE_CENTRE_U = 0.55                      # ring parameter where rings are densest (between eyes and mouth)
HEAD_RADII = np.array([0.078, 0.112, 0.098])  # m: half width, half height, half depth of the head ellipsoid
NECK_RADIUS, NECK_Z, NECK_BOTTOM = 0.052, -0.02, -0.185  # m
MOUTH_A, MOUTH_HALF_WIDTH = 0.64 * math.pi, 0.26   # lips' seam: polar angle (y ~ -4.3 cm), half azimuth (~2.4 cm)
EYE_A, EYE_PHI = 0.385 * math.pi, 0.36    # eye socket centres (y ~ +3.7 cm, x ~ +-3.4 cm)
BROW_A, CHIN_A = 0.33 * math.pi, 0.76 * math.pi   # polar angles of the brows and the chin
JAW_PIVOT = np.array([0.072, -0.02, 0.0])  # m, right-hand TMJ; mirrored for the left one


def smoothstep(x):
    """0 below 0, 1 above 1, the cubic 3x² - 2x³ between: a soft edge for painted and blended regions."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _bump(a, phi, a0, phi0, sa, sphi):
    """Gaussian on the (polar angle, azimuth) chart; azimuth differences wrap around."""
    dphi = np.angle(np.exp(1j * (phi - phi0)))
    return np.exp(-0.5 * ((a - a0) / sa) ** 2 - 0.5 * (dphi / sphi) ** 2)


def _nose(a, phi):
    """Nose ridge height, 0 at the brow rising to 1 at the tip, falling off sharply below it."""
    profile = smoothstep((a - 0.36 * math.pi) / (0.16 * math.pi)) \
        * np.exp(-0.5 * (np.maximum(a - 0.52 * math.pi, 0) / (0.025 * math.pi)) ** 2)
    return profile * np.exp(-0.5 * (phi / 0.09) ** 2)


def _relief(a, phi):
    """Radial relief (m) of the face features, a function of direction only."""
    wings = _bump(a, phi, 0.53 * math.pi, 0.14, 0.03, 0.05) + _bump(a, phi, 0.53 * math.pi, -0.14, 0.03, 0.05)
    relief = 0.022 * _nose(a, phi) + 0.006 * wings
    for side in (-1, 1):
        relief += -0.010 * _bump(a, phi, EYE_A, side * EYE_PHI, 0.05 * math.pi, 0.14)        # socket
        relief += 0.006 * _bump(a, phi, EYE_A, side * EYE_PHI, 0.022 * math.pi, 0.06)        # eyeball
        relief += 0.005 * _bump(a, phi, BROW_A, side * 0.35, 0.03 * math.pi, 0.25)           # brow ridge
        relief += 0.005 * _bump(a, phi, 0.47 * math.pi, side * 0.7, 0.06 * math.pi, 0.2)     # cheekbone
        relief += 0.012 * _bump(a, phi, 0.45 * math.pi, side * math.pi / 2, 0.06 * math.pi, 0.09)  # ear
    lips = np.cos(np.clip(phi / 0.34, -1, 1) * math.pi / 2) ** 2
    relief += lips * (0.004 * np.exp(-0.5 * ((a - MOUTH_A + 0.05) / 0.04) ** 2)
                      + 0.0045 * np.exp(-0.5 * ((a - MOUTH_A - 0.06) / 0.045) ** 2))
    relief += 0.010 * _bump(a, phi, CHIN_A, 0.0, 0.06 * math.pi, 0.35)
    return relief


def _radius(d):
    """Distance (m) from the origin to the head-plus-neck surface along unit directions d (..., 3)."""
    head = 1 / np.sqrt(((d / HEAD_RADII) ** 2).sum(-1))
    h2 = np.maximum(d[..., 0] ** 2 + d[..., 2] ** 2, 1e-12)
    dz = d[..., 2] * NECK_Z
    side = (dz + np.sqrt(dz ** 2 + h2 * (NECK_RADIUS ** 2 - NECK_Z ** 2))) / h2
    bottom = np.where(d[..., 1] < -1e-6, NECK_BOTTOM / np.minimum(d[..., 1], -1e-6), 1e3)
    neck = (side ** -12 + bottom ** -12) ** (-1 / 12)                  # soft min: side wall or bottom cap
    neck = np.where(d[..., 1] < 0, neck, 0.0)
    return (head ** 10 + neck ** 10) ** 0.1                            # soft max: head united with neck


def _faces(R, L):
    """Triangles of the closed grid: top cap, bands between rings, bottom cap (outward, counter-clockwise)."""
    ring = lambda i, j: 1 + i * L + (j % L)
    j = np.arange(L)
    top = np.stack([np.zeros(L, np.int64), ring(0, j), ring(0, j + 1)], 1)
    bottom = np.stack([np.full(L, 1 + R * L), ring(R - 1, j + 1), ring(R - 1, j)], 1)
    i, j = np.meshgrid(np.arange(R - 1), np.arange(L), indexing='ij')
    a, b, c, d = ring(i, j), ring(i, j + 1), ring(i + 1, j), ring(i + 1, j + 1)
    bands = np.stack([np.stack([a, c, b], -1), np.stack([b, c, d], -1)], 2).reshape(-1, 3)  # quad (i, j) -> 2 triangles
    return np.concatenate([top, bands, bottom]).astype(np.int64)


def _landmarks(head):
    """Face ids (68,) and barycentric coordinates (68, 3) on the grid's band triangles of the iBUG-68 landmarks,
    placed on the chart as (polar angle, azimuth, lip side): side +1 on the upper lip's edge of the seam, -1 on the
    lower lip's, 0 elsewhere. Subject's right (iBUG 0, 36, 48) is -x."""
    pts, a_mouth, L = [], head.a_mouth, len(head.lon_phi)
    t = np.linspace(-1, 1, 17)                                                        # 0-16 jaw contour
    pts += [(0.45 * math.pi + 0.31 * math.pi * (1 - abs(s) ** 1.6), 1.2 * s, 0) for s in t]
    pts += [(BROW_A - 0.02 * math.pi * math.sin(math.pi * k / 4), p, 0)              # 17-26 brows
            for side in (-1, 1) for k, p in enumerate(np.linspace(0.62, 0.14, 5)[::side] * side)]
    pts += [(a, 0.0, 0) for a in np.linspace(0.40, 0.52, 4) * math.pi]                # 27-30 nose ridge
    pts += [(0.545 * math.pi, p, 0) for p in (-0.12, -0.06, 0.0, 0.06, 0.12)]          # 31-35 nostrils
    h, w, m = 0.02 * math.pi, 0.13, 0.045
    for c, outer in ((-EYE_PHI, -1), (EYE_PHI, 1)):   # 36-47 eyes in iBUG order: the left one from its inner corner
        ring = [(EYE_A, c + outer * w), (EYE_A - h, c + outer * m), (EYE_A - h, c - outer * m),
                (EYE_A, c - outer * w), (EYE_A + h, c - outer * m), (EYE_A + h, c + outer * m)]
        pts += [(*ring[k], 0) for k in ((0, 1, 2, 3, 4, 5) if outer < 0 else (3, 2, 1, 0, 5, 4))]
    pw = MOUTH_HALF_WIDTH
    pts += [(a_mouth, -pw, 0)] + [(a_mouth - 0.045, p, 0) for p in (-0.17, -0.08, 0, 0.08, 0.17)]   # 48-53
    pts += [(a_mouth, pw, 0)] + [(a_mouth + 0.055, p, 0) for p in (0.17, 0.08, 0, -0.08, -0.17)]    # 54-59
    pts += [(a_mouth, -0.9 * pw, 1)] + [(a_mouth, p, 1) for p in (-0.1, 0, 0.1)]                    # 60-63
    pts += [(a_mouth, 0.9 * pw, 1)] + [(a_mouth, p, -1) for p in (0.1, 0, -0.1)]                    # 64-67
    faces, bary = [], []
    for a, phi, side in pts:
        if side:  # on the seam: bottom edge of the band above (upper lip) or top edge of the band below
            i, fu = (head.mouth_ring - 1, 1.0) if side > 0 else (head.mouth_ring, 0.0)
        else:
            u = float(np.interp(a, head.rings_a, np.arange(len(head.rings_a))))
            i, fu = int(u), u - int(u)
        v = float(np.interp(phi, head.lon_phi, np.arange(L)))
        j, fv = int(v), v - int(v)
        first = L + 2 * (i * L + j)
        if fu + fv <= 1:
            faces.append(first), bary.append((1 - fu - fv, fu, fv))          # triangle (a, c, b)
        else:
            faces.append(first + 1), bary.append((1 - fu, 1 - fv, fu + fv - 1))  # triangle (b, c, d)
    return np.array(faces, np.int64), np.array(bary)


def procedural_head(seed=0):
    """FLAME-format arrays of the stand-in head (dict of numpy float64 arrays plus landmarks and masks): a
    deformed UV sphere united with a neck, with nose, eye sockets, brows, cheekbones, ears, lips and chin. The
    lips' seam is cut so the mouth opens when the jaw rotates. Hand-made: shape blendshapes 0-14 (width, height,
    depth, nose, chin, jaw, forehead, cheeks, eyes, mouth, neck, crown, lower face, brows, ears) and expressions
    0-15 (mouth open, smile, frown, pucker, lip raise/depress, brows, cheek puff, lip stretch, one-sided smiles,
    squint, nose wrinkle, jaw shift, funnel); the rest are smooth random fields, the only part the seed sets."""
    rng = np.random.default_rng(seed)
    h = _head_surface()
    # skinning weights on root, neck and jaw: the jaw's share fades under the chin
    jaw = h.lower * h.front * (1 - smoothstep((h.a - 0.76 * math.pi) / (0.17 * math.pi)))
    root = smoothstep((-0.12 - h.verts[:, 1]) / 0.05)
    weights = np.zeros((len(h.verts), N_JOINTS))
    weights[:, 0], weights[:, 1], weights[:, 2] = root, (1 - root) * (1 - jaw), (1 - root) * jaw
    shapedirs = _blendshapes(h, jaw, rng)                       # draws from rng before the pose correctives
    # pose correctives (V, 3, 36), columns 9·(joint - 1) + entry of (R - I): smooth fields where skinning weights
    # blend (the crease where neck meets head, the cheeks the jaw stretches)
    posedirs = np.zeros((len(h.verts), 3, N_POSE_FEATURES))
    for joint, influence in ((1, root * (1 - root) * 4), (2, jaw * (1 - jaw) * 4 + 0.5 * jaw)):
        for entry in range(9):
            wave = rng.normal(size=3) * 20.0
            field = np.cos(h.verts @ wave + rng.uniform(0, 2 * math.pi))
            posedirs[:, :, 9 * (joint - 1) + entry] = h.normals * (0.004 * influence * field)[:, None]
    lmk_faces, lmk_bary = _landmarks(h)
    # FLAME_masks.pkl's regions: vertex ids of face, lips, forehead, eyes, neck
    a, phi, y = h.a, h.phi, h.verts[:, 1]
    forehead = np.nonzero((abs(phi) < 0.8) & (a > 0.2 * math.pi) & (a < BROW_A))[0]
    eye_region = np.nonzero((abs(abs(phi) - EYE_PHI) < 0.25) & (a >= BROW_A) & (a < EYE_A + 0.06 * math.pi))[0]
    masks = dict(face=np.nonzero((abs(phi) < 1.05) & (a > 0.28 * math.pi) & (a < 0.8 * math.pi) & (y > -0.11))[0],
                 lips=np.nonzero((abs(phi) < MOUTH_HALF_WIDTH + 0.1) & (abs(h.below_m) < 0.011))[0],
                 forehead=forehead, eye_region=eye_region, upper_face=np.union1d(forehead, eye_region),
                 neck=np.nonzero(y < -0.11)[0])
    return dict(v_template=h.verts, shapedirs=shapedirs, posedirs=posedirs, J_regressor=_joint_regressor(h.verts),
                weights=weights, kintree_table=np.array([[-1, 0, 1, 1, 1], np.arange(5)]), f=h.faces,
                lmk_faces_idx=lmk_faces, lmk_bary_coords=lmk_bary, masks=masks)


@dataclass
class HeadSurface:
    """The stand-in head's rest mesh and its chart, shared by the blendshapes, weights, landmarks and masks."""
    verts: np.ndarray          # (V, 3) metres
    faces: np.ndarray          # (F, 3)
    normals: np.ndarray        # (V, 3)
    a: np.ndarray              # (V,) polar angle from +y
    phi: np.ndarray            # (V,) azimuth from +z toward +x
    rings_a: np.ndarray        # (R,) the rings' polar angles
    lon_phi: np.ndarray        # (L,) the meridians' azimuths
    mouth_ring: int
    a_mouth: float
    lower: np.ndarray          # (V,) 1 below the lips' seam, 0 above
    below_m: np.ndarray        # (V,) metres below the seam (negative above)
    front: np.ndarray          # (V,) 1 on the face's front, 0 at the back


def _head_surface():
    """The deformed sphere with its lips' seam cut: the band below the mouth ring uses copies of the seam's
    inner vertices, so the lower lip can part from the upper."""
    u = np.arange(1, N_RINGS + 1) / (N_RINGS + 1)                       # rings and meridians denser over the face
    u = u - RING_DENSITY * (np.sin(2 * math.pi * (u - FACE_CENTRE_U))
                            + math.sin(2 * math.pi * FACE_CENTRE_U)) / (2 * math.pi)
    x = -1 + 2 * np.arange(N_LON) / N_LON
    rings_a, lon_phi = math.pi * u, math.pi * (x - LON_DENSITY * np.sin(math.pi * x) / math.pi)
    R, L = len(rings_a), len(lon_phi)
    A, P = np.meshgrid(rings_a, lon_phi, indexing='ij')
    a = np.concatenate([[0.0], A.reshape(-1), [math.pi]])                           # (V0,)
    phi = np.concatenate([[0.0], P.reshape(-1), [0.0]])
    d = np.stack([np.sin(a) * np.sin(phi), np.cos(a), np.sin(a) * np.cos(phi)], 1)  # (V0, 3) unit directions
    verts = d * (_radius(d) + _relief(a, phi))[:, None]
    faces = _faces(R, L)
    normals = vertex_normals(torch.from_numpy(verts), torch.from_numpy(faces)).numpy()

    mouth_ring = int(np.argmin(abs(rings_a - MOUTH_A)))
    seam = np.nonzero(abs(lon_phi) < MOUTH_HALF_WIDTH)[0]
    seam_ids = 1 + mouth_ring * L + seam
    copies = len(verts) + np.arange(len(seam))
    remap = np.arange(len(verts))
    remap[seam_ids] = copies
    band = slice(L + 2 * mouth_ring * L, L + 2 * (mouth_ring + 1) * L)
    faces[band] = remap[faces[band]]
    verts, normals = np.concatenate([verts, verts[seam_ids]]), np.concatenate([normals, normals[seam_ids]])
    a, phi = np.concatenate([a, a[seam_ids]]), np.concatenate([phi, phi[seam_ids]])
    lip_side = np.zeros(len(verts))
    lip_side[seam_ids], lip_side[copies] = 1, -1
    a_mouth = rings_a[mouth_ring]

    # Lower-face weight: 1 below the seam, 0 above; sharp along the cut, blending over ~2 cm on the cheeks.
    below_m = (a - a_mouth) * np.linalg.norm(verts, axis=1)
    blend = 1e-4 + 0.02 * smoothstep((abs(phi) - MOUTH_HALF_WIDTH) / 0.5)
    lower = smoothstep(0.5 + below_m / (2 * blend))
    lower[lip_side == 1], lower[lip_side == -1] = 0.0, 1.0
    front = 1 - smoothstep((abs(phi) - 1.1) / 0.6)
    return HeadSurface(verts, faces, normals, a, phi, rings_a, lon_phi, mouth_ring, a_mouth, lower, below_m, front)


def _joint_regressor(verts):
    """(5, V): each joint the mean of a few surface vertices around it."""
    def nearest(points):
        return [int(np.argmin(((verts - p) ** 2).sum(1))) for p in points]
    def surface(a0, phi0):
        d0 = np.array([math.sin(a0) * math.sin(phi0), math.cos(a0), math.sin(a0) * math.cos(phi0)])
        return d0 * (_radius(d0[None])[0] + _relief(a0, phi0))
    rim = lambda s: [surface(EYE_A + da, s * EYE_PHI + dp) for da, dp in ((-0.06, 0), (0.06, 0), (0, -0.12), (0, 0.12))]
    joint_sets = [nearest([(0.03, NECK_BOTTOM, NECK_Z), (-0.03, NECK_BOTTOM, NECK_Z),                  # root
                           (0, NECK_BOTTOM, NECK_Z + 0.03), (0, NECK_BOTTOM, NECK_Z - 0.03)]),
                  nearest([(NECK_RADIUS, -0.11, NECK_Z), (-NECK_RADIUS, -0.11, NECK_Z)]),          # neck
                  nearest([JAW_PIVOT, JAW_PIVOT * [-1, 1, 1]]), nearest(rim(1)), nearest(rim(-1))]  # jaw, eyes
    J_regressor = np.zeros((N_JOINTS, len(verts)))
    for j, ids in enumerate(joint_sets):
        np.add.at(J_regressor[j], ids, 1.0 / len(ids))
    return J_regressor


def _blendshapes(h, jaw, rng):
    """shapedirs (V, 3, N_SHAPE + N_EXPR), metres per unit coefficient: the shape blendshapes, then the expression
    ones (those that differ across the lips' seam vanish at the mouth corners)."""
    x, y, z = h.verts.T
    side_x = np.sign(x)
    g = lambda a0, p0, sa, sp: _bump(h.a, h.phi, a0, p0, sa, sp)
    pair = lambda a0, p0, sa, sp: g(a0, p0, sa, sp) + g(a0, -p0, sa, sp)
    lower_face = smoothstep((-0.01 - y) / 0.05) * h.front
    col = lambda v: np.stack(v, 1)
    zeros, normals = np.zeros(len(h.verts)), h.normals
    shape = [
        col([0.07 * x, zeros, zeros]),
        col([zeros, 0.06 * y, zeros]),
        col([zeros, zeros, 0.06 * z]),
        normals * (0.006 * _nose(h.a, h.phi))[:, None],
        col([zeros, -0.003 * g(CHIN_A, 0, 0.08 * math.pi, 0.4), 0.004 * g(CHIN_A, 0, 0.08 * math.pi, 0.4)]),
        col([0.06 * x * lower_face, zeros, zeros]),
        col([zeros, zeros, 0.005 * g(0.25 * math.pi, 0, 0.08 * math.pi, 0.6)]),
        normals * (0.005 * pair(0.55 * math.pi, 0.6, 0.07 * math.pi, 0.25))[:, None],
        col([0.003 * side_x * pair(EYE_A, EYE_PHI, 0.05 * math.pi, 0.15), zeros, zeros]),
        col([0.003 * side_x * pair(h.a_mouth, MOUTH_HALF_WIDTH, 0.04 * math.pi, 0.12), zeros, zeros]),
        col([0.08 * x, zeros, 0.08 * (z - NECK_Z)]) * smoothstep((-0.1 - y) / 0.04)[:, None],
        col([zeros, 0.006 * g(0, 0, 0.25 * math.pi, 10.0), zeros]),
        col([zeros, 0.05 * y * lower_face, zeros]),
        normals * (0.003 * pair(BROW_A, 0.35, 0.03 * math.pi, 0.3))[:, None],
        normals * (0.006 * pair(0.45 * math.pi, math.pi / 2, 0.06 * math.pi, 0.1))[:, None],
    ]
    for k in range(len(shape), N_SHAPE):
        waves = rng.normal(size=(3, 3)) * 20.0                                   # rad/m: wavelengths ~10-30 cm
        field = sum(np.cos(h.verts @ w + rng.uniform(0, 2 * math.pi)) for w in waves) / 3
        shape.append(normals * (0.003 / (1 + (k - 15) / 15) * field)[:, None])
    lower, a_mouth = h.lower, h.a_mouth
    corner = lambda s: g(a_mouth, s * MOUTH_HALF_WIDTH, 0.05 * math.pi, 0.1)
    corners = corner(1) + corner(-1)
    in_mouth = np.cos(np.clip(h.phi / (MOUTH_HALF_WIDTH + 0.05), -1, 1) * math.pi / 2) ** 2
    upper_lip = (1 - lower) * in_mouth * np.exp(-0.5 * (np.maximum(-h.below_m, 0) / 0.008) ** 2)
    lower_lip = lower * in_mouth * np.exp(-0.5 * (np.maximum(h.below_m, 0) / 0.012) ** 2)
    chin_down = lower * h.front * g(0.7 * math.pi, 0, 0.12 * math.pi, 0.5)
    brows = pair(BROW_A, 0.35, 0.05 * math.pi, 0.25)
    inner_brows = pair(BROW_A + 0.02 * math.pi, 0.15, 0.03 * math.pi, 0.12)
    lids = pair(EYE_A + 0.01 * math.pi, EYE_PHI, 0.025 * math.pi, 0.12)
    mouth_area = in_mouth * g(a_mouth, 0, 0.08, 10.0)
    nose_root = g(0.45 * math.pi, 0, 0.04 * math.pi, 0.15)
    expr = [
        col([zeros, -0.006 * lower_lip - 0.004 * chin_down + 0.0015 * upper_lip, zeros]),
        col([0.002 * side_x * corners, 0.004 * corners, -0.001 * corners]),
        col([zeros, -0.004 * corners, zeros]),
        col([-0.05 * x * mouth_area, zeros, 0.005 * mouth_area]),
        col([zeros, 0.004 * upper_lip, 0.001 * upper_lip]),
        col([zeros, -0.004 * lower_lip, 0.001 * lower_lip]),
        col([zeros, 0.003 * brows, zeros]),
        col([-0.003 * side_x * inner_brows, -0.003 * inner_brows, zeros]),
        h.normals * (0.006 * pair(0.58 * math.pi, 0.55, 0.06 * math.pi, 0.2))[:, None],
        col([0.004 * side_x * corners, zeros, -0.001 * corners]),
        col([0.002 * corner(1), 0.004 * corner(1), zeros]),
        col([-0.002 * corner(-1), 0.004 * corner(-1), zeros]),
        col([zeros, 0.002 * lids, zeros]),
        col([zeros, 0.003 * nose_root, -0.001 * nose_root]),
        col([0.003 * jaw, zeros, zeros]),
        col([zeros, 0.003 * upper_lip - 0.004 * lower_lip, 0.003 * (upper_lip + lower_lip)]),
    ]
    for k in range(len(expr), N_EXPR):
        centre = (rng.uniform(0.3, 0.8) * math.pi, rng.uniform(-0.9, 0.9))
        width = rng.uniform(0.15, 0.3)
        direction = rng.normal(size=3) * 0.002 / (1 + (k - 16) / 20)
        expr.append(g(centre[0], centre[1], width, width)[:, None] * direction)
    return np.stack(shape + expr, 2)


def stand_in_flame(seed=0, dtype=torch.float32):
    """The stand-in head as a flame.Flame (what every command uses when no FLAME file is given)."""
    head = procedural_head(seed)
    return Flame(head, N_SHAPE, N_EXPR, N_SHAPE, (head['lmk_faces_idx'], head['lmk_bary_coords']),
                 head['masks'], f'procedural head (seed {seed})', dtype)


# ----------------------------------------------------------------------------- the generated data set

VOWELS = ("a", "e", "i", "o", "u")
FORMANTS = np.array([[800, 1200, 2600], [450, 2000, 2700], [300, 2300, 3000],   # a, e, i: F1, F2, F3 in Hz
                     [500, 850, 2500], [320, 750, 2400]])                         # o, u
BANDWIDTHS = np.array([80, 100, 150])             # Hz, per formant
OPENNESS = np.array([1.0, 0.75, 0.55, 0.8, 0.6])  # jaw opening per vowel, times 0.3 rad at full voice
JAW_OPEN = 0.3                                    # rad
MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])          # semitones of the scale degrees
PROGRESSION = ((0, 4, 7), (7, 11, 14), (9, 12, 16), (5, 9, 12))   # I V vi IV, semitones above the key
VIBRATO_DEPTH, NOD_SIGMA = 0.3, 0.07              # semitones; s, width of the nod at each beat
BREATH, VOICE_GAIN = 0.03, 0.25                   # noise share of the glottal source; voice RMS at full envelope
CONTROL_RATE = 1000                               # Hz, rate of the envelope / note / vowel controls
ATTACK, RELEASE = 0.04, 0.06                      # s, syllable envelope ramps
LEVEL_WINDOW, HISS = 0.025, 0.15                  # s, window of the voice's level normalisation; onset noise burst
MOUTH_DIMS = [0, 1, 3, 9, 15]                     # procedural head's expressions: open, smile, pucker, stretch, funnel
VOWEL_MOUTH = np.array([[1.2, 0.0, 0.0, 0.3, 0.0],   # a: wide open
                        [0.5, 0.3, 0.0, 1.0, 0.0],   # e: spread
                        [0.2, 0.6, 0.0, 1.5, 0.0],   # i: spread wide, a little smile
                        [0.6, 0.0, 1.0, 0.0, 0.8],   # o: rounded
                        [0.2, 0.0, 1.6, 0.0, 1.2]])  # u: rounded, pursed
BROW_DIM = 6                                      # procedural head's expression that raises the brows
VOICED = 0.1                                      # envelope above which a frame counts as sung
NOISE_EXPRESSION, NOISE_HEAD, NOISE_JAW = 0.03, 0.005, 0.003   # std of the smooth motion noise (-, rad, rad)


@dataclass
class Person:
    name: str
    shape: np.ndarray          # (100,)
    cam: np.ndarray            # (3,) scale, tx, ty
    register: int              # MIDI number of the lowest note of the person's songs' keys
    vibrato_rate: float        # Hz
    jaw_gain: float
    mouth_gain: float
    brow_gain: float
    nod_gain: float            # rad
    expression_offset: np.ndarray   # (50,)
    pose_offset: np.ndarray         # (9,)
    skin: np.ndarray           # (3,) RGB of a fully lit surface
    background: np.ndarray     # (3,) RGB
    looks: dict                # the filmed appearance: lips, hair, iris, clothing, accent RGB, a pattern seed


def make_person(index, seed):
    """Person id<index>: shape, camera, voice and motion style, colours; depends only on (seed, index)."""
    rng = np.random.default_rng([seed, index, 0])
    shape = np.pad(rng.normal(0, 1, 10), (0, N_SHAPE - 10))
    cam = np.array(DEFAULT_CAM, dtype=np.float64)
    cam[0] *= 1 + rng.uniform(-0.06, 0.06)
    cam[1:] += rng.uniform(-0.01, 0.01, 2)                     # metres, before scaling
    expression_offset = np.pad(rng.normal(0, 0.1, 10), (0, N_EXPR - 10))
    pose_offset = np.pad(rng.normal(0, 0.03, 6), (0, N_POSE - 6))
    looks = np.random.default_rng([seed, index, 0, 1])         # its own stream: the voice and motion stay
    hair = looks.choice([(40, 28, 22), (70, 45, 30), (20, 18, 18), (120, 85, 50)]) * looks.uniform(0.85, 1.15)
    iris = looks.choice([(85, 55, 35), (60, 90, 120), (80, 100, 60), (50, 35, 25)]) * looks.uniform(0.9, 1.1)
    return Person(name=f"id{index}", shape=shape, cam=cam, register=int(rng.integers(50, 62)),
                  vibrato_rate=rng.uniform(5.0, 6.0), jaw_gain=rng.uniform(0.8, 1.2), mouth_gain=rng.uniform(0.8, 1.2),
                  brow_gain=rng.uniform(0.6, 1.0), nod_gain=rng.uniform(0.05, 0.09), pose_offset=pose_offset,
                  expression_offset=expression_offset, skin=rng.uniform([170, 120, 100], [240, 190, 170]),
                  background=rng.uniform(20, 90, 3),
                  looks=dict(lips=looks.uniform([150, 60, 70], [200, 95, 100]), hair=hair, iris=iris,
                             clothing=looks.uniform(30, 200, 3), accent=looks.uniform(60, 200, 3),
                             pattern=int(looks.integers(1 << 30))))


@dataclass
class Song:
    duration: float            # s
    key: int                   # MIDI number of the tonic
    beats: np.ndarray          # (K,) beat times, s
    kick: np.ndarray           # (K,) bool: kick (beats 1, 3) or snare (beats 2, 4)
    onsets: np.ndarray         # (S,) syllable starts, s
    offsets: np.ndarray        # (S,) syllable ends (release starts), s
    notes: np.ndarray          # (S,) MIDI numbers
    vowels: np.ndarray         # (S,) indices into VOWELS
    accents: np.ndarray        # (S,) loudness 0.7-1


def compose_song(rng, duration, register):
    """A tempo, a key, a beat grid and a melody of sung syllables grouped in phrases."""
    beat = 60 / rng.uniform(90, 130)
    first = rng.uniform(0, beat)
    beats = np.arange(first, duration, beat)
    key = register + int(rng.integers(0, 5))
    onsets, offsets, notes, vowels = [], [], [], []
    t, degree = first + beat * int(rng.integers(0, 2)), int(rng.integers(0, 5))
    while t < duration - 0.2:
        for _ in range(int(rng.integers(3, 9))):
            length = beat * rng.choice([0.5, 1, 1.5, 2], p=[0.3, 0.4, 0.15, 0.15])
            degree = int(np.clip(degree + rng.integers(-2, 3), -3, 9))
            onsets.append(t)
            offsets.append(t + length - 0.06)                   # the release ends as the next syllable starts
            notes.append(key + 12 * (degree // 7) + MAJOR[degree % 7])
            vowels.append(int(rng.integers(len(VOWELS))))
            t += length
        t += beat * rng.choice([1, 2])
    keep = np.array(onsets) < duration - 0.1
    return Song(duration=duration, key=key, beats=beats, kick=np.arange(len(beats)) % 2 == 0,
                onsets=np.array(onsets)[keep], offsets=np.array(offsets)[keep], notes=np.array(notes)[keep],
                vowels=np.array(vowels)[keep], accents=rng.uniform(0.7, 1.0, int(keep.sum())))


def sing(song, person, rng):
    """Source-filter singing -> the voice (N,) float32 and its controls at CONTROL_RATE: envelope (M,) in [0, 1],
    vowel weights (5, M) summing to 1, note contour (M,) in MIDI numbers (without vibrato)."""
    from scipy.signal import lfilter   # here: slow to import, and only the built-in data needs it
    n, m = round(song.duration * SAMPLE_RATE), round(song.duration * CONTROL_RATE)
    tc = np.arange(m) / CONTROL_RATE
    envelope, vibrato = np.zeros(m), np.zeros(m)
    note_step, vowel_step = np.full(m, float(song.notes[0])), np.zeros(m, dtype=int)
    ramp = lambda x: 0.5 - 0.5 * np.cos(np.pi * np.clip(x, 0, 1))      # 0 up to x = 0, 1 from x = 1, half a cosine
    for i, (on, off) in enumerate(zip(song.onsets, song.offsets)):
        start, stop = np.searchsorted(tc, [on, off + RELEASE])
        local = tc[start:stop] - on
        shape = ramp(local / ATTACK) * ramp((off + RELEASE - tc[start:stop]) / RELEASE)
        envelope[start:stop] = np.maximum(envelope[start:stop], song.accents[i] * shape * np.exp(-0.25 * local))
        held = slice(start, np.searchsorted(tc, song.onsets[i + 1]) if i + 1 < len(song.onsets) else m)
        note_step[held], vowel_step[held] = song.notes[i], song.vowels[i]
        vibrato[start:stop] = np.clip((local - 0.15) / 0.3, 0, 1)        # fades in after 150 ms of a note
    contour = gaussian_filter1d(note_step, 0.025 * CONTROL_RATE)           # portamento between notes
    weights = gaussian_filter1d(np.eye(len(VOWELS))[vowel_step].T, 0.015 * CONTROL_RATE, axis=1)  # (5, M)

    t = np.arange(n) / SAMPLE_RATE
    midi = np.interp(t, tc, contour) + VIBRATO_DEPTH * np.interp(t, tc, vibrato) * np.sin(
        2 * np.pi * person.vibrato_rate * t + rng.uniform(0, 2 * np.pi))
    step = 440.0 * 2 ** ((midi - 69) / 12) / SAMPLE_RATE                    # cycles per sample
    phase = np.cumsum(step) % 1.0                                           # band-limited (PolyBLEP) sawtooth
    x, y = phase / step, (phase - 1) / step
    source = 2 * phase - 1 - np.where(phase < step, 2 * x - x * x - 1, 0) \
        - np.where(phase > 1 - step, y * y + 2 * y + 1, 0) + BREATH * rng.standard_normal(n)
    voice = np.zeros(n)
    for v in range(len(VOWELS)):
        y = source
        for freq, bandwidth in zip(FORMANTS[v], BANDWIDTHS):                # a two-pole resonator a formant
            r, theta = np.exp(-np.pi * bandwidth / SAMPLE_RATE), 2 * np.pi * freq / SAMPLE_RATE
            y = lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], y)
        voice += np.interp(t, tc, weights[v]) * y
    # a harmonic crossing a formant changes the loudness a lot: level-normalise so the RMS follows the envelope
    level = np.sqrt(uniform_filter1d(voice * voice, round(LEVEL_WINDOW * SAMPLE_RATE)))
    voice *= np.interp(t, tc, envelope) / np.maximum(level, 1e-9)
    burst = round(0.03 * SAMPLE_RATE)
    for on, accent in zip(np.round(song.onsets * SAMPLE_RATE).astype(int), song.accents):   # consonant hiss
        hiss = np.diff(rng.standard_normal(burst + 1)) * np.exp(-np.arange(burst) / (0.008 * SAMPLE_RATE))
        _place(voice, HISS * accent * hiss, on)
    return (VOICE_GAIN * voice).clip(-1, 1).astype(np.float32), envelope, weights, contour


def _place(track, sound, at):
    """Add sound (M,) into track (N,) starting at sample `at`, cut at the end of the track."""
    stop = min(len(track), at + len(sound))
    if at < stop:
        track[at:stop] += sound[:stop - at]


def play_music(song, rng):
    """Background music: drums on the beat grid, a plucked bass and a chord pad. Returns (N,) float32."""
    n = round(song.duration * SAMPLE_RATE)
    beat = float(np.median(np.diff(song.beats))) if len(song.beats) > 1 else 0.5
    t = np.arange(round(0.3 * SAMPLE_RATE)) / SAMPLE_RATE
    kick = np.sin(2 * np.pi * np.cumsum(50 + 90 * np.exp(-t / 0.04)) / SAMPLE_RATE) * np.exp(-t / 0.12)
    noise = np.diff(rng.standard_normal(len(t) + 1))
    snare = 0.35 * noise * np.exp(-t / 0.08) + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.05)
    hihat = 0.12 * noise * np.exp(-t / 0.015)
    drums, bass, pad = np.zeros(n), np.zeros(n), np.zeros(n)
    for k, (time_k, is_kick) in enumerate(zip(song.beats, song.kick)):
        at = round(time_k * SAMPLE_RATE)
        _place(drums, kick if is_kick else snare, at)
        _place(drums, hihat, at)
        _place(drums, hihat * 0.6, at + round(beat / 2 * SAMPLE_RATE))
        root = 440.0 * 2 ** ((song.key - 24 + PROGRESSION[k // 4 % 4][0] - 69) / 12)
        tb = np.arange(round(beat * SAMPLE_RATE)) / SAMPLE_RATE
        _place(bass, (np.sin(2 * np.pi * root * tb) + 0.3 * np.sin(4 * np.pi * root * tb)) * np.exp(-tb / 0.25), at)
    bar = 4 * beat
    starts = np.concatenate([[0.0], song.beats[::4]]) if len(song.beats) else np.array([0.0])
    for b, start in enumerate(starts):
        chord = PROGRESSION[(b - 1) % 4]
        tb = np.arange(round(bar * SAMPLE_RATE)) / SAMPLE_RATE
        shape = np.minimum(1, tb / 0.1) * np.minimum(1, (bar - tb) / 0.1)
        tone = sum(np.sin(2 * np.pi * 440.0 * 2 ** ((song.key - 12 + s - 69) / 12) * tb * h) / h
                   for s in chord for h in (1, 2, 3))
        _place(pad, tone * shape, round(start * SAMPLE_RATE))
    music = 0.55 * drums + 0.25 * bass + 0.05 * pad
    return (0.9 * music / max(1e-9, np.abs(music).max())).astype(np.float32)


def _smooth_noise(rng, n_frames, n_dims, sigma=4.0):
    """(n_frames, n_dims) Gaussian-filtered noise with unit standard deviation per dimension."""
    x = gaussian_filter1d(rng.standard_normal((n_frames + 8 * int(sigma), n_dims)), sigma, axis=0)
    x = x[4 * int(sigma):4 * int(sigma) + n_frames]
    return x / x.std(0, keepdims=True)


def song_motion(song, person, envelope, weights, contour, rng):
    """The known motion function of the module docstring: (T, 59) float32, T = duration * 30."""
    n_frames = round(song.duration * FPS)
    edges = [round(f * CONTROL_RATE / FPS) for f in range(n_frames + 1)]    # each frame's span of the controls
    frame_means = lambda x: np.stack([x[..., a:b].mean(-1) for a, b in zip(edges[:-1], edges[1:])], axis=-1)
    env, w, pitch = frame_means(envelope), frame_means(weights), frame_means(contour)      # (T,), (5, T), (T,)
    voiced = gaussian_filter1d((env > VOICED).astype(float), 2.0)
    t = (np.arange(n_frames) + 0.5) / FPS
    accents = np.where(song.kick, 1.0, 0.6)
    nod = (accents[None] * np.exp(-(t[:, None] - song.beats[None]) ** 2 / (2 * NOD_SIGMA ** 2))).sum(1)
    vowel_expression = np.zeros((len(VOWELS), N_EXPR))                    # (5, 50) at full voice
    vowel_expression[:, MOUTH_DIMS] = VOWEL_MOUTH
    motion = np.zeros((n_frames, MOTION_DIM))
    motion[:, :N_EXPR] = person.mouth_gain * env[:, None] * (w.T @ vowel_expression)
    motion[:, BROW_DIM] += person.brow_gain * (pitch - 60) / 12 * voiced
    motion[:, N_EXPR] = person.nod_gain * nod                               # global x: nod down
    motion[:, N_EXPR + 3] = 0.5 * person.nod_gain * nod                     # neck x
    motion[:, N_EXPR + 6] = person.jaw_gain * JAW_OPEN * env * (OPENNESS @ w)   # jaw x: open
    motion[:, :N_EXPR] += person.expression_offset
    motion[:, N_EXPR:] += person.pose_offset
    motion[:, :10] += NOISE_EXPRESSION * _smooth_noise(rng, n_frames, 10)
    motion[:, N_EXPR:N_EXPR + 6] += NOISE_HEAD * _smooth_noise(rng, n_frames, 6)
    motion[:, N_EXPR + 6] += NOISE_JAW * _smooth_noise(rng, n_frames, 1)[:, 0]
    return motion.astype(np.float32)


# ----------------------------------------------------------------------------- the filmed person
# The procedural head made up, dressed and lit like a portrait recording: a texture on its (polar angle, azimuth)
# chart (skin, lips, eyes, brows, hair); extra vertices of the same FLAME-format model, skinned to its joints so
# they move with it (hair shell, teeth, tongue, mouth cavity, clothed shoulders); key and fill light, a backdrop,
# a slight blur. The renderer's depth input stays the bare head's: it learns how this person looks for each depth.

PARTS = ("background", "skin", "lips", "eye", "brow", "hair", "teeth", "tongue", "mouth", "clothing")
PART = {name: code for code, name in enumerate(PARTS)}
CHART_ROWS, CHART_COLS = 384, 768     # texels of the head's texture over polar angle [0, pi] x azimuth [-pi, pi]
HAIR_THICKNESS = 0.012                # m, the hair shell's height over the scalp
KEY, FILL, AMBIENT = 0.72, 0.30, 0.26    # shares of a fully lit surface of the key and fill light (render.py's)
SHININESS, GLOSS = 24.0, 0.10         # Blinn-Phong highlight of skin, lips, eyes and teeth (share of white)
OCCLUSION = {"tongue": 0.60, "mouth": 0.45}                         # light reaching into the mouth
FILM_BATCH = 16                       # frames filmed at once


def _noise(points, rng, wavelength, n=12):
    """Smooth random field of unit-ish amplitude on points (..., 3) metres: n plane waves of about the wavelength,
    spread in length and direction (no lattice)."""
    k = rng.normal(size=(n, 3))
    k *= 2 * np.pi / (wavelength * rng.uniform(0.6, 1.5, (n, 1))) / np.linalg.norm(k, axis=1, keepdims=True)
    phase = (points.astype(np.float32) @ k.T.astype(np.float32) + rng.uniform(0, 2 * np.pi, n).astype(np.float32))
    return np.cos(phase).sum(-1) * np.sqrt(2 / n)


def _chart_texture(person):
    """The head's texture: colour (CHART_ROWS, CHART_COLS, 3) float RGB and part codes (same, int)."""
    rng = np.random.default_rng(person.looks["pattern"])
    looks = person.looks
    a, phi = np.meshgrid((np.arange(CHART_ROWS) + 0.5) / CHART_ROWS * np.pi,
                         (np.arange(CHART_COLS) + 0.5) / CHART_COLS * 2 * np.pi - np.pi, indexing="ij")
    point = 0.1 * np.stack([np.sin(a) * np.sin(phi), np.cos(a), np.sin(a) * np.cos(phi)], -1)   # ~ on the head, m
    bump = lambda a0, p0, sa, sp: np.exp(-0.5 * ((a - a0) / sa) ** 2 - 0.5 * ((abs(phi) - p0) / sp) ** 2)
    tone = 1 + 0.05 * _noise(point, rng, 0.05) + 0.025 * _noise(point, rng, 0.008)
    colour = person.skin * tone[..., None]
    flush = bump(0.53 * np.pi, 0.55, 0.06, 0.2) + 0.6 * bump(0.53 * np.pi, 0.0, 0.03, 0.06) \
        + 0.8 * bump(0.45 * np.pi, np.pi / 2, 0.08, 0.15)                                # cheeks, nose tip, ears
    colour += np.array([22.0, -6, -6]) * flush[..., None]
    colour *= 1 - 0.10 * bump(EYE_A + 0.09, EYE_PHI, 0.04, 0.12)[..., None]              # under the eyes
    part = np.full(a.shape, PART["skin"])

    def paint(weight, rgb, name):
        nonlocal colour
        colour = colour * (1 - weight[..., None]) + weight[..., None] * rgb
        part[weight > 0.5] = PART[name]

    # lips: the upper one with a bow, the lower one fuller, both tapering to the corners of the mouth
    across = np.clip(phi / (MOUTH_HALF_WIDTH + 0.01), -1, 1)
    height = np.where(a < MOUTH_A, 0.068 - 0.012 * np.exp(-0.5 * (phi / 0.04) ** 2), 0.085) * (1 - across ** 2) ** 0.6
    lips = smoothstep((height - abs(a - MOUTH_A)) / 0.012) * (abs(phi) < MOUTH_HALF_WIDTH + 0.01)
    paint(lips, looks["lips"] * (1 + 0.04 * _noise(point, rng, 0.003))[..., None], "lips")
    nostril = np.exp(-0.5 * ((a - 0.548 * np.pi) / 0.012) ** 2 - 0.5 * ((abs(phi) - 0.055) / 0.028) ** 2)
    colour *= 1 - 0.55 * nostril[..., None]
    # brows: arcs above the eyes, thinning outward
    t = (abs(phi) - 0.10) / 0.56
    centre = BROW_A + 0.012 - 0.025 * np.pi * np.sin(np.pi * np.clip(t, 0, 1) * 0.9)
    brow = smoothstep((0.022 * (1 - 0.6 * np.clip(t, 0, 1)) - abs(a - centre)) / 0.006) * (t > 0) * (t < 1)
    strands = 0.85 + 0.3 * np.cos(260 * phi + 40 * a + 2 * _noise(point, rng, 0.01))
    paint(brow, looks["hair"] * strands[..., None], "brow")
    # eyes: an almond of sclera, an iris with streaks, the pupil, a catch light; a dark lash line above
    for side in (-1, 1):
        dphi = phi - side * EYE_PHI
        almond = (dphi / 0.13) ** 2 + ((a - EYE_A) / (0.021 * np.pi)) ** 2
        r = np.hypot(dphi * np.sin(a), a - EYE_A)
        eye = np.clip(1.0 - almond, 0, None) * 8
        iris = looks["iris"] * (1 + 0.18 * np.cos(np.arctan2(a - EYE_A, dphi) * 23))[..., None] \
            * (1 - 0.5 * smoothstep((r - 0.036) / 0.01))[..., None]
        sclera = np.array([232.0, 226, 220]) * (1 - 0.15 * almond)[..., None]
        look = np.where((r < 0.045)[..., None], iris, sclera)
        look = np.where((r < 0.017)[..., None], np.array([14.0, 12, 12]), look)
        look = np.where((np.hypot(dphi * np.sin(a) + 0.012, a - EYE_A + 0.012) < 0.007)[..., None],
                        np.array([245.0, 245, 245]), look)
        paint(np.clip(eye, 0, 1), look, "eye")
        lash = smoothstep((1.6 - almond) / 0.3) * (almond >= 1) * (a < EYE_A)
        colour *= 1 - 0.75 * lash[..., None]
    # hair: above a hairline that runs from the forehead over the ears to the nape, with strands and a sheen
    hair = smoothstep((_hairline(a, phi) - a) / 0.03)
    strands = 0.7 + 0.3 * np.cos(180 * phi + 6 * np.sin(9 * a) + 3 * _noise(point, rng, 0.02)) \
        + 0.35 * np.exp(-0.5 * ((a - 0.17 * np.pi) / 0.12) ** 2)
    paint(hair, looks["hair"] * strands[..., None], "hair")
    return colour.astype(np.float32), part


def _hairline(a, phi):
    """Polar angle of the hairline at azimuth phi: high on the forehead, over the ears, low at the nape."""
    return 0.2 * np.pi + 0.42 * np.pi * smoothstep((abs(phi) - 0.45) / 2.3) + 0.02 * np.sin(7 * phi)


def _grid_faces(rows, cols):
    """Triangles of a rows x cols vertex grid numbered row-major, all wound the same way."""
    i, j = np.meshgrid(np.arange(rows - 1), np.arange(cols - 1), indexing="ij")
    a = i * cols + j
    quads = np.stack([np.stack([a, a + cols, a + 1], -1), np.stack([a + 1, a + cols, a + cols + 1], -1)], 2)
    return quads.reshape(-1, 3)


def _teeth(upper):
    """One row of teeth on an arch behind the lips (rest pose, m): verts (n, 3), colours (n, 3), faces."""
    t, height = np.linspace(-1.2, 1.2, 49), np.linspace(0, 1, 3)
    shrink = 1.0 if upper else 0.93                                     # the lower arch sits inside the upper
    x = 0.0245 * shrink * np.sin(t)
    z = 0.0625 + 0.0265 * shrink * np.cos(t) - (0 if upper else 0.0015)
    arc = 0.0255 * t                                                    # ~ m along the arch from the middle
    gap = np.cos(np.pi * arc / 0.0075) ** 16                            # 7.5 mm teeth, dark where they meet
    edge = -0.049 + 0.0008 * gap if upper else -0.0495 - 0.0008 * gap   # the biting edge, scalloped
    root = -0.035 if upper else -0.057
    y = edge[None] + (root - edge)[None] * height[:, None]
    verts = np.stack([np.broadcast_to(x, y.shape), y, np.broadcast_to(z, y.shape)], -1).reshape(-1, 3)
    shade = (1 - 0.45 * gap) * (1 - 0.35 * abs(t) / 1.2)                # gaps and the back teeth darker
    colours = np.broadcast_to((np.array([236.0, 230, 212]) * shade[:, None])[None], (3, len(t), 3)).reshape(-1, 3)
    return verts, colours, _grid_faces(3, len(t))


def _tongue():
    """The tongue, a dome on the floor of the mouth behind the lower teeth (rest pose, m)."""
    u, v = np.meshgrid(np.linspace(-1, 1, 15), np.linspace(0, 1, 12), indexing="ij")
    x, z = 0.019 * u, 0.082 - 0.045 * v
    y = -0.0535 + 0.010 * np.sin(np.pi * np.clip(v * 1.3, 0, 1)) ** 0.7 * np.sqrt(1 - u ** 2 + 1e-9)
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    colours = (np.array([180.0, 82, 88]) * (1 - 0.25 * np.exp(-0.5 * (u / 0.15) ** 2))[..., None]).reshape(-1, 3)
    return verts, colours, _grid_faces(*u.shape)


def _mouth_cavity():
    """The dark back of the mouth, a curved wall behind teeth and tongue (rest pose, m); its jaw share (n,)."""
    u, v = np.meshgrid(np.linspace(-1, 1, 11), np.linspace(0, 1, 13), indexing="ij")
    x, y = 0.036 * u, -0.028 - 0.052 * v
    z = 0.045 - 0.02 * u ** 2 - 0.015 * (2 * v - 1) ** 2
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    colours = (np.array([48.0, 16, 18]) * (0.6 + 0.4 * np.abs(u))[..., None]).reshape(-1, 3)
    return verts, colours, _grid_faces(*u.shape), smoothstep(0.5 + (-0.046 - y) / 0.016).reshape(-1)


def _torso(person):
    """Shoulders and chest in clothing, below and behind the neck (rest pose, m): a sheet facing the camera."""
    rng = np.random.default_rng(person.looks["pattern"] + 1)
    u, v = np.meshgrid(np.linspace(-1, 1, 33), np.linspace(0, 1, 13), indexing="ij")
    x = 0.24 * u
    top = -0.115 - 0.3 * np.maximum(abs(x) - 0.04, 0)
    y = top - (0.35 + top) * v ** 1.5
    z = -0.03 + 0.07 * smoothstep((top - y) / 0.08) - 0.05 * u ** 2
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    weave = 1 + 0.07 * np.sign(np.sin(2 * np.pi * x / 0.03)) + 0.06 * _noise(verts.reshape(u.shape + (3,)), rng, 0.08)
    colours = (person.looks["clothing"] * weave[..., None]).reshape(-1, 3)
    return verts, colours, _grid_faces(*u.shape)


@dataclass
class FilmedBody:
    """The filmed person's geometry: a FLAME-format model (head first, then the extras) and what paints it."""
    model: Flame               # from_motion gives (..., V_all, 3); its first V_head vertices are the head's
    faces: torch.Tensor        # (F_all, 3) long: the faces filmed (the head's that can face the camera, the rest)
    paint: torch.Tensor        # (V_all, 3): rest position (m) for chart-textured vertices, RGB for the others
    material: torch.Tensor     # (F_all,) long: -1 chart-textured, else a PART code, per filmed face
    chart: torch.Tensor        # (1, 3, CHART_ROWS, CHART_COLS) colour of the head's texture
    chart_part: torch.Tensor   # (1, 1, CHART_ROWS, CHART_COLS) its part codes (float, for sampling)
    backdrop: torch.Tensor     # (size, size, 3) RGB
    occlusion: torch.Tensor    # (len(PARTS),) light reaching each part
    glossy: torch.Tensor       # (len(PARTS),) 1 where a part has a highlight


def filmed_body(person, size):
    """The filmed person's model, texture and backdrop (deterministic from the person)."""
    head = procedural_head()
    verts, faces, n_head = head["v_template"], head["f"], len(head["v_template"])
    normals = vertex_normals(torch.from_numpy(verts), torch.from_numpy(faces)).numpy()
    a = np.arccos(np.clip(verts[:, 1] / np.linalg.norm(verts, axis=1), -1, 1))
    phi = np.arctan2(verts[:, 0], verts[:, 2])
    covered = a < _hairline(a, phi) + 0.02
    shell = np.nonzero(covered)[0]                                     # scalp vertices the hair shell copies
    lift = HAIR_THICKNESS * smoothstep((_hairline(a, phi) - a) / 0.12)[shell]
    shell_faces = faces[covered[faces].all(1)]
    remap = np.full(n_head, -1)
    remap[shell] = n_head + np.arange(len(shell))

    # extras: (verts, colours, faces), weights (5,) or (n, 5) on the joints (root, neck, jaw, eyes), part
    (v, c, f, jaw), joint = _mouth_cavity(), np.eye(N_JOINTS)
    extras = [(_teeth(True), joint[1], "teeth"), (_teeth(False), joint[2], "teeth"), (_tongue(), joint[2], "tongue"),
              ((v, c, f), (1 - jaw)[:, None] * joint[1] + jaw[:, None] * joint[2], "mouth"),
              (_torso(person), joint[0], "clothing")]

    all_verts = [verts, verts[shell] + lift[:, None] * normals[shell]]
    all_faces, material = [faces, remap[shell_faces]], [np.full(len(faces) + len(shell_faces), -1)]
    shapedirs, posedirs, weights = ([head[key], head[key][shell]] for key in ("shapedirs", "posedirs", "weights"))
    paint = [verts, verts[shell]]                                     # the shell takes the scalp's texture
    first = n_head + len(shell)
    for (v, c, f), w, name in extras:
        near = np.argmin(((v[:, None] - verts[None]) ** 2).sum(-1), axis=1)
        extra_dirs = np.zeros((len(v), 3, head["shapedirs"].shape[2]))
        extra_dirs[:, :, :N_SHAPE] = head["shapedirs"][near, :, :N_SHAPE]   # the head's shape, not its expressions
        all_verts.append(v), all_faces.append(f + first), material.append(np.full(len(f), PART[name]))
        shapedirs.append(extra_dirs), posedirs.append(np.zeros((len(v),) + head["posedirs"].shape[1:]))
        weights.append(np.broadcast_to(w, (len(v), N_JOINTS))), paint.append(c)
        first += len(v)
    arrays = dict(head, v_template=np.concatenate(all_verts), f=np.concatenate(all_faces),
                  shapedirs=np.concatenate(shapedirs), posedirs=np.concatenate(posedirs),
                  weights=np.concatenate(weights),
                  J_regressor=np.pad(head["J_regressor"], ((0, 0), (0, first - n_head))))
    model = Flame(arrays, N_SHAPE, N_EXPR, N_SHAPE, (head["lmk_faces_idx"], head["lmk_bary_coords"]), head["masks"],
                  "the filmed procedural head")
    # the back of the head and of the hair never faces the camera (the head turns by a few degrees): not filmed
    all_faces, material = np.concatenate(all_faces), np.concatenate(material)
    rest = arrays["v_template"][all_faces]                                         # (F_all, 3 corners, 3)
    facing = np.cross(rest[:, 1] - rest[:, 0], rest[:, 2] - rest[:, 0])
    keep = (material >= 0) | (facing[:, 2] > -0.5 * np.linalg.norm(facing, axis=1))
    # the backdrop, a room behind the person: a lit wall with a vertical gradient, soft out-of-focus shapes, panels
    rng = np.random.default_rng(person.looks["pattern"] + 2)
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    image = person.background * (1.25 - 0.3 * y)[..., None]
    for _ in range(7):
        cx, cy, r = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.1, 0.35)
        blob = np.exp(-0.5 * ((x - cx) ** 2 + (y - cy) ** 2) / r ** 2) * rng.uniform(0.2, 0.5)
        image = image * (1 - blob[..., None]) + blob[..., None] * person.looks["accent"] * rng.uniform(0.6, 1.2)
    image *= (1 + 0.08 * smoothstep(np.sin(np.pi * 2.5 * x + rng.uniform(0, 6)) * 4 + 0.5))[..., None]   # panels
    image *= (1 - 0.25 * (x ** 2 + y ** 2) / 2)[..., None]                                            # vignette
    colour, part = _chart_texture(person)
    glossy = [float(name in ("skin", "lips", "eye", "teeth", "tongue")) for name in PARTS]
    as_tensor = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return FilmedBody(model=model, faces=torch.as_tensor(all_faces[keep]), material=torch.as_tensor(material[keep]),
                      paint=as_tensor(np.concatenate(paint)), chart=as_tensor(colour).permute(2, 0, 1)[None],
                      chart_part=as_tensor(part)[None, None], backdrop=as_tensor(image.clip(0, 255)),
                      occlusion=as_tensor([OCCLUSION.get(name, 1.0) for name in PARTS]), glossy=as_tensor(glossy))


def film(body, shape, motion, cam, size):
    """Frames of the filmed person: shape (100,), motion (B, 59), cam (B, 3) -> uint8 (B, size, size, 3) and the
    part each pixel shows, uint8 (B, size, size) codes into PARTS (before the optical blur)."""
    with torch.no_grad():
        verts = body.model.from_motion(torch.as_tensor(shape, dtype=torch.float32), torch.as_tensor(motion))
        faces = body.faces
        projected = render.project(verts, torch.as_tensor(cam, dtype=torch.float32))
        _, face_id = render.rasterize(projected, faces, size)                           # (B, H, W)
        normals = vertex_normals(verts, body.model.faces)                              # (B, V, 3) metres, +Z to camera
        values = render.interpolate(projected, faces, face_id,
                                    torch.cat([body.paint.expand(len(verts), -1, -1), normals], -1))  # (B, H, W, 6)
        paint, normal = values[..., :3], values[..., 3:]
        material = torch.where(face_id >= 0, body.material[face_id.clamp_min(0)], PART["background"])
        charted = material < 0
        # the chart: polar angle from +y, azimuth from +z toward +x, as grid_sample's [-1, 1] coordinates
        radius = paint.norm(dim=-1).clamp_min(1e-9)
        grid = torch.stack([torch.atan2(paint[..., 0], paint[..., 2]) / math.pi,
                            torch.acos((paint[..., 1] / radius).clamp(-1, 1)) / math.pi * 2 - 1], -1)
        sample = lambda image, mode: F.grid_sample(image.expand(len(verts), -1, -1, -1), grid, mode=mode,
                                                   padding_mode="border", align_corners=False)
        albedo = torch.where(charted[..., None], sample(body.chart, "bilinear").permute(0, 2, 3, 1), paint)
        part = torch.where(charted, sample(body.chart_part, "nearest")[:, 0].long(), material)
        normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        normal = torch.where(normal[..., 2:] < 0, -normal, normal)                   # two-sided: face the camera
        key, fill = (torch.tensor(d) / torch.tensor(d).norm() for d in (KEY_LIGHT, FILL_LIGHT))
        halfway = (key + torch.tensor([0.0, 0, 1])) / (key + torch.tensor([0.0, 0, 1])).norm()
        light = AMBIENT + KEY * (normal @ key).clamp_min(0) + FILL * (normal @ fill).clamp_min(0)
        highlight = GLOSS * 255 * (normal @ halfway).clamp_min(0) ** SHININESS * body.glossy[part]
        colour = albedo * (light * body.occlusion[part])[..., None] + highlight[..., None]
        image = torch.where((face_id >= 0)[..., None], colour, body.backdrop)          # (B, H, W, 3)
        for axis in (1, 2):                                                             # a lens's slight softness:
            edge = image.narrow(axis, 0, 1), image.narrow(axis, size - 1, 1)           # [1, 2, 1] / 4 on each axis
            image = 0.5 * image + 0.25 * (torch.cat([edge[0], image.narrow(axis, 0, size - 1)], axis)
                                          + torch.cat([image.narrow(axis, 1, size - 1), edge[1]], axis))
        return image.round().clamp(0, 255).to(torch.uint8).numpy(), part.to(torch.uint8).numpy()


@dataclass
class Recipe:
    """What generate_dataset makes; its defaults are the built-in data set."""
    n_people: int = 4
    clips_per_person: int = 20                # sequences a person, at least one per split
    seed: int = 0
    video_size: int = render.IMAGE_SIZE       # pixels of the portrait videos' side
    with_video: bool = True
    video_people: int = 1                     # the first people get videos ...
    video_clips: int = 8                      # ... of their val and test sequences, then their first train ones
    clip_seconds: int = CLIP_SECONDS
    clips_per_song: int = 4                   # consecutive sequences cut from one song


def generate_dataset(root, recipe=Recipe(), verbose=True):
    """Write a SingingHead-layout data set of stand-in singers into root (module docstring); returns root, a Path.
    Each person's songs become sequences (pickle, voice, music); the sequences to film are filmed after them all."""
    if recipe.clips_per_person < 3:
        raise ValueError(f"{root}: clips_per_person must be at least 3 (one per split), got {recipe.clips_per_person}")
    root = Path(root)
    for path in (flame_path, audio_path, bgm_path, video_path):
        path(root, "-").parent.mkdir(parents=True, exist_ok=True)
    splits = {split: [] for split in SPLITS}
    progress = Progress(recipe.n_people * -(-recipe.clips_per_person // recipe.clips_per_song), "song", lines=10)
    to_film = []          # (path, body, person, motion, cam): filmed after the songs, each a step of its own
    seg_frames, seg_samples = recipe.clip_seconds * FPS, recipe.clip_seconds * SAMPLE_RATE
    for p in range(recipe.n_people):
        person = make_person(p, recipe.seed)
        songs = [(s, min(recipe.clips_per_song, recipe.clips_per_person - first))
                 for s, first in enumerate(range(0, recipe.clips_per_person, recipe.clips_per_song))]
        ids = [f"{person.name}_{s}_{g}_0" for s, n_segments in songs for g in range(n_segments)]
        np.random.default_rng([recipe.seed, p, 0]).shuffle(ids)        # 15 % test, 5 % val (at least one each), train
        n_test, n_val = (max(1, round(share * len(ids))) for share in (TEST_SHARE, VAL_SHARE))
        split = dict(test=ids[:n_test], val=ids[n_test:n_test + n_val], train=ids[n_test + n_val:])
        for name, chosen in split.items():
            splits[name] += chosen
        held_out = split["test"] + split["val"]                     # filmed, then train sequences up to video_clips
        filming = recipe.with_video and p < recipe.video_people
        filmed = set(held_out + sorted(split["train"])[:max(0, recipe.video_clips - len(held_out))] if filming else [])
        body = filmed_body(person, recipe.video_size) if filmed else None
        for s, n_segments in songs:
            rng = np.random.default_rng([recipe.seed, p, s + 1])
            song = compose_song(rng, n_segments * recipe.clip_seconds, person.register)
            voice, envelope, weights, contour = sing(song, person, rng)
            music = play_music(song, rng)
            motion = song_motion(song, person, envelope, weights, contour, rng)
            jitter = _smooth_noise(rng, len(motion), 3, sigma=8.0) * [0.005 * person.cam[0], 0.001, 0.001]
            cam = (person.cam + jitter).astype(np.float32)                               # (T, 3)
            for g in range(n_segments):
                seq = f"{person.name}_{s}_{g}_0"
                frames = slice(g * seg_frames, (g + 1) * seg_frames)
                samples = slice(g * seg_samples, (g + 1) * seg_samples)
                write_flame_pickle(flame_path(root, seq), motion[frames], person.shape, cam[frames])
                write_wav(audio_path(root, seq), voice[samples], SAMPLE_RATE)
                write_wav(bgm_path(root, seq), music[samples], SAMPLE_RATE)
                if seq in filmed:
                    to_film.append((video_path(root, seq), body, person, motion[frames], cam[frames]))
            if progress.advance() and verbose:
                print(f"  {progress.line('built')} (person {person.name})", flush=True)
    # filming a clip costs a hundred times a song's sound and motion: counted apart, so each ETA holds
    filming_progress = Progress(len(to_film), "video", lines=10)
    for path, body, person, motion, cam in to_film:
        frames = [film(body, person.shape, motion[lo:lo + FILM_BATCH], cam[lo:lo + FILM_BATCH], recipe.video_size)[0]
                  for lo in range(0, len(motion), FILM_BATCH)]
        write_video(path, np.concatenate(frames))
        if filming_progress.advance() and verbose:
            print(f"  {filming_progress.line('filmed')} ({path.name})", flush=True)
    for name in SPLITS:
        split_path(root, name).write_text("".join(f"{seq}\n" for seq in sorted(splits[name])))
    generator_path(root).write_text(json.dumps(dict(version=BUILTIN_VERSION, **asdict(recipe)), indent=1))
    return root


def generator_path(root):
    """The marker generate_dataset writes: its parameters and BUILTIN_VERSION."""
    return Path(root) / "generator.json"


def is_current(root):
    """Whether root holds a data set of this generator version."""
    marker = generator_path(root)
    return marker.is_file() and json.loads(marker.read_text()).get("version") == BUILTIN_VERSION


def is_generated(root):
    """True for a data set generate_dataset wrote (its generator.json marks it): the procedural head is its FLAME."""
    return generator_path(root).is_file()


def require_head(root, flame, procedural_head=False):
    """Refuse a data set of real FLAME parameters (any set generate_dataset did not write) without a FLAME file:
    the stand-in head would turn its motion into meshes silently wrong. procedural_head asks for it anyway."""
    if flame is None and not procedural_head and not is_generated(root):
        raise ValueError(f"{root}: not a data set of builtin.py's generator, so its motion is real FLAME parameters "
                         f"and needs the real FLAME: get {FLAME_SOURCE} and pass --flame PATH/generic_model.pkl "
                         f"(or --procedural-head to use the stand-in head anyway)")


def builtin_data(root=None):
    """Path of the built-in data set (default data/builtin beside this file), generated on first use."""
    root = Path(root) if root is not None else BUILTIN_ROOT
    if is_current(root):
        return root
    print(f"building the built-in SingingHead-format data set in {root} (once; about a minute)", flush=True)
    started = time.time()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate_dataset(tmp)
    if is_current(root):                        # another process finished first
        shutil.rmtree(tmp)
        return root
    if root.exists():                            # an older generator's set: move it aside, then drop it
        old = root.parent / f".{root.name}.old{os.getpid()}"
        os.replace(root, old)
        shutil.rmtree(old)
    os.replace(tmp, root)
    print(f"built-in data set ready in {time.time() - started:.0f} s: {root}", flush=True)
    return root


# ----------------------------------------------------------------------------- SingingHead's size, linked

SINGINGHEAD_SPLITS = dict(train=9_757, val=610, test=1_829)   # the release's 12 196 sequences of 8 s, per split
SINGINGHEAD_PEOPLE = 76                                      # singers in the release


def linked_dataset(source, root, n_sequences=sum(SINGINGHEAD_SPLITS.values()), people=SINGINGHEAD_PEOPLE, video=None):
    """A SingingHead-layout folder (returned) of n_sequences sequences split in the release's proportions, ids
    id<k % people>_<k // people>_0_0, whose files link (hard, else symbolic) to the sequences of the data set at
    `source` in turn: the real data set's layout and size at no cost in disk, for measuring memory and start-up.
    It has source's generator.json (the stand-in head is its head). video: an mp4 linked to every id0 sequence."""
    source, root = Path(source), Path(root)
    sources = sorted(p.stem for p in (source / "flame_seqs").glob("*.pkl"))
    ids = [f"id{k % people}_{k // people}_0_0" for k in range(n_sequences)]
    n_train, n_test = (round(n_sequences * SINGINGHEAD_SPLITS[name] / sum(SINGINGHEAD_SPLITS.values()))
                       for name in ("train", "test"))
    for folder in ("flame_seqs", "audio_seqs", "bgm_seqs", "video_seqs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for k, seq in enumerate(ids):
        was = sources[k % len(sources)]
        pairs = [(path(source, was), path(root, seq)) for path in (flame_path, audio_path, bgm_path)]
        pairs += [(Path(video), video_path(root, seq))] if video is not None and seq.startswith("id0_") else []
        for src, dst in pairs:
            try:
                os.link(src, dst)
            except OSError:
                os.symlink(Path(src).resolve(), dst)
    for name, chosen in (("train", ids[:n_train]), ("val", ids[n_train:n_sequences - n_test]),
                         ("test", ids[n_sequences - n_test:])):
        split_path(root, name).write_text("".join(f"{seq}\n" for seq in chosen))
    shutil.copyfile(generator_path(source), generator_path(root))
    return root


def test_pattern_video(path, size, seconds, fps=FPS):
    """An mp4 of ffmpeg's test pattern (testsrc2), size² pixels, `seconds` long at fps: for timing video reading."""
    import imageio_ffmpeg
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={size}x{size}:rate={fps}:duration={seconds}", "-pix_fmt", "yuv420p",
                    "-c:v", "libx264", "-preset", "ultrafast", str(path)], check=True)
    return Path(path)


# ----------------------------------------------------------------------------- which head a checkpoint needs

STAND_IN = 'procedural'           # what a checkpoint records when it was trained on the stand-in head
FLAME_SOURCE = 'FLAME 2020 generic_model.pkl from flame.is.tue.mpg.de'


def flame_record(path=None):
    """What a checkpoint keeps of its head: {'flame': the file's path or 'procedural', 'flame_sha256': hex or None}."""
    if path is None:
        return dict(flame=STAND_IN, flame_sha256=None)
    return dict(flame=str(path), flame_sha256=file_sha256(path))


def resolve_flame(record, given, owner):
    """The FLAME file (None: the procedural head) for a checkpoint `owner` trained with `record` (flame_record's):
    `given` when it is that very file (same sha256), else the recorded one. Refuses a different file, a FLAME
    file for a procedural-head checkpoint, and a recorded file that is gone."""
    trained, digest = record.get('flame') or STAND_IN, record.get('flame_sha256')
    if trained == STAND_IN:
        if given is not None:
            raise ValueError(f"{given}: {owner} was trained on the procedural stand-in head, not on a FLAME file; "
                             f"drop --flame or use a checkpoint trained with this file")
        return None
    path = Path(given if given is not None else trained)
    if not path.is_file():
        raise ValueError(f"{path}: {owner} was trained with this FLAME file (sha256 {digest}), which is not there; "
                         f"pass the same file with --flame")
    if digest is not None and file_sha256(path) != digest:
        raise ValueError(f"{path}: not the FLAME file {owner} was trained with ({trained}, sha256 {digest}); "
                         f"pass that file with --flame")
    return path


def load_flame(path=None):
    """The real FLAME when a path is given, else the stand-in head."""
    return Flame.load(path) if path else stand_in_flame()


if __name__ == "__main__":
    data_root = Path(sys.argv[1]) if len(sys.argv) > 1 else builtin_data()
    for name in SPLITS:
        clips = SingingHead(data_root, name)
        print(f"{name}: {len(clips)} clips of {clips.clip_frames} frames, people {', '.join(clips.people)}")
