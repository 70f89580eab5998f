"""Benchmarks: our code side by side with the trusted references, in one run, as ratios, with memory.

    python bench.py                 # every table on the CPU
    python bench.py --only flame    # one table
    python bench.py --device cuda   # on a GPU (references stay where they run)

Each part lives in bench_<part>.py beside this file and returns rows of
    name, ours_s, ref_s, ratio (= ref_s / ours_s, > 1 means we are faster), ours_mem_mb, ref_mem_mb, note.
Depends on the reference packages of requirements-dev.txt. Timings belong here, never in the tests.
best_times, the timing loop every part uses, lives here.
"""
import argparse
import importlib
import time

import torch

PARTS = ["flame", "render", "audio_w2v", "audio_dsp", "motion", "stream", "metrics", "render_stage"]


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


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_table(rows):
    print(f"{'benchmark':44} {'ours s':>10} {'ref s':>10} {'ratio':>8} {'ours MB':>9} {'ref MB':>9}  note")
    for r in rows:
        print(f"{r['name']:44} {fmt(r.get('ours_s'), '10.4f')} {fmt(r.get('ref_s'), '10.4f')} "
              f"{fmt(r.get('ratio'), '8.2f')} {fmt(r.get('ours_mem_mb'), '9.1f')} {fmt(r.get('ref_mem_mb'), '9.1f')}"
              f"  {r.get('note', '')}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for part in args.only or PARTS:
        t0 = time.time()
        rows = importlib.import_module(f"bench_{part}").bench_rows(args.device)
        print(f"\n## {part} ({time.time() - t0:.0f} s)")
        print_table(rows)


if __name__ == "__main__":
    main()
