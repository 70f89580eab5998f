"""
Benchmark of the depth rasterizer (render.py) against trimesh ray casting on the procedural FLAME head.

Depends on render.py, flame.py and, as the reference, trimesh + rtree. Each measurement runs in a fresh
child process so that its peak memory (resident-size peak over the prepared inputs, or CUDA peak
allocation on a GPU) is its own. Times are wall-clock per frame (best of REPEATS); the note adds process
CPU seconds, which a machine shared with other jobs disturbs less. Run alone: python bench_render.py [cpu|cuda]
"""
import multiprocessing
import sys
import time

import numpy as np
import torch

SIZE = 256          # pixels per side
BATCH = 32          # frames rasterized per call in the throughput row
REPEATS = 5         # timed calls of ours; the best is kept
REF_FRAMES = 2      # frames ray cast by trimesh (seconds each)


def head_frames(n_frames, device):
    """(T, V, 3) projected vertices of the procedural head talking and nodding, and its faces."""
    import flame
    import render
    head = flame.Flame.procedural().to(device)
    t = torch.linspace(0, 1, n_frames, device=device)[:, None]
    motion = torch.zeros(n_frames, flame.MOTION_DIM, device=device)
    motion[:, :flame.N_EXPR] = 0.5 * torch.sin(6.28 * t + torch.arange(flame.N_EXPR, device=device))
    motion[:, flame.N_EXPR:flame.N_EXPR + 3] = 0.2 * torch.sin(6.28 * t)  # global pose
    motion[:, -3] = 0.15 * (1 + torch.sin(12.56 * t[:, 0]))               # jaw opening
    with torch.no_grad():
        verts = head.from_motion(torch.zeros(flame.N_SHAPE, device=device), motion)
    return render.project(verts, render.DEFAULT_CAM), head.faces


def _rss_mb(field):
    """VmRSS (now) or VmHWM (peak since _reset_peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # restarts VmHWM from the current resident size


def _ours(device, batch, threads, queue):
    import render
    torch.set_num_threads(threads)
    verts, faces = head_frames(batch, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    _reset_peak()
    base = _rss_mb("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    render.rasterize(verts, faces, SIZE)  # warm-up, inside the memory window
    sync()
    wall, cpu = [], []
    for _ in range(REPEATS):
        start, start_cpu = time.perf_counter(), time.process_time()
        render.rasterize(verts, faces, SIZE)
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    memory = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
              else _rss_mb("VmHWM") - base)
    queue.put((min(wall) / batch, min(cpu) / batch, memory))


def _reference(queue):
    import trimesh
    verts, faces = head_frames(REF_FRAMES, "cpu")
    verts, faces = verts.double().numpy(), faces.numpy()
    i, j = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    origins = np.stack([(j.ravel() + 0.5) / SIZE * 2 - 1, 1 - (i.ravel() + 0.5) / SIZE * 2,
                        np.full(SIZE * SIZE, -100.0)], 1)
    directions = np.tile([0.0, 0.0, 1.0], (SIZE * SIZE, 1))
    _reset_peak()
    base = _rss_mb("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    for frame in verts:
        # the triangles' bounding-box tree is rebuilt every frame because the vertices move
        mesh = trimesh.Trimesh(frame, faces, process=False)
        mesh.ray.intersects_id(origins, directions, multiple_hits=False, return_locations=True)
    queue.put(((time.perf_counter() - start) / len(verts), (time.process_time() - start_cpu) / len(verts),
               _rss_mb("VmHWM") - base))


def _in_child(target, *args):
    """Run target(*args, queue) in a fresh process and return what it put on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def bench_rows(device="cpu"):
    ref_s, ref_cpu, ref_mb = _in_child(_reference)
    rows = []
    for batch, threads in ((BATCH, 2), (1, 2), (BATCH, 1)):
        ours_s, ours_cpu, ours_mb = _in_child(_ours, device, batch, threads)
        rows.append(dict(
            name=f"rasterize {SIZE}x{SIZE} head, batch {batch}, {threads} thr ({device})", ours_s=ours_s, ref_s=ref_s,
            ratio=ref_s / ours_s, ours_mem_mb=ours_mb, ref_mem_mb=ref_mb,
            note=f"per frame; ours {1 / ours_s:.0f} fps, trimesh ray casting {1 / ref_s:.2f} fps; "
                 f"process CPU s/frame ours {ours_cpu:.4f}, trimesh {ref_cpu:.3f}"))
    return rows


if __name__ == "__main__":
    for row in bench_rows(sys.argv[1] if len(sys.argv) > 1 else "cpu"):
        print(row)
