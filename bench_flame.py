"""Benchmark of flame.py: FLAME forward for one 8 s clip (240 frames) against smplx.lbs on the same arrays.

Depends on torch, numpy, flame and (bench only) smplx. `bench_rows(device)` returns the rows merged into
bench.py; run alone to print them: python bench_flame.py [cpu|cuda]

Time: best of REPEATS calls after WARMUP calls, the two methods' calls alternating, no autograd, float32, procedural head arrays.
Peak memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the call. On CPU,
the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs just before the
call) measured in a fresh interpreter per method, so neither method reuses pages the other freed; None
where /proc does not offer this (non-Linux).
"""
import subprocess
import sys
from pathlib import Path

import torch

from bench import best_times
from flame import Flame, procedural_head

FRAMES = 240          # one 8 s clip at 30 fps
WARMUP = 2
REPEATS = 7


def _setup(device, per_frame_shape):
    """Both methods' callables over identical arrays and parameters."""
    from smplx.lbs import lbs
    head = procedural_head(0)
    model = Flame.procedural().to(device)
    g = torch.Generator().manual_seed(0)
    shape = torch.randn(FRAMES if per_frame_shape else 1, 100, generator=g).to(device)
    motion = (torch.randn(FRAMES, 59, generator=g) * 0.2).to(device)
    t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device)
    betas = torch.cat([shape.expand(FRAMES, 100), motion[:, :50]], 1)
    pose = torch.cat([motion[:, 50:], torch.zeros(FRAMES, 6, device=device)], 1)
    ref_args = (t(head['v_template']), t(head['shapedirs']), t(head['posedirs'].reshape(-1, 36).T),
                t(head['J_regressor']), torch.tensor([-1, 0, 1, 1, 1], device=device), t(head['weights']))
    ours = lambda: model.from_motion(shape if per_frame_shape else shape[0], motion)
    ref = lambda: lbs(betas, pose, *ref_args)[0]
    return ours, ref


def _cpu_peak_mb(which, per_frame_shape):
    """Peak resident-set growth (MB) of one call, measured in a fresh interpreter; None if unavailable."""
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), '--cpu-peak', which, str(int(per_frame_shape))],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    return float(result.stdout.split()[-1]) if result.returncode == 0 and result.stdout.strip() else None


def _measure_cpu_peak(which, per_frame_shape):
    def status_kb(field):
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    fns = dict(zip(('ours', 'ref'), _setup('cpu', per_frame_shape)))
    with torch.no_grad():
        fns[which]()                                     # warm-up: one-off allocations are not the call's cost
        Path('/proc/self/clear_refs').write_text('5')    # resets VmHWM to the current RSS
        before = status_kb('VmRSS')
        fns[which]()
        print((status_kb('VmHWM') - before) / 1024)


def _gpu_peak_mb(fn, device):
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def bench_rows(device='cpu'):
    rows = []
    for per_frame_shape in (False, True):
        ours, ref = _setup(device, per_frame_shape)
        (ours_s, ref_s), _ = best_times((ours, ref), device, WARMUP, REPEATS)
        if torch.device(device).type == 'cuda':
            ours_mem, ref_mem = _gpu_peak_mb(ours, device), _gpu_peak_mb(ref, device)
        else:
            ours_mem, ref_mem = _cpu_peak_mb('ours', per_frame_shape), _cpu_peak_mb('ref', per_frame_shape)
        rows.append({
            'name': 'flame_forward_240' + ('_per_frame_shape' if per_frame_shape else ''),
            'ours_s': ours_s, 'ref_s': ref_s, 'ratio': ref_s / ours_s, 'ours_mem_mb': ours_mem, 'ref_mem_mb': ref_mem,
            'note': (f'{FRAMES} frames, procedural head V=5045, float32, best of {REPEATS}, {device}'
                     f'{"" if torch.device(device).type == "cuda" else f", {torch.get_num_threads()} threads"}; '
                     f'ref smplx.lbs; ' + ('a shape per frame' if per_frame_shape else 'one shape for the clip')),
        })
    return rows


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--cpu-peak':
        _measure_cpu_peak(sys.argv[2], bool(int(sys.argv[3])))
    else:
        for row in bench_rows(sys.argv[1] if len(sys.argv) > 1 else 'cpu'):
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
