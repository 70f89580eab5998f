"""Benchmarks: our code side by side with the trusted references, in one run, as ratios, with memory.

    python bench.py                 # every table on the CPU
    python bench.py --only flame    # one table (or several: --only flame --only render)
    python bench.py --device cuda   # on a GPU (references stay where they run)

Each part is one function `bench_<part>(device)` below that returns rows of
    name, ours_s, ref_s, ratio (= ref_s / ours_s, > 1 means we are faster), ours_mem_mb, ref_mem_mb, note.
Every part times with `best_times` and reads memory with `peak_mb`; `in_child` runs a measurement in a fresh
interpreter so that its memory (and the caches it warms) are its own. Depends on the reference packages of
requirements-dev.txt (imported inside the part that compares with them). Timings belong here, never in the tests.

The whole run takes about 6 minutes on 2 idle CPU cores (5 min 38 s measured), most of it in the render stage's
part (about 2.5 minutes: the portrait video of 60 s of motion). Each part is announced as it starts, its rows are
printed as it ends with the time it took and an ETA for the rest, and one aligned table closes the run.
"""
import argparse
import ctypes
import gc
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import imageio.v2 as imageio
import numpy as np
import torch

import audio
import builtin
import data
import metrics
import render
import unisinger
from audio import FPS, SAMPLE_RATE
from builtin import procedural_head, stand_in_flame
from flame import MOTION_DIM, N_EXPR, N_SHAPE
from data import format_duration
from unisinger import (DEFAULT_CHECKPOINT, STREAM_CHUNK_MS, STREAM_LOOKAHEAD, Controls, MotionConfig, MotionCVAE,
                       MotionStream, generate, load_checkpoint, portrait_video, stream_song)

HERE = Path(__file__).resolve().parent
COLUMNS = [("benchmark", "name", None), ("ours s", "ours_s", ".4f"), ("ref s", "ref_s", ".4f"),
           ("ratio", "ratio", ".2f"), ("ours MB", "ours_mem_mb", ".1f"), ("ref MB", "ref_mem_mb", ".1f"),
           ("note", "note", None)]


# ----------------------------------------------------------------------------- how every part measures

def best_times(fns, device, warmup, repeats, min_seconds=0.0):
    """Best wall and best process-CPU seconds of each callable over at least `repeats` rounds (and more until
    `min_seconds` have passed: calls of a few ms need many tries on a shared machine), after `warmup` rounds:
    ([wall...], [cpu...]). The callables alternate within a round, so a varying machine load hits all alike."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns:
                fn()
        wall, cpu = [[] for _ in fns], [[] for _ in fns]
        start_all = time.perf_counter()
        while len(wall[0]) < repeats or time.perf_counter() - start_all < min_seconds:
            for i, fn in enumerate(fns):
                sync()
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                sync()
                wall[i].append(time.perf_counter() - start)
                cpu[i].append(time.process_time() - start_cpu)
    return [min(t) for t in wall], [min(t) for t in cpu]


def _status_mb(field):
    """VmRSS (resident now) or VmHWM (resident peak) of this process in MB, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024                                        # kB -> MB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_mb(fn=None, device="cpu"):
    """Memory in MB. With fn: what one call of fn needs beyond what is held before it; on CUDA the peak
    allocation above the allocation before the call, on the CPU the rise of the peak resident set (VmHWM, reset
    through /proc/self/clear_refs) above the resident set before the call, after gc and malloc_trim have handed
    freed heap back (else pages cached by earlier calls hide the working set). Without fn: the process's peak so
    far (interpreter, torch, models and inputs included). None on a CPU where /proc does not offer this."""
    if torch.device(device).type == "cuda":
        if fn is None:
            return torch.cuda.max_memory_allocated() / 2 ** 20
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    if not Path("/proc/self/clear_refs").exists():
        return None
    if fn is None:
        return _status_mb("VmHWM")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")                 # resets VmHWM to the current VmRSS
    before = _status_mb("VmRSS")
    with torch.no_grad():
        fn()
    return _status_mb("VmHWM") - before


def in_child(fn, *args):
    """fn(*args) in a fresh interpreter (spawned, so nothing of this process's memory is shared): its result."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _warm_peak_mb(make, *args):
    """In a child: peak_mb of one call of make(*args)() after a warm-up call (one-off allocations are not the
    call's cost)."""
    fn = make(*args)
    with torch.no_grad():
        fn()
    return peak_mb(fn)


def fresh_peak_mb(make, *args):
    """peak_mb of a warm call of make(*args)() in a fresh interpreter, so that neither of two methods compared
    reuses pages the other freed."""
    return in_child(_warm_peak_mb, make, *args)


# ----------------------------------------------------------------------------- flame: FLAME forward vs smplx

FLAME_FRAMES = 240          # one 8 s clip at 30 fps
FLAME_WARMUP, FLAME_REPEATS = 2, 7
FLAME_THREADS = 1          # torch threads of the FLAME rows on the CPU


def _flame_methods(per_frame_shape, device="cpu", region=False):
    """Ours and smplx.lbs's callables over identical procedural-head arrays: (ours, ref). region: ours is the
    metrics' forward (RegionMeshes: 1 808 vertices, head pose zeroed), the reference smplx's whole mesh cut to them."""
    from smplx.lbs import lbs
    head = procedural_head(0)
    model = stand_in_flame().to(device)
    g = torch.Generator().manual_seed(0)
    shape = torch.randn(FLAME_FRAMES if per_frame_shape else 1, N_SHAPE, generator=g).to(device)
    motion = (torch.randn(FLAME_FRAMES, MOTION_DIM, generator=g) * 0.2).to(device)
    if region:
        motion[:, N_EXPR:N_EXPR + 6] = 0                                          # the metrics' meshes: no head pose
    t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)
    betas = torch.cat([shape.expand(FLAME_FRAMES, N_SHAPE), motion[:, :N_EXPR]], 1)
    pose = torch.cat([motion[:, N_EXPR:], torch.zeros(FLAME_FRAMES, 6, device=device)], 1)
    ref_args = (t(head['v_template']), t(head['shapedirs']), t(head['posedirs'].reshape(-1, 36).T),
                t(head['J_regressor']), torch.tensor([-1, 0, 1, 1, 1], device=device), t(head['weights']))
    regions = metrics.RegionMeshes(model) if region else None
    ours = ((lambda: regions(shape[0], motion)) if region else
            (lambda: model.from_motion(shape if per_frame_shape else shape[0], motion)))
    ref = lambda: lbs(betas, pose, *ref_args)[0][:, regions.ids] if region else lbs(betas, pose, *ref_args)[0]
    return ours, ref


def _flame_method(which, per_frame_shape, region=False):
    torch.set_num_threads(FLAME_THREADS)
    return _flame_methods(per_frame_shape, region=region)[which]


def bench_flame(device="cpu"):
    """FLAME forward for one 8 s clip (240 frames) against smplx.lbs on the same arrays: best of FLAME_REPEATS
    alternating calls, no autograd, float32, FLAME_THREADS torch thread on the CPU (with the default 2 threads
    on a shared 2-core machine the rows time threads waiting for a core, not the forward); memory of a warm
    call, on the CPU each method in a fresh interpreter. Rows: the whole mesh with one shape for the clip and
    with a shape per frame, and the metrics' region forward (RegionMeshes) against smplx's whole mesh."""
    rows, threads = [], torch.get_num_threads()
    cpu = torch.device(device).type != "cuda"
    if cpu:
        torch.set_num_threads(FLAME_THREADS)
    for per_frame_shape, region in ((False, False), (True, False), (False, True)):
        ours, ref = _flame_methods(per_frame_shape, device, region)
        (ours_s, ref_s), _ = best_times((ours, ref), device, FLAME_WARMUP, FLAME_REPEATS)
        if not cpu:
            ours_mem, ref_mem = peak_mb(ours, device), peak_mb(ref, device)
        else:
            ours_mem, ref_mem = (fresh_peak_mb(_flame_method, i, per_frame_shape, region) for i in (0, 1))
        what = ("RegionMeshes: 1808 of 5045 vertices, head pose zeroed, one shape; ref smplx.lbs whole mesh, cut"
                if region else "ref smplx.lbs; " + ("a shape per frame" if per_frame_shape else "one shape a clip"))
        rows.append(dict(
            name="flame_forward_240" + ("_per_frame_shape" if per_frame_shape else "_region" if region else ""),
            ours_s=ours_s, ref_s=ref_s, ratio=ref_s / ours_s, ours_mem_mb=ours_mem, ref_mem_mb=ref_mem,
            note=(f"{FLAME_FRAMES} frames, procedural head V=5045, float32, best of {FLAME_REPEATS}, {device}"
                  f"{f', {FLAME_THREADS} thread' if cpu else ''}; {what}")))
    torch.set_num_threads(threads)
    return rows


# ----------------------------------------------------------------------------- render: rasterizer vs trimesh

RASTER_SIZE = 256           # pixels per side
RASTER_BATCH = 32           # frames rasterized per call in the throughput row
RASTER_REPEATS = 5          # timed calls of ours; the best is kept
RASTER_REF_FRAMES = 2       # frames ray cast by trimesh (seconds each)


def head_frames(n_frames, device):
    """(T, V, 3) projected vertices of the procedural head talking and nodding, and its faces."""
    head, verts = talking_head(n_frames, device)
    return render.project(verts, data.DEFAULT_CAM), head.faces


def talking_head(n_frames, device):
    """The procedural head and its vertices (T, V, 3) in metres, talking and nodding."""
    head = stand_in_flame().to(device)
    t = torch.linspace(0, 1, n_frames, device=device)[:, None]
    motion = torch.zeros(n_frames, MOTION_DIM, device=device)
    motion[:, :N_EXPR] = 0.5 * torch.sin(6.28 * t + torch.arange(N_EXPR, device=device))
    motion[:, N_EXPR:N_EXPR + 3] = 0.2 * torch.sin(6.28 * t)            # global pose
    motion[:, -3] = 0.15 * (1 + torch.sin(12.56 * t[:, 0]))              # jaw opening
    with torch.no_grad():
        return head, head.from_motion(torch.zeros(N_SHAPE, device=device), motion)


def _raster_ours(device, batch, threads):
    """In a child: (wall s / frame, CPU s / frame, MB one call needs beyond the prepared inputs)."""
    torch.set_num_threads(threads)
    verts, faces = head_frames(batch, device)
    call = lambda: render.rasterize(verts, faces, RASTER_SIZE)
    (wall,), (cpu,) = best_times([call], device, 1, RASTER_REPEATS)
    return wall / batch, cpu / batch, peak_mb(call, device)


def _raster_reference():
    """In a child: trimesh ray casting one ray per pixel, the same per-frame triple as _raster_ours."""
    import trimesh
    verts, faces = head_frames(RASTER_REF_FRAMES, "cpu")
    verts, faces = verts.double().numpy(), faces.numpy()
    i, j = np.meshgrid(np.arange(RASTER_SIZE), np.arange(RASTER_SIZE), indexing="ij")
    origins = np.stack([(j.ravel() + 0.5) / RASTER_SIZE * 2 - 1, 1 - (i.ravel() + 0.5) / RASTER_SIZE * 2,
                        np.full(RASTER_SIZE * RASTER_SIZE, -100.0)], 1)
    directions = np.tile([0.0, 0.0, 1.0], (RASTER_SIZE * RASTER_SIZE, 1))

    def cast():
        for frame in verts:
            # the triangles' bounding-box tree is rebuilt every frame because the vertices move
            mesh = trimesh.Trimesh(frame, faces, process=False)
            mesh.ray.intersects_id(origins, directions, multiple_hits=False, return_locations=True)

    (wall,), (cpu,) = best_times([cast], "cpu", 0, 1)
    return wall / len(verts), cpu / len(verts), peak_mb(cast)


def bench_render(device="cpu"):
    """The depth rasterizer (render.py) against trimesh ray casting on the procedural FLAME head, each
    measurement in a fresh child process; per frame; memory = what a call needs beyond its prepared inputs."""
    ref_s, ref_cpu, ref_mb = in_child(_raster_reference)
    rows = []
    for batch, threads in ((RASTER_BATCH, 2), (1, 2), (RASTER_BATCH, 1)):
        ours_s, ours_cpu, ours_mb = in_child(_raster_ours, device, batch, threads)
        rows.append(dict(
            name=f"rasterize {RASTER_SIZE}x{RASTER_SIZE} head, batch {batch}, {threads} thr ({device})",
            ours_s=ours_s, ref_s=ref_s, ratio=ref_s / ours_s, ours_mem_mb=ours_mb, ref_mem_mb=ref_mb,
            note=f"per frame; ours {1 / ours_s:.0f} fps, trimesh ray casting {1 / ref_s:.2f} fps; "
                 f"process CPU s/frame ours {ours_cpu:.4f}, trimesh {ref_cpu:.3f}"))
    return rows


# ----------------------------------------------------------------------------- preview: the shaded previews

PREVIEW_FRAMES = 300        # frames written (10 s of song) in each timed preview
SONG_FRAMES = 3 * 60 * FPS   # a 3-minute song's frames, what the row extrapolates to
FLAT_SIZE = 256             # pixels a side of the previews before (the reference)
FLAT_AMBIENT = 0.25         # their share of the skin colour lit regardless of orientation


def flat_shade(verts, faces, size):
    """The previews' shading before (the reference): flat on face normals, the light at the camera, two-sided,
    no anti-aliasing. verts (B, V, 3) projected -> uint8 (B, H, W, 3)."""
    _, face_id = render.rasterize(verts, faces, size)
    tri = verts[:, faces].float()                                                     # (B, F, 3, 3)
    normal = torch.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0], dim=-1)
    facing = normal[..., 2].abs() / normal.norm(dim=-1).clamp_min(1e-12)
    light = torch.cat([FLAT_AMBIENT + (1 - FLAT_AMBIENT) * facing, torch.zeros_like(facing[:, :1])], 1)
    lit = torch.gather(light, 1, torch.where(face_id >= 0, face_id, faces.shape[0]).flatten(1)).view(face_id.shape)
    skin, background = (torch.tensor(c, dtype=torch.float32) for c in (render.SKIN_RGB, render.BACKGROUND_RGB))
    image = torch.where((face_id >= 0)[..., None], lit[..., None] * skin, background)
    return image.round().clamp(0, 255).to(torch.uint8)


def _preview_seconds(which, folder):
    """In a child with one torch thread (the other core runs the encoder): wall seconds to write the preview mp4
    of PREVIEW_FRAMES frames of the talking head, ours (render_preview at PREVIEW_SIZE) or the flat 256²
    reference (DEFAULT_CAM, x264's default preset, as the previews were written)."""
    torch.set_num_threads(1)
    head, verts = talking_head(PREVIEW_FRAMES, "cpu")
    path = Path(folder) / f"{which}.mp4"

    def flat():
        with data.VideoWriter(path, FLAT_SIZE) as video:
            for lo in range(0, len(verts), unisinger.PREVIEW_BATCH):
                video.write(flat_shade(render.project(verts[lo:lo + unisinger.PREVIEW_BATCH], data.DEFAULT_CAM),
                                       head.faces, FLAT_SIZE))

    ours = lambda: unisinger.render_preview(head, verts, path)
    (wall,), _ = best_times([ours if which == "ours" else flat], "cpu", 0, 1)
    return wall


def bench_preview(device="cpu"):
    """The shaded preview of a 3-minute song at PREVIEW_SIZE (Phong, key + fill light, anti-aliased edges)
    against the flat 256² previews before, each written in a fresh child process and extrapolated from
    PREVIEW_FRAMES frames. The reference shades as the previews did but runs on today's faster rasterizer, so
    the ratio is lower than against the previews as they were written (README gives both). CPU only."""
    with tempfile.TemporaryDirectory() as folder:
        ours, ref = (in_child(_preview_seconds, which, folder) for which in ("ours", "flat"))
    scale = SONG_FRAMES / PREVIEW_FRAMES
    return [dict(name=f"preview of a 3-minute song, {render.PREVIEW_SIZE}² vs flat {FLAT_SIZE}² (cpu)",
                 ours_s=ours * scale, ref_s=ref * scale, ratio=ref / ours, ours_mem_mb=None, ref_mem_mb=None,
                 note=f"ours {PREVIEW_FRAMES / ours:.1f} frames/s, flat {FLAT_SIZE}² {PREVIEW_FRAMES / ref:.1f} "
                      f"frames/s; 1 torch thread, the encoder beside it; "
                      f"extrapolated from {PREVIEW_FRAMES} frames; the reference runs on today's rasterizer")]


# ----------------------------------------------------------------------------- audio_w2v: wav2vec 2.0 vs transformers

W2V_SECONDS = 8
W2V_WARMUP, W2V_REPEATS = 2, 7


def bench_audio_w2v(device="cpu"):
    """audio.Wav2Vec2 against transformers.Wav2Vec2Model: base config (768 wide, 12 layers), random weights saved
    once by transformers and loaded into ours through Wav2Vec2.from_pretrained, 8 s of 16 kHz audio, batch 1,
    under torch.inference_mode. Memory: what one forward needs beyond the loaded model."""
    import transformers
    device = torch.device(device)
    torch.manual_seed(0)
    ref = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = audio.Wav2Vec2.from_pretrained(tmp).eval()
    ref, ours = ref.to(device), ours.to(device)
    wave = audio.normalize_wave(torch.randn(1, W2V_SECONDS * SAMPLE_RATE)).to(device)  # (1, N)
    with torch.inference_mode():
        run_ours, run_ref = (lambda: ours(wave)), (lambda: ref(wave).last_hidden_state)
        diff = (run_ours() - run_ref()).abs().max().item()
        (ours_s, ref_s), _ = best_times([run_ours, run_ref], device, W2V_WARMUP, W2V_REPEATS)
        ours_mem, ref_mem = peak_mb(run_ours, device), peak_mb(run_ref, device)
    mem_kind = "CUDA peak allocated" if device.type == "cuda" else "peak RSS rise"
    note = (f"vs transformers.Wav2Vec2Model, base config, random weights, {W2V_SECONDS} s audio, batch 1, "
            f"{torch.get_num_threads()} threads; max|diff| {diff:.1e}; best of {W2V_REPEATS}; "
            f"mem = one forward beyond the loaded model ({mem_kind})")
    return [dict(name="wav2vec2_base_8s", ours_s=ours_s, ref_s=ref_s, ratio=ref_s / ours_s, ours_mem_mb=ours_mem,
                 ref_mem_mb=ref_mem, note=note)]


# ----------------------------------------------------------------------------- audio_dsp: MFCC and beats vs librosa

DSP_SECONDS = 8.0
DSP_WARMUP, DSP_REPEATS = 2, 7
DSP_MIN_SECONDS = 3.0       # each comparison keeps alternating calls this long: the MFCC takes milliseconds
# a fresh interpreter's first MFCC: the import, then the call, of each side (librosa's import is lazy)
FIRST_CALL = {
    "ours": ("import audio", "audio.mfcc(y)"),
    "librosa": ("import librosa",
                "librosa.feature.mfcc(y=y, sr=16000, n_mfcc=64, n_fft=2048, hop_length=512, n_mels=128)"),
}


def _music(seconds=DSP_SECONDS, bpm=100.0):
    """Kick / snare / hi-hat on a 100 bpm grid over a sine melody, float32 (N,)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    y = np.zeros_like(t)
    beat = 60.0 / bpm
    for k, start in enumerate(np.arange(0.0, seconds, beat / 2)):
        i = int(start * SAMPLE_RATE)
        tt = np.arange(min(len(t) - i, 4000)) / SAMPLE_RATE
        drum = 0.15 * rng.standard_normal(len(tt)) * np.exp(-tt * 80)
        if k % 4 == 0:
            drum += np.sin(2 * np.pi * (60 + 80 * np.exp(-tt * 30)) * tt) * np.exp(-tt * 12)
        if k % 4 == 2:
            drum += 0.5 * rng.standard_normal(len(tt)) * np.exp(-tt * 25)
        y[i:i + len(tt)] += drum
    notes = 220.0 * 2 ** (rng.integers(0, 12, int(seconds / beat) + 1) / 12)
    y += 0.2 * np.sin(2 * np.pi * np.cumsum(notes[(t / beat).astype(int)]) / SAMPLE_RATE)
    return (0.3 * y).astype(np.float32)


def _dsp_methods(device="cpu"):
    """name -> (ours, librosa's) callables on the same 8 s of music; one row puts the median filter that
    audio.hpss uses (a selection network) against scipy's in the whole beat pipeline."""
    import librosa
    from scipy import ndimage
    y = _music()
    y_device = torch.from_numpy(y).to(device)
    percussive = librosa.effects.hpss(y)[1]

    def librosa_beats():
        envelope = librosa.onset.onset_strength(y=librosa.effects.hpss(y)[1], sr=SAMPLE_RATE, aggregate=np.median)
        return librosa.beat.beat_track(onset_envelope=envelope, sr=SAMPLE_RATE)[1]

    def beats_with_scipys_median():                # audio.beats with the plain median filter in place of ours
        plain = lambda x, size, axis: ndimage.median_filter(
            x, size=[size if a == axis % x.ndim else 1 for a in range(x.ndim)], mode="reflect")
        ours_filter, audio.median_filter = audio.median_filter, plain
        try:
            return audio.beats(y)
        finally:
            audio.median_filter = ours_filter

    def librosa_onset_beats():
        envelope = librosa.onset.onset_strength(y=percussive, sr=SAMPLE_RATE, aggregate=np.median)
        return librosa.beat.beat_track(onset_envelope=envelope, sr=SAMPLE_RATE)[1]

    return {
        "mfcc": (lambda: audio.mfcc(y_device),
                 lambda: librosa.feature.mfcc(y=y, sr=SAMPLE_RATE, n_mfcc=64, n_fft=2048, hop_length=512,
                                              n_mels=128)),
        "beats": (lambda: audio.beats(y), librosa_beats),
        "beats vs beats with scipy's median filter": (lambda: audio.beats(y), beats_with_scipys_median),
        "hpss": (lambda: audio.hpss(y), lambda: librosa.effects.hpss(y)),
        "onset_strength+beat_track": (
            lambda: audio.beat_track(audio.onset_strength(percussive, sr=SAMPLE_RATE))[1], librosa_onset_beats),
    }


def _dsp_method(name, which):
    return _dsp_methods()[name][which]


def _first_call(which):
    """(import s, first mfcc call s) in a fresh interpreter that has imported nothing yet: not even torch, so
    this one measurement runs its own clock in a `python -c` child instead of best_times."""
    do_import, call = FIRST_CALL[which]
    code = (f"import json, time, numpy as np\n"
            f"y = np.random.default_rng(0).standard_normal({int(DSP_SECONDS * SAMPLE_RATE)}).astype(np.float32)\n"
            f"t0 = time.perf_counter()\n{do_import}\nt1 = time.perf_counter()\n{call}\n"
            f"t2 = time.perf_counter()\nprint(json.dumps([t1 - t0, t2 - t1]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_audio_dsp(device="cpu"):
    """audio.py against librosa on 8 s of 16 kHz music: MFCC (warm, and the first call in a fresh process), the
    beat pipeline (hpss -> onset strength -> beat tracking) and its two halves. Best of DSP_REPEATS calls or of as
    many as DSP_MIN_SECONDS allow, alternating; the note adds the best process CPU time of each. On 2 cores the
    thread pools of the two sides (torch's OpenMP, numpy's OpenBLAS) keep spinning after their calls and slow the
    other side's next call: the milliseconds of MFCC move by 2-3x with it. The beat pipeline is numpy on the CPU
    for any device; on CUDA only the MFCC row moves to the GPU. Memory of a warm call, on the CPU each method in a
    fresh interpreter."""
    methods = _dsp_methods(device)
    rows = []
    for name, (ours, ref) in methods.items():
        on_gpu = name == "mfcc" and torch.device(device).type == "cuda"
        where = device if on_gpu else "cpu"
        (ours_s, ref_s), (ours_cpu, ref_cpu) = best_times([ours, ref], where, DSP_WARMUP, DSP_REPEATS,
                                                          DSP_MIN_SECONDS)
        against = "the same with scipy.ndimage.median_filter" if "scipy" in name else "librosa 0.11 warm on cpu"
        note = f"ours on {where} vs {against}; best CPU time {ours_cpu * 1e3:.1f} vs {ref_cpu * 1e3:.1f} ms"
        if name == "beats":
            note += "; identical beat frames" if np.array_equal(ours()[0], ref()) else "; BEAT FRAMES DIFFER"
        rows.append(dict(
            name=f"audio.{name} (8 s, 16 kHz)", ours_s=ours_s, ref_s=ref_s, ratio=ref_s / ours_s,
            ours_mem_mb=peak_mb(ours, device) if on_gpu else fresh_peak_mb(_dsp_method, name, 0),
            ref_mem_mb=fresh_peak_mb(_dsp_method, name, 1), note=note))
    ours_import, ours_first = _first_call("ours")
    ref_import, ref_first = _first_call("librosa")
    rows.append(dict(name="audio.mfcc first call in a fresh process (8 s)", ours_s=ours_first,
                     ref_s=ref_first, ratio=ref_first / ours_first, ours_mem_mb=None, ref_mem_mb=None,
                     note=f"cpu; import audio (with torch) {ours_import:.2f} s, import librosa "
                          f"{ref_import:.2f} s, not counted in the call"))
    return rows


# ----------------------------------------------------------------------------- separation: a mixed song -> voice, band

SEPARATION_CASES = [(30, 1), (180, 1), (600, 1), (180, 2)]   # seconds of song, torch threads
SEPARATION_GOAL = 20.0      # x real time on 2 CPU cores, the bar for the separation


def _separation_case(path, threads):
    """In a child with `threads` torch threads: seconds and process-CPU seconds of audio.separate_stream over the
    song at path, read a stretch at a time through AudioFile as generation reads it (the file's opening scan not
    counted), and the process's peak resident MB."""
    torch.set_num_threads(threads)
    song = audio.AudioFile(path)
    audio.separate(song[0:SAMPLE_RATE])                                       # warm-up: first-call costs
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in audio.separate_stream(lambda a, b: song[a:b], len(song)):
        pass
    return time.perf_counter() - start, time.process_time() - start_cpu, peak_mb()


def bench_separation(device="cpu"):
    """audio.separate_stream on songs of SEPARATION_CASES' lengths (drums and a melody, _music) read from a WAV
    file, each in a fresh process: ours = seconds to separate, ref = the song's seconds, so ratio = times real
    time (bar: >= SEPARATION_GOAL on 2 CPU cores); memory = the process's peak resident MB (interpreter and torch
    included), which must not grow with the song: what little it does is glibc's heap, whose mmap threshold adapts
    to the blocks' sizes (with MALLOC_MMAP_THRESHOLD_=131072 the peak is the same at every length). No reference
    package separates this way; CPU only (the separation is for the CPU, as generation's reading is)."""
    rows, peaks = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for seconds, threads in SEPARATION_CASES:
            path = Path(folder) / f"song_{seconds}s.wav"
            if not path.exists():
                data.write_wav(path, _music(seconds))
            wall, cpu, peak = in_child(_separation_case, path, threads)
            peaks.setdefault(seconds, peak)
            rows.append(dict(name=f"separation of a {seconds} s song, {threads} thread{'s' * (threads > 1)}",
                             ours_s=wall, ref_s=float(seconds), ratio=seconds / wall, ours_mem_mb=peak,
                             ref_mem_mb=None,
                             note=f"cpu; {seconds / cpu:.0f}x real time in process CPU time; bar >= "
                                  f"{SEPARATION_GOAL:g}x real time; memory: peak RSS of a fresh process"
                                  + (f", {100 * (peak / peaks[SEPARATION_CASES[0][0]] - 1):+.1f} % vs the "
                                     f"{SEPARATION_CASES[0][0]} s song" if seconds != SEPARATION_CASES[0][0] else "")))
    return rows


# ----------------------------------------------------------------------------- motion: generation speed

PAPER_FPS = 50.849          # UniSinger's FPS in the paper's Table II (RTX 3090)
MOTION_CASES = [("paper", 8.0, 1), ("tiny", 8.0, 1), ("paper", 180.0, 1)]    # preset, seconds of audio, samples


def _motion_case(preset, seconds, samples, device):
    """In a child: best seconds of generate (of 3 calls for a clip, 1 for a song), frames made, peak MB of the
    process (the model included)."""
    torch.manual_seed(0)
    model = MotionCVAE(MotionConfig.preset(preset)).to(device).eval()
    voice = (np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)
    generate(model, voice[:8 * SAMPLE_RATE], voice[:8 * SAMPLE_RATE], None, Controls(samples))      # warm-up
    takes = []
    (best,), _ = best_times([lambda: takes.append(generate(model, voice, voice, None, Controls(samples)))], device, 0,
                            3 if seconds <= 8 else 1)
    return best, takes[0].shape[0] * takes[0].shape[1], peak_mb(device=device)


def bench_motion(device="cpu"):
    """Frames of motion a second (audio encoding included): an 8 s clip at batch 1 with the `paper` preset
    (wav2vec 2.0 base + the full-size CVAE, random weights: speed does not depend on the values) and with `tiny`,
    and a 3-minute song end to end (features, every window, blending), each in a fresh process. The reference
    column is the paper's published figure, not a measurement here."""
    rows = []
    for preset, seconds, samples in MOTION_CASES:
        best, frames, mem = in_child(_motion_case, preset, seconds, samples, device)
        fps = frames / best
        rows.append(dict(name=f"motion {preset}, {seconds:g} s audio, batch {samples}", ours_s=best,
                         ref_s=frames / PAPER_FPS, ratio=fps / PAPER_FPS, ours_mem_mb=mem, ref_mem_mb=None,
                         note=f"{device}; {fps:.0f} frames/s ({fps / 30:.1f}x real time); ref = the paper's "
                              f"{PAPER_FPS} frames/s; memory = peak RSS of the process incl. the model"))
    return rows


# ----------------------------------------------------------------------------- stream: live streaming

STREAM_SONG_S = 20.0
STREAM_THREADS = 1          # torch threads: the goals are for 2 CPU cores, one is the conservative reading
# preset, frames each pass reads (window), lookahead frames, chunk ms, latency goal s
STREAM_CASES = [("tiny", 240, STREAM_LOOKAHEAD, STREAM_CHUNK_MS, 0.3), ("paper", 60, 6, 400.0, 1.0)]
STREAM_QUALITY = dict(lookahead=STREAM_LOOKAHEAD, chunk_ms=STREAM_CHUNK_MS)     # the stream's defaults


def _stream_case(preset, window, lookahead, chunk_ms, device):
    """In a child with STREAM_THREADS threads: stream_song's statistics of a STREAM_SONG_S song, fed as fast as
    possible, and the slowest pass's CPU seconds."""
    torch.set_num_threads(STREAM_THREADS)
    torch.manual_seed(0)
    model = MotionCVAE(MotionConfig.preset(preset)).to(device).eval()
    voice = (np.random.default_rng(0).standard_normal(int(STREAM_SONG_S * SAMPLE_RATE)) * 0.1).astype(np.float32)
    stream_song(MotionStream(model, lookahead=lookahead, window=window), voice[:2 * SAMPLE_RATE],
                chunk_ms=chunk_ms, realtime=False)                                       # warm-up
    stream = MotionStream(model, window=window, lookahead=lookahead)
    take, stats = stream_song(stream, voice, chunk_ms=chunk_ms, realtime=False)
    return dict(stats, frames=len(take), pass_cpu_max_s=max(stream.per_pass_cpu_s))


def _stream_quality_row(device):
    """Stream vs offline on the built-in test split with the default checkpoint, or a row saying what is missing:
    the LVE of the streamed take and of the offline take (same z) against the truth, and the largest
    frame-to-frame vertex jump across the joins between pushes and elsewhere (the procedural head, head pose
    included)."""
    name = "stream vs offline, LVE on the test split"
    if not DEFAULT_CHECKPOINT.exists() or not builtin.is_current(builtin.BUILTIN_ROOT):
        return dict(name=name, note=f"needs {DEFAULT_CHECKPOINT} and the built-in data: run python train.py")
    model = load_checkpoint(DEFAULT_CHECKPOINT, device).model
    head = stand_in_flame()
    regions = metrics.RegionMeshes(head)
    lve, join_jumps, other_jumps = {"stream": [], "offline": []}, [], []
    for item in data.SingingHead(builtin.BUILTIN_ROOT, "test"):
        shape = torch.from_numpy(item["shape"])
        truth = regions(shape, torch.from_numpy(item["motion"]))
        offline = generate(model, item["audio"], item["bgm"], item["shape"], Controls(seed=1))[0]
        stream = MotionStream(model, item["shape"], Controls(seed=1), STREAM_QUALITY["lookahead"])
        chunk = round(STREAM_QUALITY["chunk_ms"] * SAMPLE_RATE / 1000)
        pieces, emitted = [], []                     # frames out after each push: the joins between pushes
        for lo in range(0, len(item["audio"]), chunk):
            pieces.append(stream.push(item["audio"][lo:lo + chunk], item["bgm"][lo:lo + chunk]))
            emitted.append(stream.emitted)
        take = np.concatenate(pieces + [stream.finish()])
        for key, motion in (("stream", take), ("offline", offline)):
            errors = metrics.vertex_errors(regions(shape, torch.from_numpy(motion)), truth)[None]       # (1, T, U) mm
            lve[key].append(metrics.lve(errors.index_select(-1, regions.lips))[0])
        verts = head.from_motion(shape, torch.from_numpy(take))                               # (T, V, 3)
        jump = (verts[1:] - verts[:-1]).norm(dim=-1).amax(-1).numpy() * 1000                  # (T-1,) mm
        emitted = np.array(emitted)
        joins = np.unique(emitted[(emitted > 0) & (emitted < len(take))]) - 1
        join_jumps.append(jump[joins])
        other_jumps.append(np.delete(jump, joins))
    ours, ref = np.mean(lve["stream"]), np.mean(lve["offline"])
    joins, others = np.concatenate(join_jumps), np.concatenate(other_jumps)
    return dict(name=name, note=f"{len(lve['stream'])} clips, lookahead {STREAM_QUALITY['lookahead']} frames, "
                f"chunk {STREAM_QUALITY['chunk_ms']:g} ms: LVE stream {ours:.3f} mm, offline {ref:.3f} mm "
                f"({ours / ref - 1:+.1%}, goal <= +10 %); vertex jump at joins max {joins.max():.3f} / mean "
                f"{joins.mean():.3f} mm, elsewhere max {others.max():.3f} / mean {others.mean():.3f} mm")


def bench_stream(device="cpu"):
    """Live streaming (unisinger.MotionStream), one row per preset with random weights (speed does not depend on
    the values): ours = CPU seconds of compute per second of audio (every pass: wav2vec 2.0, MFCC, decoder), ref =
    1 s (real time), so ratio > 1 means faster than real time. CPU time, unlike wall time, does not count the waits
    of a shared machine (the note gives wall time too). Latency = lookahead + chunk (by design) + the compute of a
    pass, mean and slowest, against the preset's goal; a pass must also finish within one chunk, or the stream
    falls behind the song. Then the quality row, with a trained checkpoint."""
    rows = []
    for preset, window, lookahead, chunk_ms, goal in STREAM_CASES:
        r = in_child(_stream_case, preset, window, lookahead, chunk_ms, device)
        mean, worst = r["algorithmic_s"] + r["pass_cpu_mean_s"], r["algorithmic_s"] + r["pass_cpu_max_s"]
        realtime = r["cpu_per_audio_s"] < 1 and r["pass_cpu_max_s"] < r["chunk_s"]
        rows.append(dict(
            name=f"stream {preset}, {window}-frame passes, {chunk_ms:g} ms chunks", ours_s=r["cpu_per_audio_s"],
            ref_s=1.0, ratio=1.0 / r["cpu_per_audio_s"],
            note=f"{device}, {STREAM_THREADS} thread; CPU s of compute per s of audio (wall "
                 f"{r['compute_per_audio_s']:.3f}; ref = real time); latency {r['algorithmic_s'] * 1000:.0f} ms by "
                 f"design (lookahead {lookahead} frames + chunk) + a pass's CPU {r['pass_cpu_mean_s'] * 1000:.0f} "
                 f"ms mean / {r['pass_cpu_max_s'] * 1000:.0f} ms max = {mean:.2f} / {worst:.2f} s (goal <= "
                 f"{goal:g} s); real time: {'yes' if realtime else 'no'}"))
    rows.append(_stream_quality_row(device))
    return rows


# ----------------------------------------------------------------------------- metrics: Table II and SSIM / PSNR

TEST_CLIPS = 1829           # the paper's SingingHead test split
EVAL_SAMPLES = 10
EVAL_CLIPS = (20, 200)      # test splits scored through metrics.py --pred: their difference gives a clip's cost
EVAL_REF_CLIPS = 2          # clips timed for the reference route (seconds each)
EVAL_THREADS = 1            # torch threads of the SSIM / PSNR children and the reference route
EVAL_BAR_S = 300.0
EVAL_POLL_S = 1.0           # s between readings of the command's memory: /proc's smaps of its big processes cost CPU


def fake_clip(rng):
    """A clip of the benchmark: shape (100,), true motion (240,59), samples (10,240,59), beat music (N,)."""
    def motion(*lead):   # smooth random walk around zero, jaw opening positive
        m = np.cumsum(rng.normal(0, 0.02, lead + (data.CLIP_FRAMES, MOTION_DIM)), axis=-2)
        m[..., -3] = np.abs(m[..., -3])
        return m.astype(np.float32)

    n = 8 * SAMPLE_RATE
    music = 0.05 * rng.normal(size=n)
    for start in np.arange(rng.uniform(0, 0.5), 8, 0.5) * SAMPLE_RATE:    # 120 BPM decaying clicks
        s = int(start)
        music[s:s + 800] += np.exp(-np.arange(min(800, n - s)) / 120)
    return (rng.normal(0, 0.5, N_SHAPE).astype(np.float32), motion(), motion(EVAL_SAMPLES),
            music.astype(np.float32))


def librosa_beats(y):
    import librosa
    percussive = librosa.effects.percussive(y)
    onset = librosa.onset.onset_strength(y=percussive, sr=SAMPLE_RATE, aggregate=np.median)
    return librosa.beat.beat_track(onset_envelope=onset, sr=SAMPLE_RATE, hop_length=512)[1]


def scored_split(folder, n_test):
    """A linked SingingHead-layout set (builtin.linked_dataset: the release's proportions) whose test split has
    n_test clips, and DIR/<id>/sample_<k>.npz, EVAL_SAMPLES random takes of each: (data root, DIR)."""
    total = round(n_test * sum(builtin.SINGINGHEAD_SPLITS.values()) / builtin.SINGINGHEAD_SPLITS["test"])
    root = builtin.linked_dataset(builtin.builtin_data(), Path(folder) / "data", total)
    rng = np.random.default_rng(0)
    for seq in data.read_split(root, "test"):
        frames = len(data.read_flame_pickle(data.flame_path(root, seq))["motion"])
        takes = np.cumsum(rng.normal(0, 0.02, (EVAL_SAMPLES, frames, MOTION_DIM)), axis=1).astype(np.float32)
        (Path(folder) / "pred" / seq).mkdir(parents=True)
        for k, take in enumerate(takes):
            np.savez(Path(folder) / "pred" / seq / f"sample_{k}.npz", motion=take)
    return root, Path(folder) / "pred"


def _table2_reference(n_clips):
    """In a child: seconds a clip of the direct route takes (whole meshes through the general chain, librosa's
    beats of the voice and of the music; the same two rows, 10 samples and the mean motion), its peak MB."""
    torch.set_num_threads(EVAL_THREADS)
    flame = stand_in_flame()
    regions = metrics.RegionMeshes(flame, torch.arange(flame.template.numel() // 3))   # the release: whole heads
    clips = [fake_clip(np.random.default_rng(k)) for k in range(n_clips)]

    def clip(shape, gt, samples, music):
        beats = {"BA": librosa_beats(music), "BA(music)": librosa_beats(music)}
        metrics.clip_motion_scores(regions, shape, gt, {"takes": samples, "mean motion": gt.mean(0)[None, None]},
                                   beats)

    clip(*clips[0])                                                                        # warm-up
    (seconds,), _ = best_times([lambda: [clip(*c) for c in clips]], "cpu", 0, 1)
    return seconds / n_clips, peak_mb()


def _ssim_psnr(route):
    """In a child: seconds for SSIM + PSNR of 40 frame pairs of 256 x 256 (one clip's every 6th frame), peak MB."""
    torch.set_num_threads(EVAL_THREADS)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (40, 256, 256, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)

    def reference():
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # only the reference's child
        for x, y in zip(a, b):
            structural_similarity(x, y, channel_axis=-1, data_range=255, gaussian_weights=False)
            peak_signal_noise_ratio(x, y, data_range=255)

    (seconds,), _ = best_times([(lambda: (metrics.ssim(a, b), metrics.psnr(a, b))) if route == "ours"
                                else reference], "cpu", 0, 1)
    return seconds, peak_mb()


def bench_metrics(device="cpu"):
    """The Table II evaluation at the paper's test-set size, and SSIM / PSNR; CPU only (the evaluation runs where
    the metrics run). Table II: the user's command, `python metrics.py --pred DIR --data ROOT`, on linked test
    splits of EVAL_CLIPS clips x 10 random takes of 240 frames (scored_split), both rows (the takes, the mean
    motion), wall seconds to its table; 1 829 clips = the small split's time + 1 809 x (the time the large split
    adds a clip), so start-up counts once. Memory: the peak Pss of its process tree (pool processes included).
    Reference: the direct route (_table2_reference) from EVAL_REF_CLIPS clips on 1 thread, x 1 829."""
    timed = {}
    with tempfile.TemporaryDirectory() as folder:
        for n in EVAL_CLIPS:
            root, pred = scored_split(Path(folder) / f"split{n}", n)
            run = watch(["metrics.py", "--pred", pred, "--data", root, "--json", Path(folder) / f"table{n}.json"],
                        r"^-> ", timeout_s=1800, poll_s=EVAL_POLL_S)
            if "Table II on the test split" not in run["output"]:
                raise RuntimeError(f"metrics.py failed on {n} clips:\n{run['output'][-2000:]}")
            timed[n] = run
    (small, large), (t_small, t_large) = EVAL_CLIPS, (timed[n]["seconds"] for n in EVAL_CLIPS)
    per_clip = (t_large - t_small) / (large - small)
    ours_total = t_small + per_clip * (TEST_CLIPS - small)
    ref_clip, ref_mem = in_child(_table2_reference, EVAL_REF_CLIPS)
    ref_total = ref_clip * TEST_CLIPS
    ssim_ours, ssim_ours_mem = in_child(_ssim_psnr, "ours")
    ssim_ref, ssim_ref_mem = in_child(_ssim_psnr, "ref")
    verdict = "meets" if ours_total <= EVAL_BAR_S else "MISSES"
    return [
        dict(name="Table II eval, 1829 clips x 10 samples", ours_s=ours_total, ref_s=ref_total,
             ratio=ref_total / ours_total, ours_mem_mb=max(timed[n]["pss_mb"] for n in EVAL_CLIPS),
             ref_mem_mb=ref_mem,
             note=f"{verdict} the {EVAL_BAR_S:.0f} s bar; `metrics.py --pred` on test splits of {small} and {large} "
                  f"clips ({t_small:.1f} s, {t_large:.1f} s: {1000 * per_clip:.0f} ms a clip, both rows, a pool "
                  f"process a core); ref: whole meshes + librosa beats on 1 thread, from {EVAL_REF_CLIPS} clips; "
                  f"MB: ours the Pss of the command's process tree, ref the child's peak RSS"),
        dict(name="SSIM + PSNR, 40 frames 256x256 RGB", ours_s=ssim_ours, ref_s=ssim_ref, ratio=ssim_ref / ssim_ours,
             ours_mem_mb=ssim_ours_mem, ref_mem_mb=ssim_ref_mem,
             note="ref: scikit-image, frame by frame; MB = peak RSS of the child process"),
    ]


# ----------------------------------------------------------------------------- render_stage: renderer and portrait video

STAGE_BATCH = 8             # frames a batch on the CPU (the GPU bar is batch 32 in bf16)
STAGE_REPEATS = 2           # timed batches after one warm-up
SONG_SECONDS = (3, 60)      # portrait_video lengths whose peak memory is compared


def renderer_seconds_per_frame(preset, device="cpu", batch=STAGE_BATCH):
    """Seconds a frame for FLAME -> depth -> FaceRenderer at 256², batch frames at a time, best of STAGE_REPEATS."""
    flame = stand_in_flame().to(device)
    cfg = render.RendererConfig.preset(preset)
    generator = render.FaceRenderer(cfg.channels, cfg.warp).to(device).eval()
    motion = torch.zeros(batch, MOTION_DIM, device=device)
    reference = torch.zeros(batch, 3, render.IMAGE_SIZE, render.IMAGE_SIZE, device=device)
    shape = torch.zeros(N_SHAPE, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
    cam = torch.tensor(data.DEFAULT_CAM, device=device)

    def one_batch():        # as portrait_video: meshes, depth and warp in float32, the renderer in bf16 on a GPU
        verts = flame.from_motion(shape, motion)
        depth = render.render_depth(verts, flame.faces, cam)
        flow = render.reference_flow(verts, flame.faces, cam, verts[0], cam) if cfg.warp else None
        with autocast:
            generator(depth, reference, torch.arange(batch, device=device), flow)

    (seconds,), _ = best_times([one_batch], device, 1, STAGE_REPEATS)
    return seconds / batch


def untrained_checkpoint(folder):
    """A tiny renderer checkpoint and a reference image: memory and speed do not depend on the weights."""
    cfg = render.RendererConfig.preset("tiny")
    ckpt, image = Path(folder) / "renderer.pt", Path(folder) / "reference.png"
    torch.save(dict(generator=render.FaceRenderer(cfg.channels, cfg.warp).state_dict(), renderer_config=asdict(cfg),
                    cam=list(data.DEFAULT_CAM), reference_motion=torch.zeros(MOTION_DIM),
                    reference_cam=torch.tensor(data.DEFAULT_CAM), shape=torch.zeros(N_SHAPE)), ckpt)
    imageio.imwrite(image, np.full((render.IMAGE_SIZE, render.IMAGE_SIZE, 3), 128, np.uint8))
    return ckpt, image


def _portrait_peak_mb(seconds, ckpt, image, out):
    """In a child: peak resident MB of the process writing a portrait video of `seconds` seconds of motion."""
    frames = seconds * FPS
    motion = np.zeros((frames, MOTION_DIM), np.float32)
    motion[:, :10] = 0.5 * np.sin(np.arange(frames)[:, None] / 7.0 + np.arange(10))
    motion[:, -3] = 0.15 * (1 + np.sin(np.arange(frames) / 3.0))                        # jaw opening and closing
    voice = (0.1 * np.sin(np.arange(round(frames / FPS * SAMPLE_RATE)) * 0.05)).astype(np.float32)
    portrait_video(unisinger.load_renderer(ckpt), image, stand_in_flame(), np.zeros(N_SHAPE, np.float32), motion, out,
                   audio=voice)
    return peak_mb()


def bench_render_stage(device="cpu"):
    """The render stage: face-renderer inference speed and the portrait video's peak memory against the song's
    length. No reference package: there is no other implementation to compare against, so ref_s / ref_mem_mb stay
    None and the note says what is measured."""
    rows = []
    for preset in ("tiny", "paper"):
        seconds = renderer_seconds_per_frame(preset, device)
        rows.append(dict(name=f"render: FLAME -> depth -> renderer '{preset}' 256², batch {STAGE_BATCH}, {device}",
                         ours_s=seconds, ref_s=None, ratio=None, ours_mem_mb=None, ref_mem_mb=None,
                         note=f"{1 / seconds:.1f} frames/s, rasterization included"
                              + ("" if device != "cpu" else "; GPU bar (>= 300 frames/s, bf16, batch 32) "
                                                            "needs a GPU, not measured here")))
    with tempfile.TemporaryDirectory() as folder:
        ckpt, image = untrained_checkpoint(folder)
        peaks = {}
        for seconds in SONG_SECONDS:
            out = Path(folder) / f"song_{seconds}s" / "portrait.mp4"
            (wall,), _ = best_times([lambda: peaks.update({seconds: in_child(_portrait_peak_mb, seconds, ckpt,
                                                                              image, out)})], "cpu", 0, 1)
            rows.append(dict(name=f"render: portrait_video {seconds} s of motion (tiny, CPU, fresh process)",
                             ours_s=wall, ref_s=None, ratio=None, ours_mem_mb=peaks[seconds], ref_mem_mb=None,
                             note="peak RSS of the Python process (ffmpeg encoders apart)"))
        short, long = peaks[SONG_SECONDS[0]], peaks[SONG_SECONDS[-1]]
        rows[-1]["note"] += (f"; {SONG_SECONDS[-1]} s vs {SONG_SECONDS[0]} s: {100 * (long / short - 1):+.1f} % "
                             f"(bar: within 10 %)")
    return rows


# ----------------------------------------------------------------------------- data: the data set at SingingHead's size

DATA_SIZES = (200, 2_000, 12_196)     # sequences: two small sets and SingingHead's whole release
POLL_S = 0.05                         # s between two readings of a process tree's memory
FIRST_STEP = r"epoch 0 step 1/"       # what train.py prints after its first step
LOADER_BATCHES = 24                   # batches the loader alone serves while timed, after the first
PAPER_BATCH = 8                       # the paper preset's batch: the loader's batches in the throughput row
PAPER_CPU_BATCH = 2                   # clips a timed paper-preset step trains on the CPU (8 would take minutes)
PAPER_STEPS = 2                       # paper-preset steps timed, after one untimed
RENDER_VIDEOS = (20, 60)              # one person's portrait videos in the render stage's memory rows
RENDER_DATA_SIZE = 512                # pixels a side the renderer trains at: the larger of the paper's Table IV sizes
RENDER_VIDEO_SIZE = 1024              # pixels a side of the person's videos (filmed larger than trained, as real ones)
RENDER_VIDEO_S = 8                    # seconds a portrait video lasts, as SingingHead's


def process_tree(pid):
    """A process and all its descendants, from /proc, each before its children; those that end while it is
    read are left out."""
    family, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = [int(c) for task in Path(f"/proc/{p}/task").iterdir()
                        for c in (task / "children").read_text().split()]
        except (OSError, ValueError):            # the process ended while it was read
            continue
        family.append(p)
        todo += children
    return family


def tree_memory_mb(pid):
    """(resident, proportional) memory in MB of a process and all its descendants, from /proc: VmRSS summed
    (a page a forked loader worker shares with its parent counts in both: an upper bound) and Pss summed (each
    shared page split among its sharers: what the tree costs). (0, 0) once it is gone."""
    rss = pss = 0.0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Rss:", "Pss:")):
                    value = int(line.split()[1]) / 1024
                    rss, pss = (rss + value, pss) if line.startswith("Rss:") else (rss, pss + value)
        except (OSError, ValueError):            # the process ended while it was read
            pass
    return rss, pss


def watch(cmd, until, timeout_s=600, poll_s=POLL_S):
    """Run a command line (from this folder), reading its process tree's memory every poll_s, until a line of its
    output matches `until` (then the tree is killed, each process by its id) or it ends. Returns dict(seconds:
    to that line or the end, rss_mb, pss_mb: the peaks, output)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=HERE, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines, seen = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if re.search(until, line):
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rss = pss = 0.0
    while proc.poll() is None and not seen.is_set() and time.perf_counter() - start < timeout_s:
        now = tree_memory_mb(proc.pid)
        rss, pss = max(rss, now[0]), max(pss, now[1])
        seen.wait(poll_s)
    seconds = time.perf_counter() - start
    if proc.poll() is None:
        for p in reversed(process_tree(proc.pid)):   # the workers first, so none outlives its parent unseen
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()
    reader.join(5)
    if not seen.is_set():
        raise RuntimeError(f"{' '.join(map(str, cmd))}: ended without printing {until!r}:\n{''.join(lines)[-2000:]}")
    return dict(seconds=seconds, rss_mb=rss, pss_mb=pss, output="".join(lines))


def _loader_clips_per_s(root, workers, device):
    """Clips a second that train.py's loader serves from the training split (the paper preset's batches)."""
    import train
    run = SimpleNamespace(ddp=False, device=torch.device(device))
    clips = train.MotionClips(root, "train", data.CLIP_FRAMES, data.cache_folder(root, root))
    batches = iter(train.loader(clips, PAPER_BATCH, run, 0, 0, workers=workers))
    next(batches)                                                   # the workers' start-up is not throughput
    start = time.perf_counter()
    for _ in range(LOADER_BATCHES):
        next(batches)
    return LOADER_BATCHES * PAPER_BATCH / (time.perf_counter() - start)


def _paper_clips_per_s(root, device):
    """Clips a second the paper preset trains (forward, losses, backward, AdamW step; random weights, the
    stand-in head), PAPER_CPU_BATCH clips a step on the CPU, PAPER_BATCH on a GPU."""
    import train
    from unisinger import motion_losses
    batch_size = PAPER_CPU_BATCH if torch.device(device).type == "cpu" else PAPER_BATCH
    clips = train.MotionClips(root, "train", data.CLIP_FRAMES, data.cache_folder(root, root))
    batch = next(iter(torch.utils.data.DataLoader(clips, batch_size)))
    model = MotionCVAE(MotionConfig.preset("paper")).to(device)
    model.set_motion_stats(*clips.clips.index.motion_stats())
    head = stand_in_flame().to(device)
    face = head.region(head.masks["face"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
    motion, shape, music, voice = (batch[k].to(device) for k in ("motion", "shape", "music", "voice"))

    @torch.enable_grad()                     # best_times times under no_grad
    def step():
        with autocast:
            pred, mu, logvar = model(motion, shape, music, voice=voice)
        loss, _ = motion_losses(model, face, pred.float(), motion, shape, mu.float(), logvar.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    (seconds,), _ = best_times([step], device, 1, PAPER_STEPS)
    return batch_size / seconds


def bench_data(device="cpu"):
    """The motion stage on SingingHead-layout folders of DATA_SIZES sequences (files linked from the built-in
    set under new ids, builtin.linked_dataset): seconds from the command to its first training step and the
    process tree's peak memory, the first run (which indexes the set) and a second one (which reuses the index);
    then clips a second the loader serves against clips a second the paper preset trains, at the largest size."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in DATA_SIZES:
            root = builtin.linked_dataset(builtin.builtin_data(), Path(folder) / f"set{n}", n)
            for which in ("first run, indexes the set", "again, index reused"):
                seen = watch(["train.py", "--data", root, "--out", Path(folder) / f"run{n}", "--epochs", "1",
                              "--no-summary", "--device", device], FIRST_STEP)
                rows.append(dict(name=f"motion start-up, {n} sequences ({which})", ours_s=seen["seconds"], ref_s=None,
                                 ratio=None, ours_mem_mb=seen["rss_mb"], ref_mem_mb=None,
                                 note=f"command to first step; memory = peak VmRSS summed over the process and its "
                                      f"{train_workers()} loader worker(s) (Pss {seen['pss_mb']:.0f} MB)"))
        loader_rate = _loader_clips_per_s(root, train_workers(), device)
        train_rate = in_child(_paper_clips_per_s, root, device)
    rows.append(dict(name=f"loader vs paper-preset training, {n} sequences", ours_s=1 / loader_rate,
                     ref_s=1 / train_rate, ratio=loader_rate / train_rate, ours_mem_mb=None, ref_mem_mb=None,
                     note=f"s a clip; loader {loader_rate:.1f} clips/s ({train_workers()} worker(s), batches of "
                          f"{PAPER_BATCH}) vs paper preset {train_rate:.2f} clips/s ({device}); ratio > 1: the "
                          f"loader keeps up"))
    return rows


def train_workers():
    """The loader workers train.py gives a run by default here."""
    import train
    return train.default_workers()


def bench_render_data(device="cpu"):
    """The render stage preparing one person's RENDER_VIDEOS portrait videos of RENDER_VIDEO_SIZE² at
    RENDER_DATA_SIZE² (ffmpeg's test pattern, RENDER_VIDEO_S s each, linked under new ids; pickles from the built-in
    set): seconds from the command to its first step and the process tree's peak memory, then the growth per video."""
    rows, peaks = [], {}
    with tempfile.TemporaryDirectory() as folder:
        video = builtin.test_pattern_video(Path(folder) / "pattern.mp4", RENDER_VIDEO_SIZE, RENDER_VIDEO_S)
        for n in RENDER_VIDEOS:
            root = builtin.linked_dataset(builtin.builtin_data(), Path(folder) / f"person{n}", n, people=1,
                                          video=video)
            seen = watch(["train.py", "--stage", "render", "--data", root, "--out", Path(folder) / f"run{n}",
                          "--size", RENDER_DATA_SIZE, "--epochs", "1", "--no-summary", "--device", device],
                         FIRST_STEP)
            peaks[n] = seen["rss_mb"]
            rows.append(dict(name=f"render start-up, {n} videos of {RENDER_VIDEO_SIZE}² at {RENDER_DATA_SIZE}²",
                             ours_s=seen["seconds"],
                             ref_s=None, ratio=None, ours_mem_mb=seen["rss_mb"], ref_mem_mb=None,
                             note=f"command to first step, frames decoded and depth rendered once; memory = peak "
                                  f"VmRSS of the process tree (Pss {seen['pss_mb']:.0f} MB)"))
    (few, many), (low, high) = RENDER_VIDEOS, (peaks[n] for n in RENDER_VIDEOS)
    rows[-1]["note"] += f"; {(high - low) / (many - few):+.2f} MB a video from {few} to {many} (bar: 5 MB)"
    return rows


# ----------------------------------------------------------------------------- the run

PARTS = dict(flame=bench_flame, render=bench_render, preview=bench_preview, audio_w2v=bench_audio_w2v,
             audio_dsp=bench_audio_dsp, separation=bench_separation, motion=bench_motion, stream=bench_stream,
             metrics=bench_metrics, render_stage=bench_render_stage, data=bench_data, render_data=bench_render_data)
# rough seconds of each part on 2 idle CPU cores (the parts but stream took 7 min 12 s in all): they only
# weight the ETA between parts, which is rescaled by how fast the parts so far ran against them
EXPECTED_S = dict(flame=15, render=30, preview=35, audio_w2v=30, audio_dsp=30, separation=60, motion=50, stream=30,
                  metrics=50, render_stage=220, data=120, render_data=600)
ON_REQUEST = ("data", "render_data")   # minutes each, on folders of thousands of linked files: run by --only alone


def format_rows(rows):
    """Rows as the aligned table of metrics.format_table; '-' where a row has no value (no reference to compare
    with, or memory its note says is not measured)."""
    cell = lambda row, key, spec: "-" if row.get(key) is None else format(row[key], spec) if spec else str(row[key])
    return metrics.format_table([title for title, _, _ in COLUMNS],
                                [[cell(r, key, spec) for _, key, spec in COLUMNS] for r in rows],
                                left=[k for k, (_, _, spec) in enumerate(COLUMNS) if spec is None])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=list(PARTS), action="append",
                   help=f"run only these parts (default: all but {', '.join(ON_REQUEST)}, which run only when named)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    parts = args.only or [part for part in PARTS if part not in ON_REQUEST]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; {len(parts)} "
          f"part(s), about {format_duration(sum(EXPECTED_S[part] for part in parts))} on 2 idle CPU cores", flush=True)
    all_rows, spent, expected_done, start = [], 0.0, 0.0, time.time()
    for i, part in enumerate(parts, 1):
        print(f"\n[{i}/{len(parts)}] {part}: running (about {format_duration(EXPECTED_S[part])})", flush=True)
        t0 = time.time()
        rows = PARTS[part](args.device)
        spent, expected_done = spent + time.time() - t0, expected_done + EXPECTED_S[part]
        left = sum(EXPECTED_S[p] for p in parts[i:]) * spent / expected_done
        print(format_rows(rows), flush=True)
        print(f"[{i}/{len(parts)}] {part}: done in {format_duration(time.time() - t0)}"
              + (f" | ETA {format_duration(left)} for the rest" if i < len(parts) else ""), flush=True)
        all_rows += rows
    print(f"\nall parts in {format_duration(time.time() - start)} (ratio = reference s / ours s, > 1: ours is faster)")
    print(format_rows(all_rows))


if __name__ == "__main__":
    main()
