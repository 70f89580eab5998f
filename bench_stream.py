"""Benchmark of live streaming (unisinger.MotionStream): compute per second of audio, latency, and the
streamed take's quality against the offline take.

Speed rows, one per preset, random weights (speed does not depend on the values), a SONG_S song fed as fast
as possible in the case's chunks, in a fresh process with THREADS torch thread: ours = CPU seconds of compute
per second of audio (every pass: wav2vec 2.0, MFCC, decoder), ref = 1 s (real time), so ratio > 1 means faster
than real time. One thread is the conservative reading of the 2-core goal, and CPU time, unlike wall time,
does not count the waits of a shared machine (the note gives wall time too). Latency = lookahead + chunk (by
design) + the compute of a pass, mean and slowest, against the preset's goal; a pass must also finish within
one chunk, or the stream falls behind the song.
Quality row, with a trained checkpoint (out/motion/best.pt) and the built-in data: on the test split, the LVE
of the streamed take and of the offline take (same z) against the truth, and the largest frame-to-frame vertex
jump across the joins between pushes and elsewhere (the procedural head, head pose included).
Run alone: python bench_stream.py [cpu|cuda]
"""
import json
import subprocess
import sys

SONG_S = 20.0
THREADS = 1                 # torch threads: the goals are for 2 CPU cores, one is the conservative reading
# preset, frames each pass reads (window), lookahead frames, chunk ms, latency goal s
CASES = [("tiny", 240, 4, 100.0, 0.3), ("paper", 60, 9, 400.0, 1.0)]
QUALITY = dict(lookahead=6, chunk_ms=100.0)     # the stream's defaults

CHILD = r"""
import json, sys
import numpy as np, torch
from unisinger import MotionConfig, MotionCVAE, MotionStream, SAMPLE_RATE, stream_song
preset, window, lookahead, chunk_ms, seconds, threads, device = sys.argv[1:]
torch.set_num_threads(int(threads))
torch.manual_seed(0)
model = MotionCVAE(MotionConfig.preset(preset)).to(device).eval()
voice = (np.random.default_rng(0).standard_normal(int(float(seconds) * SAMPLE_RATE)) * 0.1).astype(np.float32)
stream_song(MotionStream(model, window=int(window), lookahead=int(lookahead)), voice[:2 * SAMPLE_RATE],
            chunk_ms=float(chunk_ms), realtime=False)                                     # warm-up
stream = MotionStream(model, window=int(window), lookahead=int(lookahead))
take, stats = stream_song(stream, voice, chunk_ms=float(chunk_ms), realtime=False)
print(json.dumps(dict(stats, frames=len(take), pass_cpu_max_s=max(stream.per_pass_cpu_s))))
"""


def run_case(preset, window, lookahead, chunk_ms, device):
    out = subprocess.run([sys.executable, "-c", CHILD, preset, str(window), str(lookahead), str(chunk_ms),
                          str(SONG_S), str(THREADS), device], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality_row(device):
    """Stream vs offline on the built-in test split with the default checkpoint, or a row saying what is missing."""
    import numpy as np
    import torch
    import data
    import metrics
    from flame import Flame
    from unisinger import DEFAULT_CHECKPOINT, SAMPLE_RATE, MotionStream, generate, load_checkpoint
    name = "stream vs offline, LVE on the test split"
    if not DEFAULT_CHECKPOINT.exists() or not data._is_current(data.BUILTIN_ROOT):
        return dict(name=name, note=f"needs {DEFAULT_CHECKPOINT} and the built-in data: run python train.py")
    model = load_checkpoint(DEFAULT_CHECKPOINT, device)
    head = Flame.procedural()
    regions = metrics.RegionMeshes(head)
    lve, join_jumps, other_jumps = {"stream": [], "offline": []}, [], []
    for item in data.SingingHead(data.BUILTIN_ROOT, "test"):
        shape = torch.from_numpy(item["shape"])
        truth = regions(shape, torch.from_numpy(item["motion"]))
        offline = generate(model, item["audio"], item["bgm"], item["shape"], seed=1)[0]
        stream = MotionStream(model, item["shape"], seed=1, lookahead=QUALITY["lookahead"])
        chunk = round(QUALITY["chunk_ms"] * SAMPLE_RATE / 1000)
        pieces, emitted = [], []                     # frames out after each push: the joins between pushes
        for lo in range(0, len(item["audio"]), chunk):
            pieces.append(stream.push(item["audio"][lo:lo + chunk], item["bgm"][lo:lo + chunk]))
            emitted.append(stream.emitted)
        take = np.concatenate(pieces + [stream.finish()])
        for key, motion in (("stream", take), ("offline", offline)):
            lve[key].append(metrics.lve(regions(shape, torch.from_numpy(motion))[None], truth, regions.lips)[0])
        verts = head.from_motion(shape, torch.from_numpy(take))                               # (T, V, 3)
        jump = (verts[1:] - verts[:-1]).norm(dim=-1).amax(-1).numpy() * 1000                  # (T-1,) mm
        emitted = np.array(emitted)
        joins = np.unique(emitted[(emitted > 0) & (emitted < len(take))]) - 1
        join_jumps.append(jump[joins])
        other_jumps.append(np.delete(jump, joins))
    ours, ref = np.mean(lve["stream"]), np.mean(lve["offline"])
    joins, others = np.concatenate(join_jumps), np.concatenate(other_jumps)
    return dict(name=name, note=f"{len(lve['stream'])} clips, lookahead {QUALITY['lookahead']} frames, chunk "
                f"{QUALITY['chunk_ms']:g} ms: LVE stream {ours:.3f} mm, offline {ref:.3f} mm ({ours / ref - 1:+.1%}, "
                f"goal <= +10 %); vertex jump at joins max {joins.max():.3f} / mean {joins.mean():.3f} mm, "
                f"elsewhere max {others.max():.3f} / mean {others.mean():.3f} mm")


def bench_rows(device="cpu"):
    rows = []
    for preset, window, lookahead, chunk_ms, goal in CASES:
        r = run_case(preset, window, lookahead, chunk_ms, device)
        mean, worst = r["algorithmic_s"] + r["pass_cpu_mean_s"], r["algorithmic_s"] + r["pass_cpu_max_s"]
        realtime = r["cpu_per_audio_s"] < 1 and r["pass_cpu_max_s"] < r["chunk_s"]
        rows.append(dict(
            name=f"stream {preset}, {window}-frame passes, {chunk_ms:g} ms chunks", ours_s=r["cpu_per_audio_s"],
            ref_s=1.0, ratio=1.0 / r["cpu_per_audio_s"],
            note=f"{device}, {THREADS} thread; CPU s of compute per s of audio (wall {r['compute_per_audio_s']:.3f}; "
                 f"ref = real time); latency {r['algorithmic_s'] * 1000:.0f} ms by design (lookahead {lookahead} "
                 f"frames + chunk) + a pass's CPU {r['pass_cpu_mean_s'] * 1000:.0f} ms mean / "
                 f"{r['pass_cpu_max_s'] * 1000:.0f} ms max = {mean:.2f} / {worst:.2f} s (goal <= {goal:g} s); "
                 f"real time: {'yes' if realtime else 'no'}"))
    rows.append(quality_row(device))
    return rows


if __name__ == "__main__":
    from bench import print_table
    print_table(bench_rows(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
