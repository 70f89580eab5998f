"""Benchmark of the Table II evaluation (metrics.py) at the paper's test-set size, and of SSIM / PSNR.

Table II: 1 829 clips x 10 samples x 240 frames on the procedural FLAME head, random motions (not the model),
8 s of beat music per clip. Ours: RegionMeshes + the metric functions + audio.beats once per clip, timed on
N_CLIPS clips and extrapolated linearly to 1 829 (every clip costs the same). Reference: the direct route,
full FLAME meshes from Flame.from_motion with the same metric functions and librosa's HPSS / onset / beat
tracking, timed on REF_CLIPS clips and extrapolated. The bar: under 10 minutes on 2 CPU cores.
Each measurement runs in a child process with 1 torch thread (the bar allows 2 cores: 1 thread is the
conservative reading); memory is the child's peak resident set (ru_maxrss, interpreter, torch and the inputs
included): the growth over the timed calls reads 0 where the inputs' set-up peaked higher than the calls.

Depends on metrics.py, flame.py, audio.py and, as references, librosa and scikit-image.
Run alone: python bench_metrics.py
"""
import multiprocessing
import resource
import time

import numpy as np
import torch

TEST_CLIPS = 1829           # the paper's SingingHead test split
N_SAMPLES = 10
CLIP_FRAMES = 240
SAMPLE_RATE = 16_000
N_CLIPS = 50                # clips timed for our evaluation
REF_CLIPS = 2               # clips timed for the reference route (seconds each)
THREADS = 1                 # torch threads: on the shared 2-core machine a second thread only adds spinning
BAR_S = 600.0


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fake_clip(rng):
    """A clip of the benchmark: shape (100,), true motion (240,59), samples (10,240,59), beat music (N,)."""
    def motion(*lead):   # smooth random walk around zero, jaw opening positive
        m = np.cumsum(rng.normal(0, 0.02, lead + (CLIP_FRAMES, 59)), axis=-2)
        m[..., 56] = np.abs(m[..., 56])
        return m.astype(np.float32)

    n = 8 * SAMPLE_RATE
    music = 0.05 * rng.normal(size=n)
    for start in np.arange(rng.uniform(0, 0.5), 8, 0.5) * SAMPLE_RATE:    # 120 BPM decaying clicks
        s = int(start)
        music[s:s + 800] += np.exp(-np.arange(min(800, n - s)) / 120)
    return rng.normal(0, 0.5, 100).astype(np.float32), motion(), motion(N_SAMPLES), music.astype(np.float32)


def librosa_beats(y):
    import librosa
    percussive = librosa.effects.percussive(y)
    onset = librosa.onset.onset_strength(y=percussive, sr=SAMPLE_RATE, aggregate=np.median)
    return librosa.beat.beat_track(onset_envelope=onset, sr=SAMPLE_RATE, hop_length=512)[1]


class FullMeshes:
    """The direct route: whole FLAME meshes from Flame.from_motion, with the same region indices."""

    def __init__(self, flame):
        self.flame = flame
        masks = flame.masks
        self.lips, self.face, self.upper_face = masks["lips"], masks["face"], masks["upper_face"]
        self.forehead_eyes = torch.cat([masks["forehead"], masks["eye_region"]])

    def __call__(self, shape, motion):
        import metrics
        return metrics.motion_meshes(self.flame, shape, motion)

    def landmarks(self, verts):
        return self.flame.landmarks(verts)

    def posed_landmarks(self, shape, motion):
        return self.flame.landmarks(self.flame.from_motion(shape, motion))


def time_table2(route, n_clips, queue):
    """Child process: wall seconds for the metrics (meshes included) and for the beats of n_clips clips, the CPU
    seconds of both (what an idle core would take: the wall time inflates when others share the machine), MB."""
    import metrics
    from audio import beats
    from flame import Flame
    torch.set_num_threads(THREADS)
    flame = Flame.procedural()
    regions = metrics.RegionMeshes(flame) if route == "ours" else FullMeshes(flame)
    find_beats = (lambda y: beats(y, SAMPLE_RATE)[0]) if route == "ours" else librosa_beats
    rng = np.random.default_rng(0)
    clips = [fake_clip(rng) for _ in range(n_clips)]
    metrics.clip_motion_scores(regions, *clips[0][:3], {"BA": find_beats(clips[0][3])})        # warm-up
    t_beats = t_metrics = 0.0
    cpu = time.process_time()
    for shape, gt, samples, music in clips:
        t0 = time.perf_counter()
        music_frames = find_beats(music)
        t1 = time.perf_counter()
        metrics.clip_motion_scores(regions, shape, gt, samples, {"BA": music_frames})
        t_beats += t1 - t0
        t_metrics += time.perf_counter() - t1
    queue.put((t_metrics, t_beats, time.process_time() - cpu, peak_rss_mb()))


def time_ssim_psnr(route, queue):
    """Child process: seconds for SSIM + PSNR of 40 frame pairs of 256 x 256 (one clip's every 6th frame)."""
    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (40, 256, 256, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    t0 = time.perf_counter()
    if route == "ours":
        import metrics
        metrics.ssim(a, b), metrics.psnr(a, b)
    else:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
        for x, y in zip(a, b):
            structural_similarity(x, y, channel_axis=-1, data_range=255, gaussian_weights=False)
            peak_signal_noise_ratio(x, y, data_range=255)
    queue.put((time.perf_counter() - t0, peak_rss_mb()))


def in_child(target, *args):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=args + (queue,))
    p.start()
    out = queue.get()
    p.join()
    return out


def bench_rows(device="cpu"):
    """Rows for bench.py (CPU only: the evaluation runs where the metrics run, on the CPU)."""
    scale, ref_scale = TEST_CLIPS / N_CLIPS, TEST_CLIPS / REF_CLIPS
    ours_metrics, ours_beats, ours_cpu, ours_mem = in_child(time_table2, "ours", N_CLIPS)
    ref_metrics, ref_beats, _, ref_mem = in_child(time_table2, "ref", REF_CLIPS)
    ours_total, ref_total = (ours_metrics + ours_beats) * scale, (ref_metrics + ref_beats) * ref_scale
    ssim_ours, ssim_ours_mem = in_child(time_ssim_psnr, "ours")
    ssim_ref, ssim_ref_mem = in_child(time_ssim_psnr, "ref")
    verdict = "meets" if ours_total < BAR_S else "MISSES"
    return [
        dict(name="Table II eval, 1829 clips x 10 samples", ours_s=ours_total, ref_s=ref_total,
             ratio=ref_total / ours_total, ours_mem_mb=ours_mem, ref_mem_mb=ref_mem,
             note=f"{verdict} the {BAR_S:.0f} s bar on {THREADS} thread (CPU time {ours_cpu * scale:.0f} s); "
                  f"extrapolated from {N_CLIPS} clips "
                  f"(ref: full meshes + librosa beats, from {REF_CLIPS}); beats are "
                  f"{100 * ours_beats / (ours_metrics + ours_beats):.0f}% of ours, computed once per clip and "
                  f"shared by all rows of a run; MB = peak RSS of the child process"),
        dict(name="  of which meshes + metrics", ours_s=ours_metrics * scale, ref_s=ref_metrics * ref_scale,
             ratio=ref_metrics * ref_scale / (ours_metrics * scale), ours_mem_mb=None, ref_mem_mb=None,
             note="RegionMeshes (1808 of 5045 vertices, jaw-only skinning) vs Flame.from_motion; memory in the row above"),
        dict(name="  of which music beats (once per clip)", ours_s=ours_beats * scale, ref_s=ref_beats * ref_scale,
             ratio=ref_beats * ref_scale / (ours_beats * scale), ours_mem_mb=None, ref_mem_mb=None,
             note="audio.beats vs librosa HPSS + onset median + beat_track; memory in the first row"),
        dict(name="SSIM + PSNR, 40 frames 256x256 RGB", ours_s=ssim_ours, ref_s=ssim_ref, ratio=ssim_ref / ssim_ours,
             ours_mem_mb=ssim_ours_mem, ref_mem_mb=ssim_ref_mem,
             note="ref: scikit-image, frame by frame; MB = peak RSS of the child process"),
    ]


if __name__ == "__main__":
    for row in bench_rows():
        print(row)
