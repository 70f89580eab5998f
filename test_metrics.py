"""Tests of metrics.py: hand-computed cases, scikit-image / librosa / scipy references, weight-file layouts.

Run alone: python -m pytest -q test_metrics.py
"""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import metrics


def offset_by(x, idx, distance, gen):
    """Move every vertex in idx of x (...,V,3) by exactly `distance` along a random direction."""
    d = torch.randn(x[..., idx, :].shape, generator=gen, dtype=x.dtype)
    out = x.clone()
    out[..., idx, :] += distance * d / d.norm(dim=-1, keepdim=True)
    return out


def test_lve_of_constant_2mm_lip_offset_is_2():
    gen = torch.Generator().manual_seed(0)
    gt = torch.randn(20, 50, 3, generator=gen, dtype=torch.float64) * 0.1                 # metres
    lips = torch.arange(10, 30)
    pred = offset_by(gt, lips, 0.002, gen)[None]
    pred[..., :10, :] += 0.5                        # errors outside the lips must not count
    mean, best = metrics.lve(pred, gt, lips)
    assert mean == pytest.approx(2.0, abs=1e-9) and best == pytest.approx(2.0, abs=1e-9)
    samples = torch.stack([offset_by(gt, lips, mm / 1000, gen) for mm in (1.0, 2.0, 4.0)])
    mean, best = metrics.lve(samples, gt, lips)
    assert mean == pytest.approx(7 / 3, abs=1e-9) and best == pytest.approx(1.0, abs=1e-9)


def test_lve_takes_the_largest_lip_error_of_each_frame():
    gt = torch.zeros(2, 3, 3, dtype=torch.float64)
    pred = gt.clone()[None]
    pred[0, 0, 0, 0] = 0.003                       # frame 0: errors (3, 0, 0) mm
    pred[0, 1, 1, 1] = 0.001                       # frame 1: errors (0, 1, 0) mm
    assert metrics.lve(pred, gt, torch.arange(3))[0] == pytest.approx(2.0)
    assert metrics.fve(pred, gt, torch.arange(3))[0] == pytest.approx(4 / 6)


def test_fve_of_constant_offsets_is_the_offset_mean_and_best():
    gen = torch.Generator().manual_seed(1)
    gt = torch.randn(15, 40, 3, generator=gen, dtype=torch.float64) * 0.1
    face = torch.arange(5, 35)
    samples = torch.stack([offset_by(gt, face, mm / 1000, gen) for mm in (0.5, 1.5)])
    mean, best = metrics.fve(samples, gt, face)
    assert mean == pytest.approx(1.0, abs=1e-9) and best == pytest.approx(0.5, abs=1e-9)


def test_fdd_hand_value_zero_for_identical_and_signed():
    neutral = torch.zeros(1, 3, dtype=torch.float64)
    gt = torch.zeros(2, 1, 3, dtype=torch.float64)
    gt[1, 0, 0] = 0.002                            # squared displacement 0 then 4 mm^2: std 2 mm^2
    still = torch.zeros(1, 2, 1, 3, dtype=torch.float64)
    idx = torch.tensor([0])
    assert metrics.fdd(still, gt, idx, neutral) == pytest.approx(2.0)
    gen = torch.Generator().manual_seed(2)
    neutral = torch.randn(30, 3, generator=gen, dtype=torch.float64) * 0.1
    gt = neutral + 0.003 * torch.randn(50, 30, 3, generator=gen, dtype=torch.float64)
    idx = torch.arange(0, 30, 2)
    for variant in ("displacement", "absolute"):
        assert metrics.fdd(gt[None].repeat(3, 1, 1, 1), gt, idx, neutral, variant) == pytest.approx(0, abs=1e-9)
    damped = neutral + 0.5 * (gt - neutral)
    lively = neutral + 2.0 * (gt - neutral)
    assert metrics.fdd(damped[None], gt, idx, neutral) > 0 > metrics.fdd(lively[None], gt, idx, neutral)
    both = torch.stack([damped, lively])           # samples average: std_gt - mean(std_damped, std_lively)
    expected = np.mean([metrics.fdd(s[None], gt, idx, neutral) for s in both])
    assert metrics.fdd(both, gt, idx, neutral) == pytest.approx(expected)


def test_ppe_of_known_pose_offset():
    gt = torch.randn(40, 6, dtype=torch.float64)
    offset = torch.tensor([0.03, 0.04, 0, 0, 0, 0], dtype=torch.float64)
    pred = torch.stack([gt + offset, gt - 2 * offset])
    assert metrics.ppe(pred, gt) == pytest.approx((0.05 + 0.10) / 2)


def test_diversity_zero_for_identical_and_exact_for_constant_shifts():
    base = torch.randn(30, 68, 3, dtype=torch.float64)
    assert metrics.diversity(base[None].repeat(4, 1, 1, 1)) == pytest.approx(0.0, abs=1e-12)
    n = base.numel()
    samples = torch.stack([base, base + 0.5, base - 1.0])
    expected = (0.5 + 1.0 + 1.5) / 3 * np.sqrt(n)   # pairs (0,1), (0,2), (1,2)
    assert metrics.diversity(samples) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(metrics.diversity(base[None]))


def pose_with_speed_minima_at(beats, n_frames, period):
    """(T,6) pose moving along one axis with speed 1.5 - cos(2 pi (t - beats[0]) / period): minima at the beats."""
    t = np.arange(n_frames - 1)
    speed = 1.5 - np.cos(2 * np.pi * (t - beats[0]) / period)
    pose = np.zeros((n_frames, 6))
    pose[1:, 2] = np.cumsum(speed)
    return pose


def test_beat_align_near_one_on_beats_and_lower_when_shifted():
    period = 16
    beats = np.arange(8, 232, period)
    on = metrics.motion_beats(pose_with_speed_minima_at(beats, 240, period))
    off = metrics.motion_beats(pose_with_speed_minima_at(beats + 6, 240, period))
    assert metrics.beat_align(on, beats) > 0.99
    assert metrics.beat_align(off, beats) == pytest.approx(np.exp(-36 / 18), abs=0.02)
    points = np.repeat(pose_with_speed_minima_at(beats, 240, period)[:, None, :3], 68, axis=1)   # (T,68,3)
    assert metrics.beat_align(metrics.motion_beats(points), beats) > 0.99


def test_beat_align_matches_direct_formula_on_librosa_beats():
    import librosa
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import argrelextrema
    sr = 16000
    clicks = librosa.clicks(times=np.arange(0.25, 8, 0.5), sr=sr, length=8 * sr)
    _, music = librosa.beat.beat_track(y=clicks, sr=sr, hop_length=512)
    assert len(music) > 8
    rng = np.random.default_rng(3)
    for trial in range(3):
        pose = np.cumsum(rng.normal(size=(240, 6)), axis=0)
        speed = np.sqrt(((pose[1:] - pose[:-1]) ** 2).sum(axis=1))
        expected_beats = argrelextrema(gaussian_filter1d(speed, 5), np.less)[0]
        ours = metrics.motion_beats(pose)
        np.testing.assert_array_equal(ours, expected_beats)
        total = 0.0
        for b in music:
            total += np.exp(-np.min((expected_beats - b) ** 2) / 2 / 9)
        assert metrics.beat_align(ours, music) == pytest.approx(total / len(music), abs=1e-12)


@pytest.mark.parametrize("size", [(7, 7), (32, 48), (33, 57), (64, 64)])
def test_ssim_and_psnr_match_scikit_image(size):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    rng = np.random.default_rng(sum(size))
    h, w = size
    noise = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], -1)
    structured = np.clip(ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    a = np.stack([noise[0], ramp.astype(np.uint8), structured])
    b = np.stack([noise[1], structured, 255 - structured])
    ours_ssim, ours_psnr = metrics.ssim(a, b), metrics.psnr(a, b)
    for i in range(len(a)):
        ref = structural_similarity(a[i], b[i], channel_axis=-1, data_range=255, gaussian_weights=False)
        assert abs(ours_ssim[i] - ref) <= 1e-4
        assert abs(ours_psnr[i] - peak_signal_noise_ratio(a[i], b[i], data_range=255)) <= 1e-4
    single = metrics.ssim(a[1].astype(np.float32), b[1].astype(np.float32))
    assert single == pytest.approx(ours_ssim[1], abs=1e-6)


def test_lmd_hand_case_centres_each_set():
    rng = np.random.default_rng(4)
    gt = rng.normal(size=(5, 68, 2)) * 50
    assert metrics.lmd(gt + np.array([7.0, -3.0]), gt) == pytest.approx(0, abs=1e-9)
    pred = gt.copy()
    pred[:, 48:68] += np.array([3.0, 4.0])          # 5 px mouth move; the face mean moves by 5 * 20/68
    assert metrics.lmd(pred, gt, mouth=True) == pytest.approx(5 * 48 / 68)
    assert metrics.lmd(pred, gt) == pytest.approx((20 * 5 * 48 / 68 + 48 * 5 * 20 / 68) / 68)


def test_frechet_distance_matches_direct_scipy():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T                      # tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(root1 @ s2 @ root1)).real
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert metrics.fid(a, b) == pytest.approx(expected, rel=1e-8)
    assert metrics.fid(a, a) == pytest.approx(0, abs=1e-6)


def test_cpbd_edge_width_equals_ramp_length_and_scores_order_blur():
    from scipy.ndimage import gaussian_filter
    for length in (4, 10):          # even: one column has the steepest slope (thinning needs a strict maximum)
        profile = np.concatenate([np.zeros(30), 100 - 100 * np.cos(np.pi * np.arange(1, length) / length) / 2 - 50,
                                  np.full(30, 100.0)])
        img = np.tile(profile + 20, (12, 1))
        widths = metrics.cpbd_edge_widths(img)
        assert set(np.unique(widths[widths > 0])) == {length}
    x = np.arange(128)

    def cover(lo, hi):                              # share of each pixel inside [lo, hi]: edges through pixel centres
        return np.clip(x - lo + 0.5, 0, 1) * np.clip(hi - x + 0.5, 0, 1)

    img = 200 * np.tile(cover(64, 200), (128, 1)) + 120 * np.outer(cover(40, 90), cover(20, 50))
    blurred = np.round(gaussian_filter(img, 4.0))  # rounded to grey levels, as decoded frames are
    half = img.copy()
    half[:, :58] = blurred[:, :58]                  # the box's edges blurred, the step at column 64 sharp
    scores = [metrics.cpbd(frame) for frame in (img, half, blurred)]
    assert scores[0] == 1.0 and 0.1 < scores[1] < 0.9 and scores[2] == 0.0
    assert metrics.cpbd(np.full((128, 128), 50.0)) == 0.0


def inception_layout():
    """The FID weights file's convolution layout, written out from the Inception-v3 paper's tables / TF graph:
    module name -> (in, out, kernel h, kernel w)."""
    convs = {"Conv2d_1a_3x3": (3, 32, 3, 3), "Conv2d_2a_3x3": (32, 32, 3, 3), "Conv2d_2b_3x3": (32, 64, 3, 3),
             "Conv2d_3b_1x1": (64, 80, 1, 1), "Conv2d_4a_3x3": (80, 192, 3, 3)}
    for name, cin, pool in (("5b", 192, 32), ("5c", 256, 64), ("5d", 288, 64)):
        convs.update({f"Mixed_{name}.branch1x1": (cin, 64, 1, 1), f"Mixed_{name}.branch5x5_1": (cin, 48, 1, 1),
                      f"Mixed_{name}.branch5x5_2": (48, 64, 5, 5), f"Mixed_{name}.branch3x3dbl_1": (cin, 64, 1, 1),
                      f"Mixed_{name}.branch3x3dbl_2": (64, 96, 3, 3), f"Mixed_{name}.branch3x3dbl_3": (96, 96, 3, 3),
                      f"Mixed_{name}.branch_pool": (cin, pool, 1, 1)})
    convs.update({"Mixed_6a.branch3x3": (288, 384, 3, 3), "Mixed_6a.branch3x3dbl_1": (288, 64, 1, 1),
                  "Mixed_6a.branch3x3dbl_2": (64, 96, 3, 3), "Mixed_6a.branch3x3dbl_3": (96, 96, 3, 3)})
    for name, c in (("6b", 128), ("6c", 160), ("6d", 160), ("6e", 192)):
        m = f"Mixed_{name}."
        convs.update({m + "branch1x1": (768, 192, 1, 1), m + "branch7x7_1": (768, c, 1, 1),
                      m + "branch7x7_2": (c, c, 1, 7), m + "branch7x7_3": (c, 192, 7, 1),
                      m + "branch7x7dbl_1": (768, c, 1, 1), m + "branch7x7dbl_2": (c, c, 7, 1),
                      m + "branch7x7dbl_3": (c, c, 1, 7), m + "branch7x7dbl_4": (c, c, 7, 1),
                      m + "branch7x7dbl_5": (c, 192, 1, 7), m + "branch_pool": (768, 192, 1, 1)})
    convs.update({"Mixed_7a.branch3x3_1": (768, 192, 1, 1), "Mixed_7a.branch3x3_2": (192, 320, 3, 3),
                  "Mixed_7a.branch7x7x3_1": (768, 192, 1, 1), "Mixed_7a.branch7x7x3_2": (192, 192, 1, 7),
                  "Mixed_7a.branch7x7x3_3": (192, 192, 7, 1), "Mixed_7a.branch7x7x3_4": (192, 192, 3, 3)})
    for name, cin in (("7b", 1280), ("7c", 2048)):
        m = f"Mixed_{name}."
        convs.update({m + "branch1x1": (cin, 320, 1, 1), m + "branch3x3_1": (cin, 384, 1, 1),
                      m + "branch3x3_2a": (384, 384, 1, 3), m + "branch3x3_2b": (384, 384, 3, 1),
                      m + "branch3x3dbl_1": (cin, 448, 1, 1), m + "branch3x3dbl_2": (448, 384, 3, 3),
                      m + "branch3x3dbl_3a": (384, 384, 1, 3), m + "branch3x3dbl_3b": (384, 384, 3, 1),
                      m + "branch_pool": (cin, 192, 1, 1)})
    return convs


def test_inception_loads_fid_weights_layout_and_gives_2048_features(tmp_path):
    gen = torch.Generator().manual_seed(7)
    state = {"fc.weight": torch.randn(1008, 2048, generator=gen), "fc.bias": torch.zeros(1008)}
    for name, (cin, cout, kh, kw) in inception_layout().items():
        state[f"{name}.conv.weight"] = torch.randn(cout, cin, kh, kw, generator=gen) / np.sqrt(cin * kh * kw)
        state[f"{name}.bn.weight"] = 1 + 0.1 * torch.rand(cout, generator=gen)
        state[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=gen)
        state[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=gen)
        state[f"{name}.bn.running_var"] = 1 + torch.rand(cout, generator=gen)
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    path = tmp_path / metrics.INCEPTION_FILE
    torch.save(state, path)
    net = metrics.InceptionV3.load(path)
    loaded = net.state_dict()
    for key, value in loaded.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key
    assert len([k for k in loaded if not k.endswith("num_batches_tracked")]) == len(state) - 2 - len(inception_layout())
    with torch.no_grad():
        feats = net(torch.rand(2, 3, 64, 80, generator=gen))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
    del state["Mixed_6c.branch7x7_2.conv.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="Mixed_6c.branch7x7_2"):
        metrics.InceptionV3.load(path)


def alexnet_and_lpips_states(gen):
    trunk_layout = {0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3), 8: (384, 256, 3), 10: (256, 256, 3)}
    trunk = {}
    for i, (cin, cout, k) in trunk_layout.items():
        trunk[f"features.{i}.weight"] = torch.randn(cout, cin, k, k, generator=gen) / np.sqrt(cin * k * k)
        trunk[f"features.{i}.bias"] = 0.1 * torch.randn(cout, generator=gen)
    for i in (1, 4, 6):                             # torchvision's classifier (not used; small stand-ins)
        trunk[f"classifier.{i}.weight"] = torch.randn(4, 4, generator=gen)
        trunk[f"classifier.{i}.bias"] = torch.zeros(4)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
             for k, c in enumerate((64, 192, 384, 256, 256))}
    return trunk, heads


def test_lpips_loads_alexnet_and_heads_and_matches_direct_convolutions(tmp_path):
    gen = torch.Generator().manual_seed(8)
    trunk, heads = alexnet_and_lpips_states(gen)
    torch.save(trunk, tmp_path / "alexnet.pth")
    torch.save(heads, tmp_path / "alex.pth")
    net = metrics.LPIPS.load(tmp_path / "alexnet.pth", tmp_path / "alex.pth")
    a = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    b = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        ours = net(a, b)
        assert net(a, a).abs().max() == 0

    def taps(x):
        x = (x - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        out = []
        x = F.relu(F.conv2d(x, trunk["features.0.weight"], trunk["features.0.bias"], stride=4, padding=2))
        out.append(x)
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), trunk["features.3.weight"], trunk["features.3.bias"], padding=2))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        for i in (6, 8, 10):
            x = F.relu(F.conv2d(x, trunk[f"features.{i}.weight"], trunk[f"features.{i}.bias"], padding=1))
            out.append(x)
        return [t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for t in out]

    expected = sum((heads[f"lin{k}.model.1.weight"] * (fa - fb) ** 2).sum(1).mean(dim=(1, 2))
                   for k, (fa, fb) in enumerate(zip(taps(a), taps(b))))
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        metrics.LPIPS.load(tmp_path / "nothere.pth", tmp_path / "alex.pth")


def random_motion(gen, *lead):
    """Motion (...,59) with every part moving: expression, global / neck rotation, an opening jaw."""
    m = 0.3 * torch.randn(lead + (59,), generator=gen)
    m[..., 50:56] *= 0.5
    m[..., 56] = m[..., 56].abs()
    return m


def test_region_meshes_equal_full_flame_meshes_with_head_pose_zeroed():
    from flame import Flame
    flame = Flame.procedural()
    regions = metrics.RegionMeshes(flame)
    gen = torch.Generator().manual_seed(9)
    shape = 0.5 * torch.randn(100, generator=gen)
    motion = random_motion(gen, 3, 20)
    full = metrics.motion_meshes(flame, shape, motion)                                    # (3, 20, V, 3)
    still = motion.clone()
    still[..., 50:56] = 0
    torch.testing.assert_close(full, flame.from_motion(shape, still), rtol=0, atol=1e-7)
    ours = regions(shape, motion)
    torch.testing.assert_close(ours, full[..., regions.ids, :], rtol=0, atol=1e-6)
    torch.testing.assert_close(regions.landmarks(ours), flame.landmarks(full), rtol=0, atol=1e-6)
    masks = flame.masks
    for name in ("lips", "face", "upper_face"):
        assert torch.equal(regions.ids[getattr(regions, name)], masks[name])


def test_clip_scores_zero_for_truth_and_blind_to_head_pose_except_ppe():
    from flame import Flame
    regions = metrics.RegionMeshes(Flame.procedural())
    gen = torch.Generator().manual_seed(10)
    shape, truth = 0.5 * torch.randn(100, generator=gen), random_motion(gen, 60)
    music = np.arange(5, 60, 15)
    same = metrics.clip_motion_scores(regions, shape, truth, truth[None].repeat(2, 1, 1), music)
    for key in ("LVE-mean", "LVE-min", "FVE-mean", "FVE-min", "FDD(x1e-2)", "PPE", "Diversity"):
        assert same[key] == pytest.approx(0, abs=1e-6), key
    nodding = truth[None].repeat(2, 1, 1)
    nodding[1, :, 50:56] += torch.tensor([0.03, 0.04, 0, 0, 0, 0])                     # only the head pose moves
    scores = metrics.clip_motion_scores(regions, shape, truth, nodding, music)
    assert scores["LVE-mean"] == pytest.approx(0, abs=1e-6) and scores["FVE-mean"] == pytest.approx(0, abs=1e-6)
    assert scores["PPE"] == pytest.approx(0.05 / 2)


def test_music_beats_are_librosa_beats_in_both_frame_conventions():
    import librosa
    sr = 16000
    y = librosa.clicks(times=np.arange(0.3, 8, 0.5), sr=sr, length=8 * sr)
    y = y + 0.01 * np.random.default_rng(11).normal(size=len(y))
    onset = librosa.onset.onset_strength(y=librosa.effects.percussive(y), sr=sr, aggregate=np.median)
    _, ref = librosa.beat.beat_track(onset_envelope=onset, sr=sr, hop_length=512)
    ours = metrics.music_beats(y.astype(np.float32), sr)
    assert len(ours) == len(ref) and np.abs(ours - ref).max() <= 1
    seconds = librosa.frames_to_time(ours, sr=sr, hop_length=512)
    np.testing.assert_allclose(metrics.music_beats(y.astype(np.float32), sr, time_correct=True), seconds * 30)


def test_evaluate_command_writes_table_ii_for_sample_files(tmp_path):
    import json
    import data
    root = data.generate_dataset(tmp_path / "data", n_people=1, clips_per_person=3, with_video=False, verbose=False)
    clip_id = data.read_split(root, "test")[0]
    f = data.read_flame_pickle(root / "flame_seqs" / f"{clip_id}.pkl")
    truth = np.concatenate([f["expression"], f["pose"]], axis=1)                          # (240, 59)
    pred = tmp_path / "pred"
    (pred / clip_id).mkdir(parents=True)
    opened = truth.copy()
    opened[:, 56] += 0.1                                                                 # jaw 0.1 rad wider
    np.savez(pred / clip_id / "sample_0.npz", motion=truth)
    np.savez(pred / clip_id / "sample_1.npz", motion=opened)
    (pred / "fps.json").write_text(json.dumps({"fps": 123.0}))
    metrics.main(["--pred", str(pred), "--data", str(root), "--json", str(tmp_path / "t2.json")])
    table = json.loads((tmp_path / "t2.json").read_text())
    ours, base = table["pred"], table["mean motion"]
    assert ours["clips"] == 1 and ours["FPS"] == 123.0 and ours["LVE-min"] == pytest.approx(0, abs=1e-5)
    assert ours["LVE-mean"] > 0.5 and ours["PPE"] == pytest.approx(0, abs=1e-6) and ours["Diversity"] > 0
    assert base["LVE-mean"] > 0 and base["Diversity"] is None and 0 <= base["BA"] <= 1
