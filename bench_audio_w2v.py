"""Benchmark of audio.py's Wav2Vec2 against transformers.Wav2Vec2Model (the reference, bench only).

Base config (768 wide, 12 layers), random weights saved once by transformers and loaded into ours through
Wav2Vec2.from_pretrained, 8 s of 16 kHz audio, batch 1, under torch.inference_mode. Time: best of N single
forwards after warm-up, ours and the reference alternating so that load from other processes hits both alike.
Memory: what one forward needs beyond the loaded model. CPU: the rise of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs before each measured call) above the resident set before the call,
after glibc's malloc_trim has handed freed heap pages back (else memory cached from earlier calls hides the
peak). Linux only.
CUDA: torch.cuda.max_memory_allocated above the allocation before the call.

Run alone: python bench_audio_w2v.py [cpu|cuda]
"""
import ctypes
import gc
import sys
import tempfile
from pathlib import Path

import torch

from audio import SAMPLE_RATE, Wav2Vec2, normalize_wave
from bench import best_times

CLIP_SECONDS = 8
WARMUP, REPEATS = 2, 7


def _proc_status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _forward_memory_mb(fn, device):
    """Memory one call of fn needs beyond what is resident/allocated before it (see module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _proc_status_mb("VmRSS")
    fn()
    return _proc_status_mb("VmHWM") - before


def bench_rows(device="cpu"):
    import transformers
    device = torch.device(device)
    torch.manual_seed(0)
    ref = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = Wav2Vec2.from_pretrained(tmp).eval()
    ref, ours = ref.to(device), ours.to(device)
    wave = normalize_wave(torch.randn(1, CLIP_SECONDS * SAMPLE_RATE)).to(device)  # (1, N)
    with torch.inference_mode():
        run_ours, run_ref = (lambda: ours(wave)), (lambda: ref(wave).last_hidden_state)
        diff = (run_ours() - run_ref()).abs().max().item()
        (ours_s, ref_s), _ = best_times([run_ours, run_ref], device, WARMUP, REPEATS)
        ours_mem, ref_mem = _forward_memory_mb(run_ours, device), _forward_memory_mb(run_ref, device)
    mem_kind = "CUDA peak allocated" if device.type == "cuda" else "peak RSS rise"
    note = (f"vs transformers.Wav2Vec2Model, base config, random weights, {CLIP_SECONDS} s audio, batch 1, "
            f"{torch.get_num_threads()} threads; max|diff| {diff:.1e}; best of {REPEATS}; "
            f"mem = one forward beyond the loaded model ({mem_kind})")
    return [dict(name="wav2vec2_base_8s", ours_s=ours_s, ref_s=ref_s, ratio=ref_s / ours_s, ours_mem_mb=ours_mem,
                 ref_mem_mb=ref_mem, note=note)]


if __name__ == "__main__":
    for row in bench_rows(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print(row)
