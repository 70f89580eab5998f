"""Benchmark of motion generation: frames of motion per second (audio encoding included) and a whole song.

Rows: an 8 s clip at batch 1 with the `paper` preset (wav2vec 2.0 base + the full-size CVAE, random weights:
speed does not depend on the values) and with `tiny`; a 3-minute song end to end (features, every window,
blending). The paper reports 50.8 frames/s for UniSinger (Table II) on an RTX 3090; that is the reference
column, a published figure, not a measurement here. Each case runs in a fresh process and reports its peak
resident memory (VmHWM, which includes the model; ru_maxrss would carry the parent's peak across fork+exec).
Run alone: python bench_motion.py [cpu|cuda]
"""
import json
import subprocess
import sys

PAPER_FPS = 50.849           # UniSinger's FPS in the paper's Table II
CASES = [("paper", 8.0, 1), ("tiny", 8.0, 1), ("paper", 180.0, 1)]

CHILD = r"""
import json, sys, time
import numpy as np, torch
from unisinger import MotionConfig, MotionCVAE, generate, SAMPLE_RATE
preset, seconds, samples, device = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = MotionCVAE(MotionConfig.preset(preset)).to(device).eval()
voice = (np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)
generate(model, voice[:8 * SAMPLE_RATE], voice[:8 * SAMPLE_RATE], None, samples)      # warm-up
best = float("inf")
for _ in range(3 if seconds <= 8 else 1):
    t0 = time.perf_counter()
    motion = generate(model, voice, voice, None, samples)
    if device == "cuda":
        torch.cuda.synchronize()
    best = min(best, time.perf_counter() - t0)
mem = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else
       int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024)
print(json.dumps(dict(seconds=best, frames=int(motion.shape[0] * motion.shape[1]), mem=mem)))
"""


def run_case(preset, seconds, samples, device):
    out = subprocess.run([sys.executable, "-c", CHILD, preset, str(seconds), str(samples), device],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_rows(device="cpu"):
    rows = []
    for preset, seconds, samples in CASES:
        r = run_case(preset, seconds, samples, device)
        fps = r["frames"] / r["seconds"]
        rows.append(dict(name=f"motion {preset}, {seconds:g} s audio, batch {samples}", ours_s=r["seconds"],
                         ref_s=r["frames"] / PAPER_FPS, ratio=fps / PAPER_FPS, ours_mem_mb=r["mem"], ref_mem_mb=None,
                         note=f"{device}; {fps:.0f} frames/s ({fps / 30:.1f}x real time); ref = the paper's "
                              f"{PAPER_FPS} frames/s; memory = peak RSS of the process incl. the model"))
    return rows


if __name__ == "__main__":
    from bench import format_table
    print(format_table(bench_rows(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
