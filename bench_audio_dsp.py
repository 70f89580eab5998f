"""Benchmark of audio.py against librosa on 8 s of 16 kHz music: MFCC (warm and first call in a fresh
process), the beat pipeline (hpss -> onset strength -> beat tracking) and its two halves.

Depends on numpy, torch, our audio.py and (bench only) librosa. `bench_rows(device)` returns the rows merged into
bench.py; run alone to print them: python bench_audio.py [cpu|cuda]

Time: best of REPEATS calls after WARMUP calls, or of as many as MIN_SECONDS allow, ours and librosa's calls
alternating so machine load hits both alike; the note adds the best process CPU time of each. On 2 cores the
thread pools of the two sides (torch's OpenMP, numpy's OpenBLAS) keep spinning after their calls and slow the
other side's next call: the milliseconds of MFCC move by 2-3x with it. The beat pipeline is numpy on the CPU
for any device; on CUDA only the MFCC row moves to the GPU.
Peak memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the call. On CPU, the
growth of the peak resident set (VmHWM, reset through /proc/self/clear_refs just before a warm call) in a fresh
interpreter per method, so neither reuses pages the other freed, with malloc returning every block over 64 KiB
to the system so pages freed by the warm-up call cannot hide the working set; None where /proc does not
offer this.
First call: a fresh interpreter imports the module (torch for ours; librosa's import is lazy) and times the
first mfcc call on its own; both import times are given in the note.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import audio
from bench import best_times

SECONDS = 8.0
SR = audio.SAMPLE_RATE
WARMUP = 2
REPEATS = 7
MIN_SECONDS = 3.0      # each comparison keeps alternating calls this long: the MFCC takes milliseconds
HERE = Path(__file__).resolve().parent


def _music(seconds=SECONDS, bpm=100.0):
    """Kick / snare / hi-hat on a 100 bpm grid over a sine melody, float32 (N,)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    y = np.zeros_like(t)
    beat = 60.0 / bpm
    for k, start in enumerate(np.arange(0.0, seconds, beat / 2)):
        i = int(start * SR)
        tt = np.arange(min(len(t) - i, 4000)) / SR
        drum = 0.15 * rng.standard_normal(len(tt)) * np.exp(-tt * 80)
        if k % 4 == 0:
            drum += np.sin(2 * np.pi * (60 + 80 * np.exp(-tt * 30)) * tt) * np.exp(-tt * 12)
        if k % 4 == 2:
            drum += 0.5 * rng.standard_normal(len(tt)) * np.exp(-tt * 25)
        y[i:i + len(tt)] += drum
    notes = 220.0 * 2 ** (rng.integers(0, 12, int(seconds / beat) + 1) / 12)
    y += 0.2 * np.sin(2 * np.pi * np.cumsum(notes[(t / beat).astype(int)]) / SR)
    return (0.3 * y).astype(np.float32)


def _methods(device="cpu"):
    """name -> (ours, librosa's) callables on the same 8 s of music."""
    import librosa
    y = _music()
    y_device = torch.from_numpy(y).to(device)
    percussive = librosa.effects.hpss(y)[1]

    def librosa_beats():
        envelope = librosa.onset.onset_strength(y=librosa.effects.hpss(y)[1], sr=SR, aggregate=np.median)
        return librosa.beat.beat_track(onset_envelope=envelope, sr=SR)[1]

    def librosa_onset_beats():
        envelope = librosa.onset.onset_strength(y=percussive, sr=SR, aggregate=np.median)
        return librosa.beat.beat_track(onset_envelope=envelope, sr=SR)[1]

    return {
        "mfcc": (lambda: audio.mfcc(y_device),
                 lambda: librosa.feature.mfcc(y=y, sr=SR, n_mfcc=64, n_fft=2048, hop_length=512, n_mels=128)),
        "beats": (lambda: audio.beats(y), librosa_beats),
        "hpss": (lambda: audio.hpss(y), lambda: librosa.effects.hpss(y)),
        "onset_strength+beat_track": (
            lambda: audio.beat_track(audio.onset_strength(percussive, sr=SR))[1], librosa_onset_beats),
    }


def _status_mb(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _peak_here(name, which):
    """Run in a fresh interpreter: peak RSS growth (MB) of one warm call."""
    fn = _methods()[name][which]
    fn()
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return _status_mb("VmHWM") - before


def _cpu_peak_mb(name, which):
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--peak", name, str(which)], cwd=HERE, env=env,
                         capture_output=True, text=True, check=True).stdout
    return round(float(out.split()[-1]), 1)


def _cuda_peak_mb(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)


FIRST_CALL = {
    "ours": ("import audio", "audio.mfcc(y)"),
    "librosa": ("import librosa",
                "librosa.feature.mfcc(y=y, sr=16000, n_mfcc=64, n_fft=2048, hop_length=512, n_mels=128)"),
}


def _first_call(which):
    """(import s, first mfcc call s) in a fresh interpreter."""
    do_import, call = FIRST_CALL[which]
    code = (f"import json, time, numpy as np\n"
            f"y = np.random.default_rng(0).standard_normal({int(SECONDS * SR)}).astype(np.float32)\n"
            f"t0 = time.perf_counter()\n{do_import}\nt1 = time.perf_counter()\n{call}\n"
            f"t2 = time.perf_counter()\nprint(json.dumps([t1 - t0, t2 - t1]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_rows(device="cpu"):
    device = str(device)
    methods = _methods(device)
    rows = []
    for name, (ours, ref) in methods.items():
        on_gpu = name == "mfcc" and torch.device(device).type == "cuda"
        where = device if on_gpu else "cpu"
        (ours_s, ref_s), (ours_cpu, ref_cpu) = best_times([ours, ref], where, WARMUP, REPEATS, MIN_SECONDS)
        note = f"ours on {where} vs librosa 0.11 warm on cpu; best CPU time " \
               f"{ours_cpu * 1e3:.1f} vs {ref_cpu * 1e3:.1f} ms"
        if name == "beats":
            note += "; identical beat frames" if np.array_equal(ours()[0], ref()) else "; BEAT FRAMES DIFFER"
        rows.append(dict(
            name=f"audio.{name} (8 s, 16 kHz)", ours_s=ours_s, ref_s=ref_s, ratio=ref_s / ours_s,
            ours_mem_mb=_cuda_peak_mb(ours) if on_gpu else _cpu_peak_mb(name, 0),
            ref_mem_mb=_cpu_peak_mb(name, 1), note=note))
    ours_import, ours_first = _first_call("ours")
    ref_import, ref_first = _first_call("librosa")
    rows.append(dict(name="audio.mfcc first call in a fresh process (8 s)", ours_s=ours_first,
                     ref_s=ref_first, ratio=ref_first / ours_first, ours_mem_mb=None, ref_mem_mb=None,
                     note=f"cpu; import audio (with torch) {ours_import:.2f} s, import librosa "
                          f"{ref_import:.2f} s, not counted in the call"))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        print(_peak_here(sys.argv[2], int(sys.argv[3])))
    else:
        for row in bench_rows(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
            print(f"{row['name']:<52} ours {row['ours_s'] * 1e3:8.1f} ms  ref {row['ref_s'] * 1e3:8.1f} ms  "
                  f"x{row['ratio']:6.2f}  mem {row['ours_mem_mb']} / {row['ref_mem_mb']} MB  {row['note']}")
