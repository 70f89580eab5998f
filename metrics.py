"""Evaluation metrics of UniSinger: the paper's Table II (3-D motion) and Table IV (2-D video), one command each.

Table II follows the SingingHead release's metric code: its `metric_dict` (lve_mean, lve_min, ve_mean, ve_min,
fdd, meandist_pose, ba_pose, diversity_lmk) per clip, then the mean over clips (PAPER_COLUMNS: in the paper's
units; VARIANT_COLUMNS: ours), on RegionMeshes (the release's meshes, head pose zeroed, in metres): lve, fve,
fdd, ppe (head pose error), motion_beats / music_beats / beat_align (BA), diversity.
Table IV, on frames (N, H, W, C): psnr, ssim (equal to scikit-image's), cpbd (sharpness), lmd (F-LMD / M-LMD),
fid with the FID Inception network (InceptionV3), LPIPS (AlexNet + linear heads), BA on the soundtrack.
Then the evaluation: evaluate_motion (per clip, then the mean), model_predictor (a seed per clip),
truth_and_takes (a clip's truth beside its takes, as a video), evaluate_video, mean_motion (the baseline).

Depends on torch, numpy, scipy, imageio-ffmpeg and our flame.py, audio.py, data.py, builtin.py and unisinger.py.

Use alone
    python metrics.py                           # out/motion/best.pt vs the mean-motion baseline, built-in test split
    python metrics.py --pred DIR --data PATH [--split test]          # Table II for generated motion files
    python metrics.py --video --pred DIR --data PATH [--weights DIR]  # Table IV for generated videos
    python metrics.py --pred DIR --side-by-side       # Table II, and each clip's truth | take 0 | take 1 as video
Generated motion: DIR/<clip id>/sample_<k>.npz with key 'motion' (T, 59) at 30 fps, and optionally DIR/fps.json
{"fps": frames generated per second}. Generated video: DIR/<clip id>.mp4; for LMD and 2-D BA also 68 landmarks
per frame (T, 68, 2) in pixels of the 256-pixel frame, DIR/<clip id>_lmk.npy and <data>/landmark_seqs/<id>.npy.
Missing weights or landmarks make the table entry "needs weights: <file>" / "needs landmarks: <file>".
"""
import collections
import contextlib
import json
import math
import multiprocessing
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

import data
from audio import FPS, SAMPLE_RATE, beats, load_audio
from builtin import builtin_data, load_flame, require_head, resolve_flame
from data import Parser, Progress, atomic_output, one_thread, run_command, video_path
from flame import HEAD_POSE, MM_PER_M, MOUTH_LANDMARKS, read_npz
from unisinger import (DEFAULT_CHECKPOINT, PREVIEW_BATCH, Controls, SongMix, generate, load_checkpoint,
                       write_side_by_side)

BEAT_SIGMA_FRAMES = 5.0     # Gaussian smoothing of the motion speed before picking its minima
BA_SIGMA2 = 9.0             # beat-align tolerance, frames^2
N_SAMPLES = 10              # samples per clip in Table II (the paper's n)
VIDEO_SIZES = (256, 512)    # Table IV is measured with frames resized to each of these squares
LMK_SIZE = 256              # landmark files are in pixels of the 256-pixel frame
FRAME_STEP = 6              # every 6th frame enters the 2-D image metrics
SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
CPBD_BLOCK = 64             # pixels per block side
CPBD_EDGE_BLOCK = 0.002     # a block counts when more than this fraction of its pixels are edges
CPBD_JNB_LOW_CONTRAST = 5   # just-noticeable-blur width (pixels) when block contrast <= 50 grey levels
CPBD_JNB = 3                # ... otherwise
CPBD_LOW_CONTRAST = 50
CPBD_BETA = 3.6
CPBD_THRESHOLD = 0.63       # blur is "not detected" at an edge while its probability stays at or below this
CPBD_MAX_STEP = 100         # an edge side is followed at most this many pixels
CPBD_EDGE_FLOOR = 0.2       # edge-map gradient floor (grey levels per pixel, Sobel scale)


class RegionMeshes:
    """The vertices the 3-D metrics read (lips, face, upper face, landmark triangles), head pose zeroed: Flame.region's
    forward over just these, equal to the whole meshes' [..., ids, :]. ids (U,) are full-mesh vertex ids; lips,
    face, upper_face index into them; forehead_eyes indexes forehead then eye_region, concatenated as the release
    does (a vertex in both counts twice in FDD's mean). posed_landmarks: the 68 landmarks of meshes WITH head pose
    (the release's diversity), skinning only the landmark triangles' vertices. ids, when given, are the vertices
    to mesh instead (all: the release's whole meshes); they must hold the regions'."""

    def __init__(self, flame, ids=None):
        masks = flame.masks
        lmk = flame.lmk_vertex_ids                                                         # (68, 3)
        regions = torch.cat([masks["lips"], masks["face"], masks["upper_face"], lmk.reshape(-1)])
        self.ids = torch.unique(regions if ids is None else torch.as_tensor(ids))        # (U,)
        position = torch.full((flame.template.numel() // 3,), -1, dtype=torch.long, device=self.ids.device)
        position[self.ids] = torch.arange(len(self.ids), device=self.ids.device)          # full id -> region index
        self.lips, self.face, self.upper_face = (position[masks[k]] for k in ("lips", "face", "upper_face"))
        self.forehead_eyes = position[torch.cat([masks["forehead"], masks["eye_region"]])]
        self.lmk_corners, self.lmk_bary = position[lmk], flame.lmk_bary
        self.head = flame.region(self.ids)
        self.posed = flame.region(lmk.T.reshape(-1))    # the landmarks' first corners, then second, then third

    def posed_landmarks(self, shape, motion):
        """68 landmarks (...,68,3) in metres of meshes with global, neck and jaw rotation (eyes still), meshing only
        the landmark triangles' corners, corner by corner, so that each corner's rows are a slice to blend."""
        rows = self.posed.from_motion(shape, motion).transpose(-1, -2).unflatten(-1, (3, -1))  # (...,3,corner,68)
        return (rows * self.lmk_bary.T.to(rows.dtype)).sum(-2).transpose(-1, -2)

    def __call__(self, shape, motion):
        """shape (100,), motion (...,59) -> region vertices (...,U,3) in metres."""
        return self.head.from_motion(shape, motion, zero_head_pose=True)

    def landmarks(self, verts):
        """68 landmarks (...,68,3) of region vertices (...,U,3)."""
        return corner_blend(verts, self.lmk_corners, self.lmk_bary)


def corner_blend(verts, corners, bary):
    """Points (...,P,3) from vertices (...,V,3), each the bary (P,3) blend of the vertices corners (P,3). Gathered
    coordinate by coordinate: index_select along the vertices of Flame's coordinate-major (...,3,V) layout."""
    rows, bary = verts.transpose(-1, -2), bary.to(verts.dtype)                              # (...,3,V)
    points = rows.index_select(-1, corners[:, 0]) * bary[:, 0]
    for k in (1, 2):
        points += rows.index_select(-1, corners[:, k]) * bary[:, k]
    return points.transpose(-1, -2)                                                       # (...,P,3)


def vertices(verts, ids):
    """The vertices ids (P,) of verts (...,V,3): (...,P,3), gathered along the rows of Flame's coordinate-major
    (...,3,V) layout, which a gather along -2 of the (...,V,3) view would read 3 strided elements at a time."""
    return verts.transpose(-1, -2).index_select(-1, ids).transpose(-1, -2)


def squared_lengths_(x):
    """Squared L2 norms (...,V) of vectors x (...,V,3), a temporary that is squared in place; summed coordinate by
    coordinate (x² + y²) + z², each step reading whole rows of Flame's coordinate-major (...,3,V) layout."""
    sq = x.transpose(-1, -2).square_()                                                    # (...,3,V)
    return (sq[..., 0, :] + sq[..., 1, :]).add_(sq[..., 2, :])


def vertex_errors(pred, gt):
    """Per-vertex L2 errors in mm of vertices pred (...,V,3) against gt (broadcastable) -> (...,V)."""
    return squared_lengths_(pred - gt).sqrt_().mul_(MM_PER_M)


def lve(errors):
    """Lip vertex error (mm), the release's 'lve', from the lip vertices' errors (S,T,L) in mm (vertex_errors): per
    sample the largest lip-vertex error of each frame averaged over frames; (mean over samples, best sample)."""
    per_sample = errors.amax(dim=-1).mean(dim=-1)                                         # (S,)
    return per_sample.mean().item(), per_sample.min().item()


def fve(errors):
    """Face vertex error (mm), the release's 've', from the face vertices' errors (S,T,F) in mm: (mean over samples,
    frames and face vertices; the smallest error over samples of each vertex and frame, averaged), so the min
    may mix samples within a frame."""
    return errors.mean().item(), errors.amin(dim=0).mean().item()


def fdd(pred_squared, gt_squared):
    """Upper-face dynamics deviation (m^2, signed), the release's 'fdd': std_gt - std_pred, each per vertex the
    unbiased std over frames of the squared norm of its position (or, CodeTalker's variant, of its displacement
    from the neutral face), averaged over the vertices (and the samples of pred). The squared norms in m^2
    (squared_lengths_): pred (S,T,U), gt (T,U)."""
    def motion_std(squared):                                                              # (...,T,U) -> (...)
        x = squared.double()
        deviation = x - x.mean(dim=-2, keepdim=True)         # two passes: as exact as torch.std, a third the time
        return (deviation.square_().sum(dim=-2) / (x.shape[-2] - 1)).sqrt_().mean(dim=-1)

    return (motion_std(gt_squared) - motion_std(pred_squared).mean()).item()


def ppe(pred_pose, gt_pose):
    """Pose parameter error, the release's 'meandist_pose': mean over samples and frames of the L2 distance of
    the 6-d head pose (radians)."""
    return (pred_pose - gt_pose).norm(dim=-1).mean().item()


def motion_beats(x, sigma=BEAT_SIGMA_FRAMES):
    """Motion beats of points (T,P,3) or a pose (T,6) (one 6-d point): the ids of the T-1 speed frames (frame t to
    t+1; per point the L2 norm of the step, averaged over points) where the Gaussian-smoothed speed has a strict
    local minimum. Float32 stays float32, as the release computes it, so near-ties break the same way."""
    x = np.asarray(x)
    x = x.astype(np.float64) if not np.issubdtype(x.dtype, np.floating) else x
    if x.ndim not in (2, 3):
        raise ValueError(f"motion_beats: expected (T,P,3) points or (T,6) pose, got shape {x.shape}")
    points = x if x.ndim == 3 else x[:, None, :]                                         # (T,P,D)
    speed = np.sqrt(((points[1:] - points[:-1]) ** 2).sum(axis=2)).mean(axis=1)          # (T-1,)
    s = ndimage.gaussian_filter1d(speed, sigma)
    return np.flatnonzero((s[1:-1] < s[:-2]) & (s[1:-1] < s[2:])) + 1


def music_beats(audio, sr=SAMPLE_RATE, time_correct=False):
    """Beats of the audio in motion-frame units: the beat tracker's onset-frame ids (hop 512 at 16 kHz, 31.25
    a second) taken as 30 fps frames as they are (the release), or with time_correct the beat times x 30 fps."""
    frames, times = beats(np.asarray(audio, dtype=np.float32), sr)
    return np.asarray(times, dtype=np.float64) * FPS if time_correct else np.asarray(frames)


def beat_align(motion_beats, music_beats, n_speed=None, sigma2=BA_SIGMA2):
    """Beat-align score, the release's: mean over music beats of exp(-d^2/(2 sigma2)), d the distance in frames
    to the nearest motion beat. Music beats at or after n_speed (the motion's T-1 speed frames) are cut, as the
    release cuts its onsets to the speed's length; no music or motion beat counts as one beat at frame 0."""
    music = np.asarray(music_beats, dtype=np.float64)
    if n_speed is not None:
        music = music[music < n_speed]
    motion = np.asarray(motion_beats, dtype=np.float64)
    music = music if music.size else np.zeros(1)
    motion = motion if motion.size else np.zeros(1)
    d = np.abs(music[:, None] - motion[None, :]).min(axis=1)                             # (K,)
    return float(np.exp(-d ** 2 / (2 * sigma2)).mean())


def diversity(samples):
    """The release's diversity: mean over the S(S-1)/2 sample pairs of the L2 norm of the difference of the
    flattened sequences (torch pdist's mean), in the input's unit; 0 for one sample, as the release returns."""
    x = torch.as_tensor(samples).reshape(len(samples), -1).double()                      # (S, T*...)
    return torch.pdist(x).mean().item() if len(x) > 1 else 0.0


def clip_motion_scores(regions, shape, gt_motion, predictions, audio_beats):
    """Table II of one clip for each prediction: {name: {'official': the release's metric_dict (raw units), variant
    column: value}}. regions: RegionMeshes; shape (100,), gt_motion (T,59), predictions {name: samples (S,T,59)};
    audio_beats: BA column -> audio beats in motion-frame units (clip_beats), each scored against the samples' pose
    beats, averaged over samples. The truth is meshed once for every prediction."""
    shape = torch.as_tensor(shape, dtype=torch.float32)
    gt_motion = torch.as_tensor(gt_motion, dtype=torch.float32)
    upper, upper_moved = regions.forehead_eyes, regions.upper_face
    with torch.no_grad():
        gt = regions(shape, gt_motion)                                                   # (T,U,3) m
        neutral = regions(shape, torch.zeros(1, gt_motion.shape[-1]))[0]                 # (U,3) m
        gt_upper = squared_lengths_(vertices(gt, upper))                                  # (T,|upper|) m^2
        gt_moved = squared_lengths_(vertices(gt, upper_moved) - vertices(neutral, upper_moved))

        def scores(samples):
            samples = torch.as_tensor(samples, dtype=torch.float32)
            # A sample at a time, so that its (T,U,3) meshes and all that is read from them stay in the CPU's cache.
            rows = []
            for motion in samples:
                pred = regions(shape, motion)                                            # (T,U,3) m
                errors = vertex_errors(pred, gt)                                         # (T,U) mm
                rows.append((errors.index_select(-1, regions.lips), errors.index_select(-1, regions.face),
                             squared_lengths_(vertices(pred, upper)),
                             squared_lengths_(vertices(pred, upper_moved) - vertices(neutral, upper_moved)),
                             regions.landmarks(pred)))
            lips, face, pred_upper, pred_moved, landmarks = map(torch.stack, zip(*rows))   # (S,T,...)
            lve_mean, lve_min = lve(lips)
            fve_mean, fve_min = fve(face)
            pose_beats = [motion_beats(s[:, HEAD_POSE]) for s in samples.numpy()]
            ba = {k: float(np.mean([beat_align(m, b, len(gt_motion) - 1) for m in pose_beats]))
                  for k, b in audio_beats.items()}
            ba_pose = ba.pop("BA", None)                                                 # the rest are variants
            official = {"lve_mean": lve_mean / MM_PER_M, "lve_min": lve_min / MM_PER_M,
                        "ve_mean": fve_mean / MM_PER_M, "ve_min": fve_min / MM_PER_M, "fdd": fdd(pred_upper, gt_upper),
                        "meandist_pose": ppe(samples[..., HEAD_POSE], gt_motion[..., HEAD_POSE]), "ba_pose": ba_pose,
                        "diversity_lmk": diversity(regions.posed_landmarks(shape, samples))}      # (S,T,68,3) m
            return dict(ba, official=official, **{
                "FDD(disp)": fdd(pred_moved, gt_moved) * PAPER_COLUMNS["FDD(x1e-2)"][1],
                "Div(mm)": diversity(landmarks * MM_PER_M)})

        return {name: scores(samples) for name, samples in predictions.items()}


def frame_pairs(a, b):
    """Frames (H,W,C) or (N,H,W,C), a pair of them -> the two as (N,H,W,C) arrays and whether one frame came in."""
    a, b = np.asarray(a), np.asarray(b)
    single = a.ndim == 3
    return (a[None], b[None]) if single else (a, b), single


def psnr(a, b, data_range=255.0):
    """Peak signal-to-noise ratio in dB per frame: (N,H,W,C) pairs -> (N,) (a float for one frame)."""
    (a, b), single = frame_pairs(a, b)
    out = np.array([10 * math.log10(data_range ** 2 / (torch.tensor(x, dtype=torch.float64) - torch.tensor(
        y, dtype=torch.float64)).square_().mean().item()) for x, y in zip(a, b)])
    return out[0] if single else out


def ssim_frame(x, y, data_range):
    """SSIM of one frame pair (H,W,C): float64, or float32 holding integers whose moments' window sums stay below
    2^24 (8-bit frames: exact in float32, and half the memory to stream)."""
    n = SSIM_WINDOW ** 2
    moments = torch.cat([x, y, x * x, y * y, x * y], -1)                                  # (H,W,5C)

    def window_sums(t, dim):   # sums of SSIM_WINDOW consecutive entries along dim, added in place
        out = t.narrow(dim, 0, t.shape[dim] - SSIM_WINDOW + 1).clone()
        for k in range(1, SSIM_WINDOW):
            out += t.narrow(dim, k, out.shape[dim])
        return out

    # the window's mean where it lies fully inside the frame: exactly the region skimage averages
    means = window_sums(window_sums(moments, 0), 1).double() / n
    ux, uy, uxx, uyy, uxy = means.chunk(5, dim=-1)
    cov_norm = n / (n - 1)                                   # sample (unbiased) covariance inside the window
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(0, 1)).mean().item()                  # per channel, then over channels


def ssim(a, b, data_range=255.0):
    """Mean structural similarity per frame, as scikit-image computes it: (N,H,W,C) pairs -> (N,) (float for one).
    A frame at a time, so that its intermediates stay in cache."""
    (a, b), single = frame_pairs(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim: frames of {a.shape[1:3]} pixels are smaller than the {SSIM_WINDOW}-pixel window")
    exact = all(np.issubdtype(f.dtype, np.integer) and (f.size == 0 or int(np.abs(f).max()) ** 2 * SSIM_WINDOW ** 2
                                                         < 2 ** 24) for f in (a, b))
    dtype = torch.float32 if exact else torch.float64
    out = np.array([ssim_frame(torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype), data_range)
                    for x, y in zip(a, b)])
    return out[0] if single else out


def cpbd(gray):
    """Cumulative probability of blur detection of one grey frame (H,W) in grey levels 0-255; higher is sharper.
    Blocks of 64x64 pixels with enough edges contribute the blur-detection probability 1 - exp(-(w/JNB)^3.6) of
    each edge width w (JNB 5 for block contrast <= 50 grey levels, else 3); the score is the share of edges whose
    probability, rounded to a percent, stays at or below 0.63. 0 when the frame has no edge."""
    img = np.asarray(gray, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"cpbd: expected one grey frame (H,W), got shape {img.shape}")
    edges, widths = cpbd_edge_map(img), cpbd_edge_widths(img)
    probs = []
    for r in range(0, img.shape[0] - CPBD_BLOCK + 1, CPBD_BLOCK):
        for c in range(0, img.shape[1] - CPBD_BLOCK + 1, CPBD_BLOCK):
            block = (slice(r, r + CPBD_BLOCK), slice(c, c + CPBD_BLOCK))
            if np.count_nonzero(edges[block]) <= CPBD_EDGE_BLOCK * CPBD_BLOCK ** 2:
                continue
            w = widths[block][widths[block] > 0]
            contrast = int(img[block].max() - img[block].min())
            jnb = CPBD_JNB_LOW_CONTRAST if contrast <= CPBD_LOW_CONTRAST else CPBD_JNB
            probs.append(1 - np.exp(-(w / jnb) ** CPBD_BETA))
    p = np.concatenate(probs) if probs else np.empty(0)
    return float(np.mean(np.round(p * 100) <= CPBD_THRESHOLD * 100)) if p.size else 0.0


def lmd_frames(pred_lmk, gt_lmk, mouth=False):
    """Landmark distance per frame (pixels): the mean L2 distance over the points, (T,68,2) pairs -> (T,), nan where
    a set is missing. The release's centring: the 68 points on their mean, then the mouth (48-67, a view into the
    same array) on its own mean in place, so the mouth is centred on itself for M-LMD (mouth=True, points 48-67)
    AND for F-LMD (all 68: points 0-47 on the face's mean, 48-67 on the mouth's)."""
    def centred(lmk):
        x = torch.as_tensor(np.asarray(lmk, dtype=np.float64))
        x = x - x.mean(dim=-2, keepdim=True)
        mouth = x[..., MOUTH_LANDMARKS, :]
        return torch.cat([x[..., :MOUTH_LANDMARKS.start, :], mouth - mouth.mean(dim=-2, keepdim=True)], -2)

    p, g = centred(pred_lmk), centred(gt_lmk)
    if mouth:
        p, g = p[..., MOUTH_LANDMARKS, :], g[..., MOUTH_LANDMARKS, :]
    return (p - g).norm(dim=-1).mean(dim=-1).numpy()


def frechet_distance(mu1, s1, mu2, s2, eps=1e-6):
    """Frechet distance of two Gaussians: |mu1-mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2)), scipy.linalg.sqrtm of the
    product; when that is not finite (singular covariances, fewer samples than dimensions) eps is added to both
    diagonals first. A numerically imaginary part is dropped."""
    mu1, s1, mu2, s2 = (np.asarray(v, np.float64) for v in (mu1, s1, mu2, s2))
    root = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
        offset = eps * np.eye(len(s1))
        root = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))


def fid(feats_a, feats_b):
    """Frechet Inception distance of two feature sets (N,D), (M,D)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def evaluate_video(pred_dir, root, ids, weights_dir):
    """Table IV rows '<DIR> (256)' and '<DIR> (512)' for DIR/<id>.mp4 against <data>/video_seqs/<id>.mp4, as the
    release scores them: every FRAME_STEP-th frame resized to each size, PSNR / SSIM / CPBD / LPIPS / LMD pooled
    over all those frames of all videos, FID over their features, BA per video (all frames' landmarks against
    the beats of the video's own soundtrack), then averaged over videos."""
    pred_dir, root, weights_dir = Path(pred_dir), Path(root), Path(weights_dir)
    progress = Progress(len(ids), "video", lines=20)
    inception_file, alexnet_file, lpips_file = (weights_dir / f for f in (INCEPTION_FILE, ALEXNET_FILE, LPIPS_FILE))
    inception = InceptionV3.load(inception_file) if inception_file.exists() else None
    lpips_net = LPIPS.load(alexnet_file, lpips_file) if alexnet_file.exists() and lpips_file.exists() else None
    scores = {size: {k: [] for k in ("LPIPS", "SSIM", "PSNR", "CPBD", "M-LMD", "F-LMD")} for size in VIDEO_SIZES}
    feats = {size: ([], []) for size in VIDEO_SIZES}
    ba, missing = [], None
    for clip_id in ids:
        pred_file, gt_file = pred_dir / f"{clip_id}.mp4", video_path(root, clip_id)
        n = min(count_frames(pred_file), count_frames(gt_file))
        picked = sampled_frames(n)
        pred, gt = read_frames(pred_file, picked), read_frames(gt_file, picked)
        lmk_files = (pred_dir / f"{clip_id}_lmk.npy", root / "landmark_seqs" / f"{clip_id}.npy")
        absent = [f for f in lmk_files if not f.exists()]
        missing = missing or (absent[0] if absent else None)
        lp, lg = (None, None) if absent else (np.load(f)[:n] for f in lmk_files)
        for size in VIDEO_SIZES:
            p, g, row = pred[size], gt[size], scores[size]                               # (N,size,size,3) uint8
            row["SSIM"] += list(ssim(g, p))
            row["PSNR"] += list(psnr(g, p))
            row["CPBD"] += [cpbd(f) for f in pil_gray(p)]
            pt, gtt = (torch.from_numpy(v).permute(0, 3, 1, 2).float() / 255 for v in (p, g))   # [0, 1]
            with torch.no_grad():
                if inception is not None:
                    feats[size][0].append(inception(pt).numpy())
                    feats[size][1].append(inception(gtt).numpy())
                if lpips_net is not None:               # the release feeds [0, 1] to a net that expects [-1, 1]
                    row["LPIPS"] += lpips_net(pt, gtt).tolist()
            if lp is not None:
                scale = size / LMK_SIZE
                row["M-LMD"] += list(lmd_frames(lp[picked] * scale, lg[picked] * scale, mouth=True))
                row["F-LMD"] += list(lmd_frames(lp[picked] * scale, lg[picked] * scale))
        if lp is not None:
            track, audio = filled_landmarks(np.load(lmk_files[0])), read_soundtrack(pred_file)
            if audio is None:
                raise ValueError(f"{pred_file}: no audio track for the 2-D beat-align score")
            if track is not None:
                ba.append(beat_align(motion_beats(track), music_beats(audio), len(track) - 1))
        if progress.advance():
            print(progress.line("  Table IV:"), file=sys.stderr, flush=True)
    rows = {}
    for size in VIDEO_SIZES:
        # a frame without landmarks (nan) adds 0 to LMD but counts, as in the release
        row = {k: float(np.mean(np.where(np.isnan(v), 0.0, v))) if v else None for k, v in scores[size].items()}
        row["BA"] = float(np.mean(ba)) if ba else None
        row["FID"] = (fid(np.concatenate(feats[size][0]), np.concatenate(feats[size][1])) if inception is not None
                      else f"needs weights: {inception_file}")
        if lpips_net is None:
            row["LPIPS"] = f"needs weights: {alexnet_file if not alexnet_file.exists() else lpips_file}"
        if missing is not None:
            row.update(dict.fromkeys(("M-LMD", "F-LMD", "BA"), f"needs landmarks: {missing}"))
        rows[f"{pred_dir.name} ({size})"] = dict(row, clips=len(ids))
    return rows


# ------------------------------------------------------------ support: feature networks, readers, tables, command line

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_FILE = "alex.pth"
# Table II: the paper's columns, each the release's metric_dict value (m, m^2, rad) times a factor: LVE / FVE in
# mm; FDD, "x10^-2 mm" in the paper, is the m^2 value x 1000 in units of 10^-2; BA, PPE, diversity as they are.
PAPER_COLUMNS = {"LVE-mean": ("lve_mean", 1e3), "LVE-min": ("lve_min", 1e3), "FVE-mean": ("ve_mean", 1e3),
                 "FVE-min": ("ve_min", 1e3), "FDD(x1e-2)": ("fdd", 1e5), "BA": ("ba_pose", 1.0),
                 "PPE": ("meandist_pose", 1.0), "Diversity": ("diversity_lmk", 1.0)}
MOTION_COLUMNS = list(PAPER_COLUMNS) + ["FPS"]
# Our variants, never under the paper's names: BA with beat times x 30 fps and BA on the background music (same
# pose beats); FDD on displacements from the neutral face (CodeTalker), x1e5; head-pose-free diversity in mm.
VARIANT_COLUMNS = ["BA(time)", "BA(music)", "FDD(disp)", "Div(mm)"]
EVAL_SEED = 0               # base seed of the evaluation's latent draws (each clip derives its own)
SIDE_BY_SIDE_TAKES = 2      # takes shown beside the truth in a clip's side-by-side video
VIDEO_COLUMNS = ["FID", "LPIPS", "SSIM", "PSNR", "CPBD", "M-LMD", "F-LMD", "BA"]
MAX_SAMPLES = 100           # --samples: a clip's takes are meshed at once (100 x 240 frames of FLAME: 1.5 GB)
FLOAT32_MAX = float(np.finfo(np.float32).max)
POOL_MIN_CLIPS = 16          # evaluate_motion scores this many clips or more in a pool of processes
SCORED_KEYS = ("audio", "bgm", "motion", "shape")   # what scoring reads of a data set item


def clip_beats(item):
    """Audio beats of a dataset item in motion-frame units for each BA column: the singing voice's onset frames
    ('BA', the release), its beat times x 30 fps ('BA(time)') and the background music's onset frames."""
    frames, times = beats(np.asarray(item["audio"], dtype=np.float32), SAMPLE_RATE)      # the voice tracked once
    return {"BA": np.asarray(frames), "BA(time)": np.asarray(times, dtype=np.float64) * FPS,
            "BA(music)": music_beats(item["bgm"])}


def lmd(pred_lmk, gt_lmk, mouth=False):
    """The release's LMD over frames: the sum of lmd_frames over frames with both sets found, divided by the
    number of ALL frames (a frame whose detection failed adds nothing but still counts)."""
    d = lmd_frames(pred_lmk, gt_lmk, mouth)
    return float(np.nan_to_num(d, nan=0.0).sum() / len(d))


def run_lengths(b):
    """For each position of a bool (R,N), how many consecutive True end there (counting leftwards)."""
    pos = np.arange(1, b.shape[1] + 1)
    last_false = np.maximum.accumulate(np.where(b, 0, pos), axis=1)
    return np.where(b, pos - last_false, 0)


def cpbd_edge_widths(img):
    """Marziliano edge widths (pixels) at vertical-Sobel edge pixels, 0 elsewhere: (H,W) -> (H,W), as in the MATLAB
    original and the reference python package: edges are the thinned squared horizontal Sobel response above
    2 x its RMS; at an edge whose gradient points (angle rounded to 45 degrees) right (0) or left (180), the width
    is the length of the monotone intensity run through the pixel, each side followed at most 100 pixels; the
    two steps next to the pixel always count."""
    h, w = img.shape
    strength = ndimage.convolve(img, np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]]) / 8.0) ** 2   # horizontal Sobel
    strength[strength <= 2 * np.sqrt(strength.mean())] = 0
    p = np.pad(strength, 1)
    c = p[1:-1, 1:-1]
    edges = ((c > p[1:-1, :-2]) & (c > p[1:-1, 2:])) | ((c > p[:-2, 1:-1]) & (c > p[2:, 1:-1]))
    gy, gx = np.gradient(img)
    # the original leaves the angle 0 wherever the horizontal gradient is exactly 0
    angle = np.where(gx != 0, np.degrees(np.arctan2(gy, gx)), 0.0)
    quantized = 45 * np.round(angle / 45)
    step = np.diff(img, axis=1)                                                       # (H, W-1): column c -> c+1
    widths = np.zeros_like(img)
    cols = np.arange(1, w - 1)
    for rising, direction in ((True, quantized == 0), (False, np.abs(quantized) == 180)):
        monotone = step > 0 if rising else step < 0
        left = np.pad(run_lengths(monotone), ((0, 0), (1, 0)))                       # index k+1 <- run ending at k
        right = np.pad(run_lengths(monotone[:, ::-1])[:, ::-1], ((0, 0), (0, 1)))   # run starting at k
        width = (np.minimum(left[:, cols - 1], CPBD_MAX_STEP) + np.minimum(right[:, cols + 1], CPBD_MAX_STEP) + 2)
        mask = edges[:, 1:-1] & direction[:, 1:-1]
        mask[[0, -1]] = False                                                         # first / last row skipped
        widths[:, 1:-1] = np.where(mask, width, widths[:, 1:-1])
    return widths


def cpbd_edge_map(img):
    """Edge pixels deciding which blocks count: non-maximum-suppressed Sobel magnitude of the sigma=1 smoothed
    image above a tiny floor, i.e. Canny without hysteresis; the reference package's scikit-image canny keeps
    nearly every suppressed maximum of 0-255 images at its default thresholds (0.1 / 0.2), so few pixels differ."""
    s = ndimage.gaussian_filter(img, 1.0)
    gx, gy = ndimage.sobel(s, axis=1), ndimage.sobel(s, axis=0)
    mag = np.hypot(gx, gy)
    sector = np.round(np.degrees(np.arctan2(gy, gx)) / 45).astype(int) % 4          # 0: -, 1: \, 2: |, 3: /
    p = np.pad(mag, 1)
    h, w = img.shape
    keep = np.zeros_like(mag, dtype=bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        behind = p[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        keep |= (sector == k) & (mag >= ahead) & (mag >= behind)
    return keep & (mag > CPBD_EDGE_FLOOR)


def load_state(module, path, state, skip=()):
    """Copy a state dict into module by name; one error lists what is missing, extra or of the wrong shape."""
    counter = "num_batches_tracked"                      # a training counter: files may or may not carry it
    own = {k: v for k, v in module.state_dict().items() if not k.endswith(counter)}
    state = {k: v for k, v in state.items() if not k.startswith(skip) and not k.endswith(counter)}
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or extra or wrong:
        raise ValueError(f"{path}: not the expected weights: missing {missing[:5]} ({len(missing)}), unexpected "
                         f"{extra[:5]} ({len(extra)}), wrong shape {wrong[:5]} ({len(wrong)})")
    module.load_state_dict(state, strict=False)
    return module


def read_state(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as the TensorFlow graph), ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool3(x):
    # the TensorFlow graph averages only over pixels inside the image
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block: 1x1 | 5x5 | double 3x3 | pooled 1x1 branches."""

    def __init__(self, cin, pool_ch):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_ch, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool3(x))], 1)


class ReductionB(nn.Module):
    """35 -> 17 grid reduction."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions of c7 channels."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = x
        for i in range(1, 6):
            d7 = getattr(self, f"branch7x7dbl_{i}")(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(avg_pool3(x))], 1)


class ReductionD(nn.Module):
    """17 -> 8 grid reduction."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; the last one of the FID graph pools with max instead of mean."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg_pool3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 (TensorFlow 2015-12-05 graph as ported to PyTorch): images -> 2048-d pool3 features.
    forward(images (N,3,H,W) float in [0,1]) resizes to 299x299 (bilinear), maps to [-1,1] and returns (N,2048).
    Module names are the weights file's keys; its 1008-way classifier ('fc.*') is not part of it and is skipped."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)

    @classmethod
    def load(cls, path):
        """The FID weights file (pt_inception-2015-12-05-6726825d.pth) -> InceptionV3 in eval mode."""
        return load_state(cls(), path, read_state(path), skip=("fc.",)).eval()

    def forward(self, images):
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))                                                        # (N, 2048)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk: distance of two image batches (N,3,H,W) in [-1,1] -> (N,). Each of the
    five ReLU outputs is normalised to unit length over channels, the squared difference weighted per channel by
    a linear head (1x1 convolution, no bias), averaged over pixels, and summed over layers."""

    CHANNELS = (64, 192, 384, 256, 256)
    SHIFT = (-0.030, -0.088, -0.188)       # the input scaling the linear heads were trained with
    SCALE = (0.458, 0.448, 0.450)
    TAPS = (1, 4, 7, 9, 11)                # indices of the five ReLUs in `features`

    def __init__(self):
        super().__init__()
        # names follow torchvision's alexnet ('features.<i>') and lpips ('lin<k>.model.1'), so keys map 1:1
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
        for k, c in enumerate(self.CHANNELS):
            self.add_module(f"lin{k}", nn.Module())
            getattr(self, f"lin{k}").model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))

    @classmethod
    def load(cls, alexnet_path, lpips_path):
        """torchvision's alexnet state dict (trunk; its classifier is skipped) + lpips v0.1 alex.pth (heads)."""
        net = cls()
        trunk = {k: v for k, v in read_state(alexnet_path).items() if k.startswith("features.")}
        heads = read_state(lpips_path)
        load_state(net.features, alexnet_path, {k[len("features."):]: v for k, v in trunk.items()})
        head_net = nn.ModuleDict({f"lin{k}": getattr(net, f"lin{k}") for k in range(len(cls.CHANNELS))})
        load_state(head_net, lpips_path, heads)
        return net.eval()

    def layer_features(self, x):
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x / (x.norm(dim=1, keepdim=True) + 1e-10))
        return out

    def forward(self, a, b):
        return sum(getattr(self, f"lin{k}").model((fa - fb) ** 2).mean(dim=(1, 2, 3))          # (N,)
                   for k, (fa, fb) in enumerate(zip(self.layer_features(a), self.layer_features(b))))


def average_rows(rows):
    """Per clip, then the mean over clips, of every official value and variant column; the paper's columns
    are the official means in the paper's units. A value a clip cannot have (None) is left out of its mean."""
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    official = {k: mean([r["official"][k] for r in rows]) for k in rows[0]["official"]}
    out = {col: None if official[key] is None else official[key] * factor
           for col, (key, factor) in PAPER_COLUMNS.items()}
    out.update({k: mean([r[k] for r in rows]) for k in rows[0] if k != "official"})
    return dict(out, official=official)


def evaluate_motion(flame, clips, predictors, progress=None, label="Table II:"):
    """Table II rows {name: row} in one pass over the clips: clips yields dataset items (id, start, audio, bgm,
    motion, shape); predictors {name: predict(item) -> (S,T,59)}, called here in turn. Each clip is scored (the
    truth meshed and its beats found once for every row) on one torch thread, so the numbers do not depend on
    where: from POOL_MIN_CLIPS clips on, in a pool of forked processes, one a core (a clip's scoring is many small
    steps that processes run side by side and threads wait on). progress (data.Progress over the clips)."""
    score_clip.regions, cores = RegionMeshes(flame), data.cpu_cores()         # forked processes inherit it
    pool = (ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork"),
                                initializer=torch.set_num_threads, initargs=(1,))
            if cores >= 2 and len(clips) >= POOL_MIN_CLIPS else None)
    per_clip, pending = [], collections.deque()

    def collect(scores):
        per_clip.append(scores)
        if progress is not None and progress.advance():
            print(progress.line(f"  {label}"), file=sys.stderr, flush=True)

    with pool or contextlib.nullcontext():
        for item in clips:
            job = {k: item[k] for k in SCORED_KEYS}, {name: predict(item) for name, predict in predictors.items()}
            with one_thread():   # the pool's processes have the cores; here, a product's rounding depends on threads
                if pool is None:
                    collect(score_clip(job))
                    continue
                pending.append(pool.submit(score_clip, job))
                while pending and (pending[0].done() or len(pending) > 2 * cores):   # memory flat in the split
                    collect(pending.popleft().result())
        with one_thread():
            while pending:
                collect(pending.popleft().result())
    if not per_clip:
        raise ValueError("evaluate_motion: no clips to evaluate")
    return {name: dict(average_rows([scores[name] for scores in per_clip]), clips=len(per_clip))
            for name in predictors}


def score_clip(job):
    """One clip's Table II scores {name: scores} (clip_motion_scores): job (item with SCORED_KEYS, {name: samples})."""
    item, predictions = job
    return clip_motion_scores(score_clip.regions, item["shape"], item["motion"], predictions, clip_beats(item))


def clip_seed(base_seed, item):
    """A clip's latent-draw seed: a hash of the base seed, its sequence id and start frame (the same in every run)."""
    return zlib.crc32(f"{base_seed}:{item['id']}:{int(item.get('start', 0))}".encode())


def model_predictor(model, n_samples, base_seed=EVAL_SEED, silent=False, clock=None):
    """predict(item) -> (S,T,59): the model's samples of one clip, with the clip's own seed; silent feeds
    silence and no music (does the model use its audio?). With clock (a dict), one more take of one sample is
    generated and timed per clip, audio encoding included: clock['frames'] / clock['seconds'] is the FPS."""
    def predict(item):
        voice, bgm = (np.zeros_like(item["audio"]), None) if silent else (item["audio"], item["bgm"])
        seed = clip_seed(base_seed, item)
        if clock is not None:
            t0 = time.perf_counter()
            take = generate(model, voice, bgm, item["shape"], Controls(seed=seed))
            clock["seconds"] = clock.get("seconds", 0.0) + time.perf_counter() - t0
            clock["frames"] = clock.get("frames", 0) + take.shape[1]
        return generate(model, voice, bgm, item["shape"], Controls(n_samples, seed))

    return predict


def sample_files(folder):
    """DIR/<id>/sample_<k>.npz files of one clip, in k order."""
    files = sorted(Path(folder).glob("sample_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise ValueError(f"{folder}: no sample_<k>.npz files")
    return files


def read_sample(path):
    """One generated sample file -> its motion (T, 59) float32; a damaged file, or values no float32 holds, is
    refused naming it."""
    z = read_npz(path)
    if "motion" not in z:
        raise ValueError(f"{path}: no 'motion' array")
    m = z["motion"]
    if m.ndim != 2 or m.shape[1] != 59 or not np.issubdtype(m.dtype, np.floating):
        raise ValueError(f"{path}: motion must be (frames, 59) floats, got {m.dtype} {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{path}: motion holds NaN or infinite values")
    if m.size and np.abs(m).max() > FLOAT32_MAX:                # compared, not cast: a cast warns on the console
        raise ValueError(f"{path}: motion values up to {np.abs(m).max():.3g}, more than float32 motion holds")
    return m.astype(np.float32)


def sample_lengths(files):
    """{file: frames} of generated sample files, each read whole (read_sample's checks)."""
    return {f: len(read_sample(f)) for f in files}


def read_samples(pred_dir, item):
    """DIR/<id>/sample_<k>.npz -> the item's clip of each sample, (S,T,59) float32, in k order."""
    start, n = int(item.get("start", 0)), len(item["motion"])
    out = []
    for f in sample_files(Path(pred_dir) / item["id"]):
        m = read_sample(f)[start:start + n]
        if m.shape != (n, item["motion"].shape[-1]):
            raise ValueError(f"{f}: motion frames {start}..{start + n} of shape {m.shape}, expected ({n}, 59)")
        out.append(m.astype(np.float32))
    return np.stack(out)


def mean_motion(root):
    """The mean-motion baseline: the training split's mean 59-d motion vector over all its frames."""
    motions = [data.read_flame_pickle(data.flame_path(root, seq))["motion"] for seq in data.read_split(root, "train")]
    return np.concatenate(motions).mean(0).astype(np.float32)                                # over (frames, 59)


def truth_and_takes(path, flame, item, takes):
    """One clip's true motion beside its first SIDE_BY_SIDE_TAKES takes (S, T, 59), an mp4 at path named on the
    console: truth | take 0 | take 1 as labelled shaded heads under one light and camera, with voice and music."""
    motions = [item["motion"]] + list(takes[:SIDE_BY_SIDE_TAKES])
    shape = torch.as_tensor(np.asarray(item["shape"], dtype=np.float32))

    def pieces():                                            # (K, t, V, 3) meshes, PREVIEW_BATCH frames at a time
        for lo in range(0, len(item["motion"]), PREVIEW_BATCH):
            with torch.no_grad():
                yield torch.stack([flame.from_motion(shape, torch.as_tensor(np.asarray(m[lo:lo + PREVIEW_BATCH]),
                                                                            dtype=torch.float32)) for m in motions])

    labels = ["truth"] + [f"take {k}" for k in range(len(motions) - 1)]
    write_side_by_side(path, pieces(), flame.faces, labels, audio=SongMix(item["audio"], item["bgm"]))
    print(f"wrote {path}: {' | '.join(labels)} of clip {item['id']}, with its voice and music", flush=True)
    return Path(path)


def side_by_side_name(item):
    """The file name of a clip's truth-and-takes video: side_by_side_<id>.mp4 (…_<start>.mp4 past frame 0)."""
    start = int(item.get("start", 0))
    return f"side_by_side_{item['id']}" + (f"_{start}" if start else "") + ".mp4"


def writing_side_by_side(predict, flame, folder):
    """predict, also writing each clip's truth beside its takes into folder (truth_and_takes)."""
    def predict_and_write(item):
        takes = predict(item)
        truth_and_takes(Path(folder) / side_by_side_name(item), flame, item, takes)
        return takes
    return predict_and_write


def sampled_frames(n):
    """Ids of the frames the release scores, in frame order: every FRAME_STEP-th of its frame list, which it sorts
    by the digit lists of 3-digit zero-padded names, so from frame 1000 on '1000' sorts between '100' and '101'."""
    order = sorted(range(n), key=lambda i: [int(d) for d in f"{i:03d}"])
    return sorted(order[::FRAME_STEP])


def read_frames(path, ids, sizes=VIDEO_SIZES):
    """The frames ids of an mp4 (data.VideoFrames), each resized (the whole frame, to a square) to every size as the
    release's cv2.resize does (bilinear from pixel centres, no antialiasing) -> size -> uint8 (len(ids),size,size,3)."""
    wanted, out = set(ids), {size: [] for size in sizes}
    for i, frame in enumerate(data.VideoFrames(path, size=None).decoded()):
        if i in wanted:
            x = torch.from_numpy(frame.copy()).permute(2, 0, 1)[None].float()                     # (1,3,H,W)
            for size in sizes:
                y = x if x.shape[-2:] == (size, size) else F.interpolate(
                    x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
                out[size].append(y.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
    return {size: np.stack(frames) for size, frames in out.items()}


def count_frames(path):
    """Frames of an mp4, as imageio's reader counts them."""
    try:
        return imageio_ffmpeg.count_frames_and_secs(str(path))[0]
    except Exception as e:
        raise ValueError(f"{path}: unreadable video ({(str(e).strip().splitlines() or ['?'])[-1]})") from None


def read_soundtrack(path, sr=SAMPLE_RATE):
    """The audio track of a video, mono at sr -> float32 (N,) (audio.load_audio's samples), or None when it has none."""
    try:
        return load_audio(path, sr)
    except ValueError as error:
        if ": no audio stream" in str(error):
            return None
        raise


def pil_gray(rgb):
    """uint8 RGB (...,3) -> the grey levels PIL's 'L' mode gives (ITU-R 601 weights, fixed point, rounded)."""
    rgb = np.asarray(rgb).astype(np.int64)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16).astype(np.float64)


def filled_landmarks(lmk):
    """Landmarks of every frame as the release's 2-D BA tracks them: a frame without landmarks (nan) repeats the
    previous frame's; None when the first frame has none (the release skips such a video)."""
    lmk = np.asarray(lmk, dtype=np.float64).copy()
    found = np.isfinite(lmk).all(axis=(1, 2))
    if not found[0]:
        return None
    for t in np.flatnonzero(~found):
        lmk[t] = lmk[t - 1]
    return lmk


def format_table(header, lines, left=(0,)):
    """header (list of titles) and lines (lists of cell strings) -> text columns aligned to their widest cell:
    the columns numbered in `left` (text) to the left, the others (numbers) to the right."""
    widths = [max(len(str(line[k])) for line in [header] + lines) for k in range(len(header))]
    text = [[f"{c:<{w}}" if k in left else f"{c:>{w}}" for k, (c, w) in enumerate(zip(line, widths))]
            for line in [header] + lines]
    return "\n".join("  ".join(line).rstrip() for line in text)


def score_table(rows, columns):
    """rows: name -> dict of column values (float, None or a 'needs ...' string) -> aligned text table;
    4 decimals (the paper's), FPS as a whole number."""
    def cell(column, v):
        return "n/a" if v is None else v if isinstance(v, str) else f"{v:.0f}" if column == "FPS" else f"{v:.4f}"
    return format_table(["method"] + list(columns), [[name] + [cell(c, r.get(c)) for c in columns]
                                                      for name, r in rows.items()])


def clips_of(root, split, ids):
    """Dataset items of the split whose sequence id is in ids (dataset order), read lazily."""
    dataset = data.SingingHead(root, split)
    wanted = set(ids)
    return torch.utils.data.Subset(dataset, [i for i, (seq, _) in enumerate(dataset.clips) if seq in wanted])


def run_motion_table(args):
    """Rows of Table II and the line naming what was scored: the generated files (--pred) or a checkpoint
    (default: the one train.py's summary scores), then the mean-motion baseline."""
    root = Path(args.data) if args.data else builtin_data()
    ids, fps, clock, lengths = data.read_split(root, args.split), None, {}, {}
    # The training split's motion (the baseline) is read in a pool process beside the rest, and the sample files,
    # read whole before any clip is scored so that damage is refused first, in the others.
    cores = data.cpu_cores()
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork")) as pool:
        baseline = pool.submit(mean_motion, root)
        if args.pred:
            require_head(root, args.flame, args.procedural_head)
            pred_dir = Path(args.pred)
            ids = [i for i in ids if (pred_dir / i).is_dir()]
            if not ids:
                raise ValueError(f"{pred_dir}: no <clip id>/ folder for any clip of the {args.split} split of {root}")
            flame = load_flame(args.flame)
            fps = read_fps(pred_dir / "fps.json")
            files = [f for i in ids for f in sample_files(pred_dir / i)]
            for part in pool.map(sample_lengths, [files[k::4 * cores] for k in range(4 * cores)]):
                lengths.update(part)
            name, folder, predict = pred_dir.name, pred_dir, lambda item: read_samples(pred_dir, item)
            scored = f"the motion files in {pred_dir}"
        else:
            ckpt = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
            trained = load_checkpoint(ckpt, args.device)
            bad = first_nonfinite(trained.model.state_dict())
            if bad:
                raise ValueError(f"{ckpt}: weights {bad} hold NaN or infinite values; not a usable motion checkpoint")
            flame_path = resolve_flame(trained.flame_record, args.flame, ckpt)     # the checkpoint's own FLAME
            require_head(root, flame_path, args.procedural_head)
            flame = load_flame(flame_path)
            name, folder = "UniSinger", Path(args.json).parent if args.json else Path("out/metrics")
            predict = model_predictor(trained.model, args.samples, args.seed, clock=clock)
            scored = f"checkpoint {ckpt}" + (" (the one train.py's summary scores)" if not args.checkpoint else "")
        baseline = baseline.result()
    clips = clips_of(root, args.split, ids)
    frames = dict(zip(clips.dataset.sequences, clips.dataset.index.frames.tolist()))        # of each sequence
    for f, n in lengths.items():                              # unisinger.py's takes of a song may be a frame off
        if abs(n - frames[f.parent.name]) > 1:
            raise ValueError(f"{f}: {n} frames of motion for a sequence of {frames[f.parent.name]} frames; a sample "
                             f"covers its whole sequence (one frame more or less at most)")
    progress = Progress(len(clips), "clip", lines=20)
    if args.side_by_side:
        predict = writing_side_by_side(predict, flame, folder)
    constant = lambda item: np.tile(baseline, (1, len(item["motion"]), 1))                 # (1,T,59)
    rows = evaluate_motion(flame, clips, {name: predict, "mean motion": constant}, progress)
    rows[name]["FPS"] = fps
    rows["mean motion"].update(FPS=None, samples=1)
    if not args.pred:
        rows[name].update(FPS=clock["frames"] / clock["seconds"], samples=args.samples, seed=args.seed,
                          checkpoint=str(ckpt))
    samples = f"{args.samples} samples per clip, seed {args.seed}" if not args.pred else "the files' samples"
    header = f"Table II on the {args.split} split of {root}: {len(clips)} clips, {samples}; scored: {scored}"
    require_finite(rows, args.pred or ckpt)
    return rows, header


def command(argv=None):
    p = Parser(description="UniSinger evaluation: Table II (motion) or Table IV (--video).")
    p.add_argument("--pred", help="generated motion DIR/<id>/sample_<k>.npz, or with --video DIR/<id>.mp4")
    p.add_argument("--data", help="SingingHead-layout data root (default: the built-in data)")
    p.add_argument("--split", default="test")
    p.add_argument("--video", action="store_true", help="Table IV for generated videos")
    p.add_argument("--side-by-side", action="store_true", help=f"also write, for each clip scored, side_by_side_<clip "
                   f"id>.mp4: the true motion beside the first {SIDE_BY_SIDE_TAKES} takes as shaded heads, with the "
                   f"song (into DIR with --pred, else beside the JSON)")
    p.add_argument("--checkpoint", help="motion checkpoint for the default run (default: out/motion/best.pt, the "
                   "one train.py's summary scores)")
    p.add_argument("--samples", type=int, default=N_SAMPLES,
                   help=f"samples per clip for the default run, 1 to {MAX_SAMPLES}")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="base seed of the samples (each clip derives its own)")
    p.add_argument("--flame", help="FLAME model file (default: the checkpoint's own; with --pred the procedural "
                                   "head, for generated data only)")
    p.add_argument("--procedural-head", action="store_true",
                   help="score a data set of real FLAME parameters on the procedural stand-in head anyway")
    p.add_argument("--weights", default="weights", help=f"folder with {INCEPTION_FILE}, {ALEXNET_FILE}, {LPIPS_FILE}")
    p.add_argument("--json", help="output JSON (default: DIR/metrics.json, or out/metrics/<table>.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the default run generates motion (its FPS column is that device's)")
    args = p.parse_args(argv)
    if not 1 <= args.samples <= MAX_SAMPLES:
        raise ValueError(f"--samples {args.samples}: " + ("needs at least 1 sample per clip" if args.samples < 1 else
                                                          f"at most {MAX_SAMPLES} samples per clip"))
    for flag, path in (("--pred", args.pred), ("--data", args.data), ("--checkpoint", args.checkpoint)):
        if path and not Path(path).exists():
            raise ValueError(f"{path}: no such file or folder ({flag})")
    data.check_device(args.device)
    out = Path(args.json) if args.json else (Path(args.pred) / "metrics.json" if args.pred else
                                             Path("out/metrics") / ("table4.json" if args.video else "table2.json"))
    if not out.name or out.is_dir():                         # checked with the inputs: a refusal costs no scoring
        raise ValueError(f"{out}: a folder; --json names the file to write")
    data.check_output_folder(out.parent, out.name, "--json")

    if args.video:
        if not args.pred:
            p.error("--video needs --pred DIR with <clip id>.mp4 files")
        if args.side_by_side:
            p.error("--side-by-side shows motion beside its truth: it goes with Table II, not --video")
        root = Path(args.data) if args.data else builtin_data()
        ids = [i for i in data.read_split(root, args.split) if (Path(args.pred) / f"{i}.mp4").exists()]
        if not ids:
            raise ValueError(f"{args.pred}: no <clip id>.mp4 for any clip of the {args.split} split of {root}")
        rows = evaluate_video(args.pred, root, ids, args.weights)
        require_finite(rows, args.pred)
        print(f"Table IV on the {args.split} split of {root}: {len(ids)} videos, every {FRAME_STEP}th frame\n"
              f"{score_table(rows, VIDEO_COLUMNS)}")
    else:
        rows, header = run_motion_table(args)
        print(header, score_table(rows, MOTION_COLUMNS), "our variants (not the paper's columns):",
              score_table(rows, VARIANT_COLUMNS), sep="\n")
    out.parent.mkdir(parents=True, exist_ok=True)

    def finite(v):                                          # JSON has no inf: a PSNR of identical frames goes as null
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return None if isinstance(v, float) and not math.isfinite(v) else v

    with atomic_output(out) as tmp:                         # a failed write leaves no half-written JSON
        tmp.write_text(json.dumps(finite(rows), indent=2))
    print(f"-> {out}")


def read_fps(path):
    """fps.json's {"fps": frames generated a second} -> that positive number, or None when there is no file."""
    if not path.exists():
        return None
    try:
        fps = json.loads(path.read_text())["fps"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a {{\"fps\": <frames a second>}} file ({error})") from None
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps < math.inf:
        raise ValueError(f"{path}: fps {fps!r} is not a positive number")
    return float(fps)


def require_finite(rows, source):
    """Refuse, naming what was scored, a table with a NaN or infinite entry (a PSNR of identical frames, +inf, is
    the one that means something): neither the table nor the JSON is written."""
    def entries(row, prefix=""):
        for key, value in row.items():
            yield from entries(value, f"{key}.") if isinstance(value, dict) else [(prefix + key, value)]

    bad = [f"{name} {key} {v}" for name, row in rows.items() for key, v in entries(row)
           if isinstance(v, float) and not math.isfinite(v) and not (key == "PSNR" and v > 0)]
    if bad:
        raise ValueError(f"{source}: scores that are not finite ({', '.join(bad[:3])}); no table written")


def first_nonfinite(state, prefix=""):
    """The name (prefix + keys, dotted) of the first floating-point tensor in a state dict, nested dicts and lists
    included (an optimiser's), that holds NaN or infinity; None when all are finite."""
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return f"{prefix}{key}"
        found = first_nonfinite(value, f"{prefix}{key}.") if isinstance(value, (dict, list, tuple)) else None
        if found:
            return found
    return None


def main(argv=None):
    """The command line: bad input or a failed write ends in one line, `error: <file>: <problem>`, and exit
    status 1; the JSON appears under its name only when complete."""
    run_command(command, argv)


if __name__ == "__main__":
    main()
