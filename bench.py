"""Benchmarks: our code side by side with the trusted references, in one run, as ratios, with memory.

    python bench.py                 # every table on the CPU
    python bench.py --only flame    # one table
    python bench.py --device cuda   # on a GPU (references stay where they run)

Each part lives in bench_<part>.py beside this file and returns rows of
    name, ours_s, ref_s, ratio (= ref_s / ours_s, > 1 means we are faster), ours_mem_mb, ref_mem_mb, note.
Depends on the reference packages of requirements-dev.txt. Timings belong here, never in the tests.
best_times, the timing loop every part uses, lives here.

The whole run takes about 7 minutes on 2 idle CPU cores (7 min 12 s measured), most of it in the render stage's
part (about 3.5 minutes: the portrait video of 60 s of motion). Each part is announced as it starts, its rows are
printed as it ends with the time it took and an ETA for the rest, and one aligned table closes the run.
"""
import argparse
import importlib
import time

import torch

from progress import duration

PARTS = ["flame", "render", "audio_w2v", "audio_dsp", "motion", "stream", "metrics", "render_stage"]
# rough seconds of each part on 2 idle CPU cores (the parts but stream took 7 min 12 s in all): they only
# weight the ETA between parts, which is rescaled by how fast the parts so far ran against them
EXPECTED_S = dict(flame=15, render=30, audio_w2v=30, audio_dsp=30, motion=50, stream=30, metrics=50,
                  render_stage=220)
COLUMNS = [("benchmark", "name", None), ("ours s", "ours_s", ".4f"), ("ref s", "ref_s", ".4f"),
           ("ratio", "ratio", ".2f"), ("ours MB", "ours_mem_mb", ".1f"), ("ref MB", "ref_mem_mb", ".1f"),
           ("note", "note", None)]


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


def cell(row, key, spec):
    value = row.get(key)
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_table(rows):
    """Rows as text columns aligned to their widest cell (numbers right, text left); '-' where a row has no
    value (no reference to compare with, or memory its note says is not measured)."""
    cells = [[title for title, _, _ in COLUMNS]] + [[cell(r, key, spec) for _, key, spec in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for line in cells:
        parts = [c.ljust(w) if spec is None else c.rjust(w) for c, w, (_, _, spec) in zip(line, widths, COLUMNS)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    parts = args.only or PARTS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; {len(parts)} "
          f"part(s), about {duration(sum(EXPECTED_S[part] for part in parts))} on 2 idle CPU cores", flush=True)
    all_rows, spent, expected_done, start = [], 0.0, 0.0, time.time()
    for i, part in enumerate(parts, 1):
        print(f"\n[{i}/{len(parts)}] {part}: running (about {duration(EXPECTED_S[part])})", flush=True)
        t0 = time.time()
        rows = importlib.import_module(f"bench_{part}").bench_rows(args.device)
        spent, expected_done = spent + time.time() - t0, expected_done + EXPECTED_S[part]
        left = sum(EXPECTED_S[p] for p in parts[i:]) * spent / expected_done
        print(format_table(rows), flush=True)
        print(f"[{i}/{len(parts)}] {part}: done in {duration(time.time() - t0)}"
              + (f" | ETA {duration(left)} for the rest" if i < len(parts) else ""), flush=True)
        all_rows += rows
    print(f"\nall parts in {duration(time.time() - start)} (ratio = reference s / ours s, > 1: ours is faster)")
    print(format_table(all_rows))


if __name__ == "__main__":
    main()
