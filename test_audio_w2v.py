"""Tests for audio.py's load_audio and Wav2Vec2 against independent references (transformers, scipy, numpy).

Run alone: pytest -x -q test_audio_w2v.py   (transformers, safetensors needed; imported inside the tests)
"""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from audio import Wav2Vec2, load_audio, normalize_wave, read_safetensors, resample_features

TOL = 1e-4  # max abs difference of hidden states against transformers


def _hf_config(stable):
    """A small config of either flavour; its conv stack has total stride 5*2*2 = 20 and receptive field 40."""
    import transformers
    return transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32, 32, 32),
        conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer" if stable else "group", do_stable_layer_norm=stable, conv_bias=stable,
        vocab_size=12)


def _hf_model(stable, head=False, seed=0):
    """A transformers model with every parameter perturbed: its own init leaves norms at 1/0 and biases at 0."""
    import transformers
    torch.manual_seed(seed)
    model = (transformers.Wav2Vec2ForCTC if head else transformers.Wav2Vec2Model)(_hf_config(stable)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _save_bin(model, directory):
    """A Hugging Face directory in the older layout: config.json + pytorch_model.bin."""
    directory.mkdir(exist_ok=True)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def _max_diff(ref, ours, lengths):
    diffs = []
    torch.manual_seed(1)
    for n in lengths:
        wave = torch.randn(2, n)  # (B, N)
        with torch.inference_mode():
            diffs.append((ref(wave).last_hidden_state - ours(wave)).abs().max().item())
    return max(diffs)


@pytest.mark.parametrize("stable", [False, True], ids=["base_group_norm", "stable_layer_norm"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_wav2vec2_matches_transformers(tmp_path, stable, fmt):
    ref = _hf_model(stable)
    if fmt == "safetensors":
        ref.save_pretrained(tmp_path)
    else:
        _save_bin(ref, tmp_path)
    ours = Wav2Vec2.from_pretrained(tmp_path).eval()
    assert _max_diff(ref, ours, [400, 1237, 2001, 3333]) <= TOL  # 400 a multiple of the total stride 20


def test_wav2vec2_all_layers_match_transformers_hidden_states(tmp_path):
    for stable in (False, True):
        ref = _hf_model(stable)
        ref.save_pretrained(tmp_path / str(stable))
        ours = Wav2Vec2.from_pretrained(tmp_path / str(stable)).eval()
        wave = torch.randn(1, 1500)
        with torch.inference_mode():
            ref_states = ref(wave, output_hidden_states=True).hidden_states
            our_states = ours(wave, all_layers=True)
        assert len(our_states) == len(ref_states) == 3
        assert max((a - b).abs().max().item() for a, b in zip(ref_states, our_states)) <= TOL


def test_wav2vec2_real_conv_stack_on_lengths_not_multiple_of_320(tmp_path):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4)  # base conv kernels/strides, total 320
    ref = transformers.Wav2Vec2Model(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    ours = Wav2Vec2.from_pretrained(tmp_path).eval()
    assert _max_diff(ref, ours, [3200, 4001, 5519, 8000]) <= TOL


def test_wav2vec2_n_frames_interpolates_conv_features_like_faceformer(tmp_path):
    """FaceFormer: conv features -> linear interpolation to the motion frames -> projection -> transformer."""
    ref = _hf_model(stable=False)
    ref.save_pretrained(tmp_path)
    ours = Wav2Vec2.from_pretrained(tmp_path).eval()
    wave = torch.randn(1, 2000)
    with torch.inference_mode():
        feats = ref.feature_extractor(wave)  # (B, C, T)
        feats = torch.nn.functional.interpolate(feats, size=37, mode="linear", align_corners=True).transpose(1, 2)
        expected = ref.encoder(ref.feature_projection(feats)[0]).last_hidden_state
        got = ours(wave, n_frames=37)
    assert got.shape == (1, 37, 32)
    assert (expected - got).abs().max().item() <= TOL


def test_wav2vec2_loads_weight_g_weight_v_spelling_from_single_file(tmp_path):
    ref = _hf_model(stable=False)
    old = "encoder.pos_conv_embed.conv.parametrizations.weight.original"
    state = {k.replace(f"{old}0", "encoder.pos_conv_embed.conv.weight_g")
              .replace(f"{old}1", "encoder.pos_conv_embed.conv.weight_v"): v for k, v in ref.state_dict().items()}
    assert "encoder.pos_conv_embed.conv.weight_g" in state
    torch.save(state, tmp_path / "old.bin")
    (tmp_path / "config.json").write_text(json.dumps(ref.config.to_dict()))
    ours = Wav2Vec2.from_pretrained(tmp_path / "old.bin").eval()
    assert _max_diff(ref, ours, [1237]) <= TOL


def test_wav2vec2_loads_ctc_checkpoint_with_prefix(tmp_path):
    ctc = _hf_model(stable=True, head=True)
    ctc.save_pretrained(tmp_path)
    ours = Wav2Vec2.from_pretrained(tmp_path / "model.safetensors").eval()
    assert _max_diff(ctc.wav2vec2, ours, [1237]) <= TOL


def test_wav2vec2_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _hf_model(stable=False).state_dict()
    del state["encoder.layers.1.attention.q_proj.weight"], state["feature_projection.projection.bias"]
    state["encoder.layers.7.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        Wav2Vec2.from_pretrained(tmp_path / "pytorch_model.bin", config=_hf_config(False).to_dict())
    msg = str(err.value)
    assert str(tmp_path / "pytorch_model.bin") in msg
    for key in ("encoder.layers.1.attention.q_proj.weight", "feature_projection.projection.bias",
                "encoder.layers.7.extra.weight"):
        assert key in msg


def test_wav2vec2_wrong_shape_names_the_key(tmp_path):
    state = _hf_model(stable=False).state_dict()
    state["encoder.layers.0.feed_forward.output_dense.weight"] = torch.zeros(32, 65)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="encoder.layers.0.feed_forward.output_dense.weight"):
        Wav2Vec2.from_pretrained(tmp_path / "pytorch_model.bin", config=_hf_config(False).to_dict())


def test_read_safetensors_matches_safetensors_package(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "i64": torch.arange(7), "f64": torch.randn(2, dtype=torch.float64), "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "t.safetensors")
    got = read_safetensors(tmp_path / "t.safetensors")
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        expected = t.float() if t.dtype == torch.bfloat16 else t
        assert got[name].dtype == expected.dtype and torch.equal(got[name], expected), name


def test_read_safetensors_refuses_truncated_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.randn(100)}, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    with pytest.raises(ValueError, match="cut.safetensors.*truncated"):
        read_safetensors(tmp_path / "cut.safetensors")


def test_resample_features_is_linear_interpolation_with_ends_kept():
    feats = torch.randn(2, 50, 3)  # (B, T, C)
    got = resample_features(feats, 30).numpy()
    src, dst = np.linspace(0, 1, 50), np.linspace(0, 1, 30)
    expected = np.stack([np.stack([np.interp(dst, src, feats[b, :, c].numpy()) for c in range(3)], -1)
                         for b in range(2)])
    assert got.shape == (2, 30, 3)
    assert np.abs(got - expected).max() < 1e-5


def test_normalize_wave_matches_transformers_processor():
    import transformers
    wave = np.random.default_rng(0).normal(0.3, 0.2, 16000).astype(np.float32)
    processor = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
    expected = processor(wave, sampling_rate=16000).input_values[0]
    assert np.abs(normalize_wave(wave) - expected).max() < 1e-5


def test_load_audio_resamples_44k_stereo_to_16k_mono(tmp_path):
    from scipy.signal import resample_poly
    rng = np.random.default_rng(0)
    stereo = (0.3 * rng.standard_normal((44100, 2))).astype(np.float32)  # 1 s
    sf.write(tmp_path / "s.wav", stereo, 44100, subtype="FLOAT")
    got = load_audio(tmp_path / "s.wav")
    expected = resample_poly(stereo.mean(axis=1), 160, 441)  # 16000/44100 reduced by gcd 100
    assert got.dtype == np.float32 and got.shape == (16000,)
    assert np.abs(got - expected).max() < 1e-6


def test_load_audio_keeps_16k_mono_pcm_as_is(tmp_path):
    wave = np.random.default_rng(1).uniform(-0.5, 0.5, 1000).astype(np.float32)
    sf.write(tmp_path / "m.wav", wave, 16000, subtype="PCM_16")
    assert np.abs(load_audio(tmp_path / "m.wav") - wave).max() <= 1 / 32768


def test_load_audio_refuses_empty_file(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="empty.wav.*empty"):
        load_audio(tmp_path / "empty.wav")


def test_load_audio_refuses_truncated_wav(tmp_path):
    sf.write(tmp_path / "full.wav", np.zeros(4000, np.float32), 16000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match="cut.wav.*truncated"):
        load_audio(tmp_path / "cut.wav")


def test_load_audio_refuses_unreadable_file(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(ValueError, match="junk.wav.*unreadable"):
        load_audio(tmp_path / "junk.wav")
    with pytest.raises(ValueError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")


def test_load_audio_refuses_nan_samples(tmp_path):
    wave = np.zeros(1000, np.float32)
    wave[10] = np.nan
    sf.write(tmp_path / "nan.wav", wave, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="nan.wav.*NaN"):
        load_audio(tmp_path / "nan.wav")
