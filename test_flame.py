"""Tests of flame.py: LBS against smplx, chumpy-free loading of official-format files, the procedural head, exports.

Run alone: python -m pytest -q test_flame.py   (needs smplx, chumpy-fork and scipy installed)
"""
import inspect
import pickle
import sys

import numpy as np
import pytest
import torch

import flame
from flame import Flame, procedural_head, read_flame_arrays, save_mesh_sequence, save_obj, split_motion


@pytest.fixture(scope='module')
def head():
    return Flame.procedural()


def random_flame_arrays(rng, V=300, F=500):
    """A FLAME-format dict (official layout: 400 shapedirs columns, 36 posedirs) with random contents."""
    J_regressor = rng.random((5, V)) * (rng.random((5, V)) < 0.05)
    J_regressor /= J_regressor.sum(1, keepdims=True)
    weights = rng.random((V, 5)) ** 4
    return {
        'v_template': rng.normal(size=(V, 3)) * 0.1, 'shapedirs': rng.normal(size=(V, 3, 400)) * 1e-3,
        'posedirs': rng.normal(size=(V, 3, 36)) * 1e-3, 'J_regressor': J_regressor,
        'weights': weights / weights.sum(1, keepdims=True),
        'kintree_table': np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
        'f': rng.integers(0, V, size=(F, 3)),
    }


def smplx_vertices(arrays, shape_columns, shape, expr, pose):
    """smplx.lbs.lbs on the raw arrays, set up as smplx's FLAME class does."""
    from smplx.lbs import lbs
    t = lambda x: torch.as_tensor(np.asarray(x, np.float64))
    n_shape, n_expr = shape.shape[-1], expr.shape[-1]
    shapedirs = t(arrays['shapedirs'])
    dirs = torch.cat([shapedirs[..., :n_shape], shapedirs[..., shape_columns:shape_columns + n_expr]], -1)
    parents = torch.as_tensor(np.asarray(arrays['kintree_table'])[0].astype(np.int64))
    parents[0] = -1
    verts, _ = lbs(torch.cat([shape, expr], -1), pose, t(arrays['v_template']), dirs,
                   t(arrays['posedirs']).reshape(-1, 36).T, t(arrays['J_regressor']), parents, t(arrays['weights']))
    return verts


@pytest.mark.parametrize('which', ['procedural', 'random'])
def test_flame_matches_smplx(which):
    rng = np.random.default_rng(1)
    if which == 'procedural':
        arrays, columns = procedural_head(0), flame.N_SHAPE
        model = Flame.procedural(dtype=torch.float64)
    else:
        arrays, columns = random_flame_arrays(rng), flame.FLAME_SHAPE_COLUMNS
        model = Flame(arrays, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    B, T = 2, 3
    expr = torch.randn(B, T, 50, generator=g, dtype=torch.float64)
    pose = torch.randn(B, T, 15, generator=g, dtype=torch.float64) * 0.5
    for shape in (torch.randn(B, 1, 100, generator=g, dtype=torch.float64),   # one head per sequence
                  torch.randn(1, 1, 100, generator=g, dtype=torch.float64)):  # one head for all
        ours = model(shape, expr, pose[..., :3], pose[..., 3:6], pose[..., 6:9], pose[..., 9:])
        ref = smplx_vertices(arrays, columns, shape.expand(B, T, 100).reshape(-1, 100), expr.reshape(-1, 50),
                             pose.reshape(-1, 15))
        assert ours.shape == (B, T, len(arrays['v_template']), 3)
        assert (ours.reshape(ref.shape) - ref).abs().max().item() <= 1e-9


def test_official_chumpy_pickle_loads_without_chumpy(tmp_path, monkeypatch):
    monkeypatch.setattr(inspect, 'getargspec', inspect.getfullargspec, raising=False)  # chumpy-fork on Python 3.11
    import chumpy_fork
    import chumpy_fork.ch
    import scipy.sparse
    arrays = random_flame_arrays(np.random.default_rng(3))
    official = {k: chumpy_fork.array(arrays[k]) for k in ('v_template', 'shapedirs', 'posedirs', 'weights')}
    official.update(J_regressor=scipy.sparse.csc_matrix(arrays['J_regressor']),
                    kintree_table=arrays['kintree_table'], f=arrays['f'].astype(np.uint32), bs_style='lbs')
    # Written as the official file names its classes: chumpy.ch.Ch, numpy.core.multiarray.
    monkeypatch.setattr(chumpy_fork.ch.Ch, '__module__', 'chumpy.ch')
    monkeypatch.setitem(sys.modules, 'chumpy', chumpy_fork)
    monkeypatch.setitem(sys.modules, 'chumpy.ch', chumpy_fork.ch)
    data = pickle.dumps(official, protocol=2).replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n')
    assert b'chumpy.ch' in data and b'scipy.sparse' in data
    path = tmp_path / 'generic_model.pkl'
    path.write_bytes(data)
    for name in [m for m in sys.modules if m.split('.')[0] in ('chumpy', 'chumpy_fork', 'scipy')]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of them now fails

    loaded = read_flame_arrays(path)
    for key in flame.FLAME_KEYS:
        assert np.array_equal(loaded[key], arrays[key]), key
    model, reference = Flame.load(path, dtype=torch.float64), Flame(arrays, dtype=torch.float64)
    params = [torch.randn(4, n, dtype=torch.float64) * 0.3 for n in (100, 50, 3, 3, 3, 6)]
    assert torch.equal(model(*params), reference(*params))


def test_flame2023_pickle_npz_and_side_files_load(tmp_path):
    import scipy.sparse
    rng = np.random.default_rng(4)
    arrays = random_flame_arrays(rng)
    reference = Flame(arrays, dtype=torch.float64)
    params = [torch.randn(2, n, dtype=torch.float64) * 0.3 for n in (100, 50, 3, 3, 3, 6)]
    expected = reference(*params)

    pkl_dir, npz_dir = tmp_path / 'pkl', tmp_path / 'npz'
    pkl_dir.mkdir(), npz_dir.mkdir()
    with open(pkl_dir / 'flame2023.pkl', 'wb') as fh:
        pickle.dump({**arrays, 'J_regressor': scipy.sparse.csc_matrix(arrays['J_regressor'])}, fh)
    np.savez(npz_dir / 'flame.npz', **arrays)
    lmk_faces = rng.integers(0, len(arrays['f']), size=(1, 68))
    lmk_bary = rng.dirichlet(np.ones(3), size=(1, 68))
    np.save(pkl_dir / 'landmark_embedding.npy', {'full_lmk_faces_idx': lmk_faces, 'full_lmk_bary_coords': lmk_bary,
                                                 'static_lmk_faces_idx': lmk_faces[0, 17:]}, allow_pickle=True)
    masks = {'face': np.arange(0, 200), 'lips': np.arange(10, 20), 'forehead': np.arange(50, 60),
             'eye_region': np.arange(55, 70)}
    with open(pkl_dir / 'FLAME_masks.pkl', 'wb') as fh:
        pickle.dump(masks, fh, protocol=2)
    with open(npz_dir / 'flame_static_embedding.pkl', 'wb') as fh:
        pickle.dump({'lmk_face_idx': lmk_faces[0, 17:], 'lmk_b_coords': lmk_bary[0, 17:]}, fh, protocol=2)

    from_pkl, from_npz = Flame.load(pkl_dir / 'flame2023.pkl', dtype=torch.float64), Flame.load(npz_dir / 'flame.npz', dtype=torch.float64)
    assert torch.equal(from_pkl(*params), expected) and torch.equal(from_npz(*params), expected)

    lmk = from_pkl.landmarks(expected)
    corners = expected[:, arrays['f'][lmk_faces[0]]]                          # (2, 68, 3, 3)
    assert lmk.shape == (2, 68, 3)
    assert torch.allclose(lmk, (corners * torch.as_tensor(lmk_bary[0])[..., None]).sum(-2))
    assert from_npz.landmarks(expected).shape == (2, 51, 3)
    assert np.array_equal(from_pkl.masks['upper_face'].numpy(), np.arange(50, 70))
    assert np.array_equal(from_pkl.masks['lips'].numpy(), masks['lips'])
    with pytest.raises(ValueError, match='FLAME_masks.pkl'):
        from_npz.masks


def test_missing_key_error_names_file(tmp_path):
    arrays = random_flame_arrays(np.random.default_rng(5))
    del arrays['posedirs'], arrays['weights']
    path = tmp_path / 'broken.npz'
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"broken\.npz: missing keys \['posedirs', 'weights'\]"):
        Flame.load(path)


def test_procedural_head_has_flame_structure(head):
    V, F = head.template.shape[0] // 3, head.faces.shape[0]
    assert 4500 <= V <= 5500 and 9000 <= F <= 11000
    assert head.parents == [-1, 0, 1, 1, 1]
    assert head.blend_dirs.shape == (100 + 50 + 36, 3 * V)
    verts = head(torch.zeros(100), torch.zeros(50), torch.zeros(3), torch.zeros(3), torch.zeros(3))
    extent = verts.max(0).values - verts.min(0).values
    assert 0.15 < extent[0] < 0.22 and 0.25 < extent[1] < 0.35            # metres: head with neck
    nose_tip = head.landmarks(verts)[30]
    assert nose_tip[2] > 0.1                                               # face toward +z
    assert head.landmarks(torch.zeros(2, 3, V, 3)).shape == (2, 3, 68, 3)
    for name in ('face', 'lips', 'upper_face'):
        ids = head.masks[name]
        assert len(ids) > 50 and 0 <= ids.min() and ids.max() < V
    a, b = procedural_head(0), procedural_head(0)
    assert all(np.array_equal(a[k], b[k]) for k in flame.FLAME_KEYS)     # deterministic
    assert not np.array_equal(a['shapedirs'], procedural_head(1)['shapedirs'])


def lip_gap(head, jaw=0.0, expression=None):
    expr = torch.zeros(50) if expression is None else expression
    verts = head(torch.zeros(100), expr, torch.zeros(3), torch.zeros(3), torch.tensor([jaw, 0.0, 0.0]))
    lmk = head.landmarks(verts)
    return (lmk[62] - lmk[66]).norm().item()                               # inner lips, iBUG numbering


def test_jaw_opening_separates_lips(head):
    gaps = [lip_gap(head, jaw) for jaw in (0.0, 0.1, 0.2, 0.3)]
    assert gaps[0] < 1e-6
    assert all(later > earlier + 0.005 for earlier, later in zip(gaps, gaps[1:]))  # > 5 mm per 0.1 rad
    assert lip_gap(head, expression=torch.eye(50)[0] * 2) > 0.005             # expression 0 opens the mouth


def test_shape_and_expression_deform_the_head(head):
    zero = torch.zeros(3)
    neutral = head(torch.zeros(100), torch.zeros(50), zero, zero, zero)
    for k, least in ((0, 0.005), (1, 0.005), (3, 0.005), (4, 0.005), (50, 0.0005), (99, 0.0002)):
        moved = head(torch.eye(100)[k] * 2, torch.zeros(50), zero, zero, zero)
        assert (moved - neutral).norm(dim=-1).max() > least                    # metres, for 2 sigma; tail smaller
    smile = head(torch.zeros(100), torch.eye(50)[1] * 2, zero, zero, zero)
    moved = (smile - neutral).norm(dim=-1)
    assert moved[head.masks['lips']].max() > 0.005 and moved[head.masks['upper_face']].max() < 0.001


def test_from_motion_broadcasts_shape_and_zeroes_head_pose(head):
    g = torch.Generator().manual_seed(6)
    shape, motion = torch.randn(2, 100, generator=g), torch.randn(2, 4, 59, generator=g) * 0.2
    verts = head.from_motion(shape, motion)
    assert verts.shape == (2, 4, head.template.shape[0] // 3, 3)
    expr, glob, neck, jaw = split_motion(motion[1])
    assert torch.allclose(verts[1], head(shape[1], expr, glob, neck, jaw), atol=1e-6)
    still = head.from_motion(shape, motion, zero_head_pose=True)
    assert torch.allclose(still[0], head(shape[0], motion[0, :, :50], torch.zeros(3), torch.zeros(3), motion[0, :, 56:]), atol=1e-6)


def test_forward_is_differentiable(head):
    expression = torch.zeros(1, 50, requires_grad=True)
    jaw = torch.full((1, 3), 0.1, requires_grad=True)
    verts = head(torch.zeros(100), expression, torch.zeros(3), torch.zeros(3), jaw)
    verts[:, head.masks['lips']].sum().backward()
    assert expression.grad.abs().sum() > 0 and jaw.grad.abs().sum() > 0


def test_save_obj_round_trip(tmp_path, head):
    verts = head(torch.zeros(100), torch.zeros(2, 50), torch.zeros(3), torch.zeros(3), torch.zeros(3))
    save_obj(tmp_path / 'head.obj', verts[0], head.faces)
    lines = (tmp_path / 'head.obj').read_text().splitlines()
    v = np.array([[float(x) for x in line.split()[1:]] for line in lines if line.startswith('v ')])
    f = np.array([[int(x) for x in line.split()[1:]] for line in lines if line.startswith('f ')])
    assert np.abs(v - verts[0].numpy()).max() <= 5e-7 and np.array_equal(f - 1, head.faces.numpy())
    save_mesh_sequence(tmp_path / 'seq', verts, head.faces)
    assert sorted(p.name for p in (tmp_path / 'seq').iterdir()) == ['frame_00000.obj', 'frame_00001.obj']
    with np.load(save_mesh_sequence(tmp_path / 'seq.npz', verts, head.faces)) as z:
        assert z['verts'].dtype == np.float32 and np.array_equal(z['verts'], verts.numpy())
        assert np.array_equal(z['faces'], head.faces.numpy())
