"""Benchmarks of the render stage: face-renderer inference speed and the portrait video's memory.

    python bench_render_stage.py            # prints the rows

Depends on torch, numpy, imageio and our flame.py, render.py, unisinger.py. No reference package: there is
no other implementation to compare against, so ref_s / ref_mem_mb stay None and the note says what is measured.
"""
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch

import render
from flame import Flame

BENCH_BATCH = 8                  # frames a batch on the CPU (the GPU bar is batch 32 in bf16)
BENCH_REPEATS = 2                # timed batches after one warm-up
SONG_SECONDS = (3, 60)           # portrait_video lengths whose peak memory is compared

PEAK_RSS_SCRIPT = """
import sys, numpy as np, torch
sys.path.insert(0, {here!r})
from flame import Flame
from unisinger import portrait_video
frames = {frames}
motion = np.zeros((frames, 59), np.float32)
motion[:, :10] = 0.5 * np.sin(np.arange(frames)[:, None] / 7.0 + np.arange(10))
motion[:, 56] = 0.15 * (1 + np.sin(np.arange(frames) / 3.0))                       # jaw opening and closing
voice = (0.1 * np.sin(np.arange(round(frames / 30 * 16000)) * 0.05)).astype(np.float32)
portrait_video({ckpt!r}, {image!r}, Flame.procedural(), np.zeros(100, np.float32), motion, {out!r}, audio=voice)
print(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024)  # peak RSS, MB
"""


def renderer_fps(preset, device="cpu", batch=BENCH_BATCH):
    """Seconds a frame for FLAME -> depth -> FaceRenderer at 256², batch frames at a time."""
    flame = Flame.procedural().to(device)
    generator = render.FaceRenderer(render.RendererConfig.preset(preset).channels).to(device).eval()
    motion = torch.zeros(batch, 59, device=device)
    reference = torch.zeros(batch, 3, render.IMAGE_SIZE, render.IMAGE_SIZE, device=device)
    shape = torch.zeros(100, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")

    def one_batch():
        with torch.no_grad():  # as portrait_video: meshes and depth in float32, the renderer in bf16 on a GPU
            depth = render.render_depth(flame.from_motion(shape, motion), flame.faces)
            with autocast:
                generator(depth, reference, torch.arange(batch, device=device))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    one_batch()
    start = time.perf_counter()
    for _ in range(BENCH_REPEATS):
        one_batch()
    return (time.perf_counter() - start) / (BENCH_REPEATS * batch)


def untrained_checkpoint(folder):
    """A tiny renderer checkpoint and a reference image: memory and speed do not depend on the weights."""
    cfg = render.RendererConfig.preset("tiny")
    ckpt, image = Path(folder) / "renderer.pt", Path(folder) / "reference.png"
    torch.save(dict(generator=render.FaceRenderer(cfg.channels).state_dict(),
                    renderer_config=asdict(cfg),
                    cam=list(render.DEFAULT_CAM)), ckpt)
    imageio.imwrite(image, np.full((render.IMAGE_SIZE, render.IMAGE_SIZE, 3), 128, np.uint8))
    return ckpt, image


def portrait_peak_rss(seconds, folder, ckpt, image):
    """Peak resident memory (MB) of a fresh Python process writing a portrait video of `seconds` seconds."""
    script = PEAK_RSS_SCRIPT.format(here=str(Path(__file__).parent), frames=seconds * render.FPS, ckpt=str(ckpt),
                                    image=str(image), out=str(Path(folder) / f"song_{seconds}s" / "portrait.mp4"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def bench_rows(device="cpu"):
    rows = []
    for preset in ("tiny", "paper"):
        seconds = renderer_fps(preset, device)
        rows.append(dict(name=f"render: FLAME -> depth -> renderer '{preset}' 256², batch {BENCH_BATCH}, {device}",
                         ours_s=seconds, ref_s=None, ratio=None, ours_mem_mb=None, ref_mem_mb=None,
                         note=f"{1 / seconds:.1f} frames/s, rasterization included"
                              + ("" if device != "cpu" else "; GPU bar (>= 300 frames/s, bf16, batch 32) "
                                                            "needs a GPU, not measured here")))
    with tempfile.TemporaryDirectory() as folder:
        ckpt, image = untrained_checkpoint(folder)
        peaks = {}
        for seconds in SONG_SECONDS:
            start = time.perf_counter()
            peaks[seconds] = portrait_peak_rss(seconds, folder, ckpt, image)
            rows.append(dict(name=f"render: portrait_video {seconds} s of motion (tiny, CPU, fresh process)",
                             ours_s=time.perf_counter() - start, ref_s=None, ratio=None, ours_mem_mb=peaks[seconds],
                             ref_mem_mb=None, note="peak RSS of the Python process (ffmpeg encoders apart)"))
        short, long = peaks[SONG_SECONDS[0]], peaks[SONG_SECONDS[-1]]
        rows[-1]["note"] += (f"; {SONG_SECONDS[-1]} s vs {SONG_SECONDS[0]} s: {100 * (long / short - 1):+.1f} % "
                             f"(bar: within 10 %)")
    return rows


if __name__ == "__main__":
    for row in bench_rows("cuda" if torch.cuda.is_available() else "cpu"):
        print(json.dumps(row))
