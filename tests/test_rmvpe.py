"""RMVPE pitch estimation: rmvpe.pt loading, log-mel, network, decoding, chunking."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import rvc_modulator as rvc
from factories import RMVPE_SIZES, RunsOnUnpickle, make_rmvpe_file, make_rmvpe_state, rmvpe_shapes

TINY_CONFIG = rvc.RMVPEConfig(n_blocks=1, n_gru=1, kernel_size=(2, 2), en_de_layers=5, inter_layers=4,
                              in_channels=1, en_out_channels=2)


def glides_and_bursts(seconds: float, seed: int = 0) -> np.ndarray:
    """16 kHz float32 test signal: gliding harmonic tones, near-silence and noise bursts."""
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < seconds * rvc.SAMPLE_RATE:
        n = int(rng.uniform(0.2, 0.8) * rvc.SAMPLE_RATE)
        kind = rng.integers(3)
        if kind == 0:
            phase = 2 * np.pi * np.cumsum(np.linspace(*rng.uniform(90, 300, 2), n)) / rvc.SAMPLE_RATE
            part = 0.5 * np.hanning(n) * sum(np.sin(k * phase) / k for k in range(1, 8))
        elif kind == 1:
            part = 0.001 * rng.standard_normal(n)
        else:
            part = 0.2 * np.hanning(n) * rng.standard_normal(n)
        parts.append(part)
        total += n
    return np.concatenate(parts)[: int(seconds * rvc.SAMPLE_RATE)].astype(np.float32)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return make_rmvpe_file(tmp_path_factory.mktemp("rmvpe") / "rmvpe.pt", "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_file) -> rvc.RMVPE:
    return rvc.load_rmvpe(tiny_file)


def save_state(tmp_path: Path, state) -> Path:
    path = tmp_path / "rmvpe.pt"
    torch.save(state, path)
    return path


# --- reference goldens (official WebUI code, tiny random checkpoint) ----------

@pytest.fixture(scope="module")
def golden(fixtures, manifest):
    import soundfile

    case = manifest["modules"]["rmvpe"]
    model = rvc.load_rmvpe(fixtures / case["model"])
    audio, sr = soundfile.read(fixtures / "inputs" / "in_mono16k.wav", dtype="float32")
    assert sr == rvc.SAMPLE_RATE
    mel = model.mel(torch.from_numpy(audio))
    return dict(case=case, model=model, audio=audio, mel=mel, salience=model.salience(mel),
                f0=model.f0(audio, case["thred"]),
                ref={name: np.load(fixtures / case[name]) for name in ("mel", "salience", "f0")})


def test_loader_infers_the_fixture_hyper_parameters_from_shapes(golden):
    hp = golden["case"]["hparams"]
    assert golden["model"].cfg == rvc.RMVPEConfig(**{**hp, "kernel_size": tuple(hp["kernel_size"])})


# The STFT's float32 rounding is absolute, on the scale of a frame's loud bands: in a band
# barely above the 1e-5 floor the log magnifies it (FFT libraries differ by machine: an
# error of 8e-9 at 1.0e-5 is 8e-4 in the log). So the log-mel is held to 1e-4 where the
# mel is well above the floor, and to a linear bound everywhere.
MEL_WELL_ABOVE_FLOOR = 1e-3
LOG_MEL_MAX_ABS, MEL_MAX_ABS = 1e-4, 1e-6


def test_log_mel_matches_reference(golden):
    mel, ref = golden["mel"].numpy(), golden["ref"]["mel"]
    assert mel.shape == ref.shape == (128, 1 + len(golden["audio"]) // rvc.HOP)
    assert mel.dtype == np.float32
    loud = ref >= np.log(MEL_WELL_ABOVE_FLOOR)
    assert loud.mean() > 0.5
    assert np.abs(mel - ref)[loud].max() <= LOG_MEL_MAX_ABS
    assert np.abs(np.exp(mel.astype(np.float64)) - np.exp(ref.astype(np.float64))).max() <= MEL_MAX_ABS


def test_salience_matches_reference(golden):
    salience, ref = golden["salience"].numpy(), golden["ref"]["salience"]
    assert salience.shape == ref.shape == (golden["mel"].shape[1], 360)
    assert np.abs(salience - ref).max() <= 1e-4


def test_f0_matches_reference(golden):
    f0, ref = golden["f0"], golden["ref"]["f0"]
    assert f0.shape == ref.shape and f0.dtype == np.float64
    assert 0.5 < (ref > 0).mean() < 1  # the golden has both voiced and unvoiced frames
    assert ((f0 > 0) != (ref > 0)).sum() <= 1  # a frame exactly at the threshold may flip
    both = (f0 > 0) & (ref > 0)
    assert np.abs(f0[both] - ref[both]).max() <= 0.01


def test_decoding_the_reference_salience_gives_the_reference_f0(golden):
    ref = golden["ref"]
    np.testing.assert_allclose(rvc.decode_salience(ref["salience"], golden["case"]["thred"]), ref["f0"],
                               rtol=0, atol=1e-9)


def test_factory_writes_the_reference_layout(fixtures, manifest):
    reference = torch.load(fixtures / manifest["modules"]["rmvpe"]["model"], weights_only=True)
    assert {k: tuple(v.shape) for k, v in reference.items()} == rmvpe_shapes(**RMVPE_SIZES["tiny"])


# --- front-end -----------------------------------------------------------------

def test_mel_filterbank_equals_librosa():
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=30, fmax=8000, htk=True)
    np.testing.assert_array_equal(rvc.rmvpe_mel_filterbank(), expected)


def test_mel_equals_torch_stft_with_centred_frames(tiny):
    audio = torch.from_numpy(glides_and_bursts(6.0))  # 601 frames: the mel is made in two pieces
    assert 601 > rvc.RMVPE_PIECE_FRAMES
    spec = torch.stft(audio, 1024, 160, window=torch.hann_window(1024), center=True, return_complex=True)
    expected = torch.log(torch.clamp(torch.from_numpy(rvc.rmvpe_mel_filterbank()) @ spec.abs(), min=1e-5))
    torch.testing.assert_close(tiny.mel(audio), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("start, stop", [(0, 64), (32, 96), (400, 480), (560, 601), (0, 601)])
def test_mel_of_a_frame_range_equals_those_frames_of_the_whole_signal_mel(tiny, start, stop):
    audio = torch.from_numpy(glides_and_bursts(6.0))  # 601 frames; the ranges touch both ends
    torch.testing.assert_close(tiny.mel(audio, start, stop), tiny.mel(audio)[:, start:stop], rtol=0, atol=0)


# --- loading -------------------------------------------------------------------

@pytest.mark.parametrize("n_samples", [1600, 16159, 16160, 16161])
def test_loader_infers_the_tiny_config_and_f0_has_one_frame_per_hop_plus_one(tiny, n_samples):
    assert tiny.cfg == TINY_CONFIG
    assert not tiny.training and tiny.cnn.weight.dtype == torch.float32
    assert tiny.f0(glides_and_bursts(n_samples / rvc.SAMPLE_RATE)).shape == (1 + n_samples // rvc.HOP,)


def test_loader_infers_the_full_config_from_shapes(tmp_path):
    model = rvc.load_rmvpe(make_rmvpe_file(tmp_path / "rmvpe.pt", "full", seed=1))
    assert model.cfg == rvc.RMVPEConfig(n_blocks=4, n_gru=1, kernel_size=(2, 2), en_de_layers=5,
                                        inter_layers=4, in_channels=1, en_out_channels=16)
    assert sum(p.numel() for p in model.state_dict().values()) == 90_472_917
    assert model.f0(glides_and_bursts(0.3)).shape == (1 + 4800 // rvc.HOP,)


def test_loader_accepts_files_without_batch_norm_counters(tmp_path, tiny):
    state = {k: v for k, v in make_rmvpe_state("tiny", seed=0).items() if not k.endswith("num_batches_tracked")}
    model = rvc.load_rmvpe(save_state(tmp_path, state))
    mel = tiny.mel(torch.from_numpy(glides_and_bursts(1.0)))
    torch.testing.assert_close(model.salience(mel), tiny.salience(mel), rtol=0, atol=0)


def test_missing_tensor_is_refused_naming_it(tmp_path):
    state = make_rmvpe_state("tiny")
    del state["unet.decoder.layers.2.conv2.0.conv.3.weight"]
    with pytest.raises(rvc.ModelFileError, match=r"missing tensor 'unet\.decoder\.layers\.2\.conv2\.0\.conv\.3\.weight'"):
        rvc.load_rmvpe(save_state(tmp_path, state))


def test_misshaped_tensor_is_refused_naming_it(tmp_path):
    state = make_rmvpe_state("tiny")
    state["fc.1.weight"] = torch.zeros(360, 511)
    with pytest.raises(rvc.ModelFileError, match=r"'fc\.1\.weight' has shape \[360, 511\], expected \[360, 512\]"):
        rvc.load_rmvpe(save_state(tmp_path, state))


def test_extra_tensor_is_refused_naming_it(tmp_path):
    state = make_rmvpe_state("tiny")
    state["unet.encoder.layers.0.conv.0.extra"] = torch.zeros(1)
    with pytest.raises(rvc.ModelFileError, match=r"unexpected tensor 'unet\.encoder\.layers\.0\.conv\.0\.extra'"):
        rvc.load_rmvpe(save_state(tmp_path, state))


def test_a_voice_model_given_as_rmvpe_is_refused(tmp_path):
    voice_model = {"weight": {"enc_p.emb_phone.weight": torch.zeros(192, 768)}, "config": [1025, 32],
                   "info": "300epoch", "sr": "40k", "f0": 1, "version": "v2"}
    with pytest.raises(rvc.ModelFileError, match="voice model"):
        rvc.load_rmvpe(save_state(tmp_path, voice_model))


@pytest.mark.parametrize("content", [{"encoder.layers.0.fc1.weight": torch.zeros(4, 4)},
                                     torch.zeros(3), [1, 2, 3]], ids=["other state dict", "tensor", "list"])
def test_files_that_are_not_rmvpe_are_refused(tmp_path, content):
    with pytest.raises(rvc.ModelFileError, match="not an RMVPE model"):
        rvc.load_rmvpe(save_state(tmp_path, content))


def test_a_missing_file_is_reported_as_not_found(tmp_path):
    with pytest.raises(rvc.NotFoundError):
        rvc.load_rmvpe(tmp_path / "nowhere.pt")


@pytest.mark.parametrize("writer", ["torch zip", "torch legacy", "plain pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"fc.1.bias": torch.zeros(360), "hook": RunsOnUnpickle(Path.touch, marker)}
    path = tmp_path / "rmvpe.pt"
    if writer == "plain pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
        pickle.loads(path.read_bytes())  # the payload is live: a naive loader would run it
        assert marker.exists()
        marker.unlink()
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=(writer == "torch zip"))
    with pytest.raises(rvc.ModelFileError):
        rvc.load_rmvpe(path)
    assert not marker.exists()


# --- decoding ------------------------------------------------------------------

def cents_to_hz(cents: float) -> float:
    return 10.0 * 2.0 ** (cents / 1200.0)


@pytest.mark.parametrize("peak_bin", [0, 3, 100, 356, 359])
def test_a_lone_peak_decodes_to_the_frequency_of_its_bin(peak_bin):
    salience = np.zeros((1, 360), np.float32)
    salience[0, peak_bin] = 0.9
    expected = cents_to_hz(20 * peak_bin + 1997.3794084376191)
    np.testing.assert_allclose(rvc.decode_salience(salience), [expected], rtol=1e-12)


def test_bin_0_is_31_7_hz_and_bin_359_is_2005_5_hz():
    salience = np.zeros((2, 360), np.float32)
    salience[0, 0] = salience[1, 359] = 1.0
    np.testing.assert_allclose(rvc.decode_salience(salience), [31.70, 2005.50], atol=0.01)


def test_the_pitch_is_the_salience_weighted_mean_of_the_nine_bins_around_the_peak():
    salience = np.zeros((1, 360), np.float32)
    salience[0, 200], salience[0, 201], salience[0, 196] = 0.5, 0.25, 0.25  # mean bin 199.25
    salience[0, 195] = salience[0, 205] = 0.2  # just outside the window: ignored
    np.testing.assert_allclose(rvc.decode_salience(salience), [cents_to_hz(20 * 199.25 + 1997.3794084376191)],
                               rtol=1e-12)


def test_frames_whose_peak_is_at_or_below_the_threshold_are_unvoiced():
    salience = np.zeros((4, 360), np.float32)
    salience[:, 100] = [0.02, 0.03, 0.0301, 0.5]
    f0 = rvc.decode_salience(salience, threshold=0.03)
    assert f0.dtype == np.float64
    assert list(f0 == 0) == [True, True, False, False]
    assert rvc.decode_salience(salience, threshold=0.6).tolist() == [0, 0, 0, 0]


# --- long inputs ---------------------------------------------------------------

def test_inputs_up_to_a_minute_run_in_one_piece(tiny, monkeypatch):
    lengths = []
    salience = tiny.salience
    monkeypatch.setattr(tiny, "salience", lambda mel: lengths.append(mel.shape[1]) or salience(mel))
    padded_minute = np.zeros((60 + 2 * rvc.X_PAD) * rvc.SAMPLE_RATE, np.float32)  # as the pipeline pads it
    tiny.f0(padded_minute)
    assert lengths == [1 + len(padded_minute) // rvc.HOP]


def test_longer_inputs_are_processed_in_chunks_with_context(tiny, monkeypatch):
    monkeypatch.setattr(rvc, "RMVPE_MAX_UNCHUNKED_FRAMES", 256)
    monkeypatch.setattr(rvc, "RMVPE_CHUNK_FRAMES", 256)
    lengths = []
    salience = tiny.salience
    monkeypatch.setattr(tiny, "salience", lambda mel: lengths.append(mel.shape[1]) or salience(mel))
    audio = glides_and_bursts(8.0)  # 801 frames
    tiny.f0(audio[: 255 * rvc.HOP])  # 256 frames: one piece
    assert lengths == [256]
    lengths.clear()
    tiny.f0(audio)  # chunks of 256 frames, each with up to RMVPE_CONTEXT_FRAMES on both sides
    n, c = 801, rvc.RMVPE_CONTEXT_FRAMES
    assert lengths == [min(n, 256 + 2 * c)] * 4


def test_every_chunk_gets_a_window_of_the_same_length(tiny, monkeypatch):
    # Equal windows let each chunk reuse the memory the previous one freed; the first and
    # the last window take more context on their inner side, on the 32-frame grid.
    windows = []
    salience = tiny.salience
    monkeypatch.setattr(tiny, "salience", lambda mel: windows.append(mel.shape[1]) or salience(mel))
    monkeypatch.setattr(tiny, "mel", lambda audio, lo, hi, mel=tiny.mel: windows.append((lo, hi)) or mel(audio, lo, hi))
    audio = glides_and_bursts(12.0, seed=1)  # 1201 frames
    f0 = tiny.f0(audio, chunk_frames=256, context_frames=64)  # windows of 384 frames
    bounds = windows[::2]
    assert bounds == [(0, 384), (192, 576), (448, 832), (704, 1088), (800, 1201)]
    assert all(lo % 32 == 0 for lo, _ in bounds)
    assert windows[1::2] == [hi - lo for lo, hi in bounds]
    assert f0.shape == (1201,)


def test_chunked_f0_agrees_with_unchunked_f0(tiny):
    # Chunks of 256 frames with 64 frames of context (the default context is 1600):
    # measured no voiced/unvoiced flip and max |Δf0| ~2e-4 Hz (float rounding). Without
    # context the chunk edges flip frames and move f0 by ~0.2 Hz, which this test catches.
    audio = glides_and_bursts(12.0, seed=1)
    whole = tiny.f0(audio)
    chunked = tiny.f0(audio, chunk_frames=256, context_frames=64)
    assert chunked.shape == whole.shape == (1 + len(audio) // rvc.HOP,)
    assert 0.2 < (whole > 0).mean() < 0.9
    assert ((chunked > 0) != (whole > 0)).sum() <= 1
    both = (chunked > 0) & (whole > 0)
    assert np.abs(chunked[both] - whole[both]).max() <= 0.01


def test_the_levels_in_time_pieces_give_the_whole_signals_salience(tiny, monkeypatch):
    mel = tiny.mel(glides_and_bursts(6.0, seed=2))  # 601 frames
    levels = rvc.RMVPE_PIECEWISE_LEVELS
    monkeypatch.setattr(rvc, "RMVPE_PIECEWISE_LEVELS", 0)
    whole = tiny.salience(mel)
    monkeypatch.setattr(rvc, "RMVPE_PIECEWISE_LEVELS", levels)
    monkeypatch.setattr(rvc, "RMVPE_PIECE_FRAMES", 64)  # 10 pieces at the top level, then 5, 3, 2
    torch.testing.assert_close(tiny.salience(mel), whole, rtol=0, atol=1e-6)
    monkeypatch.setattr(tiny.unet, "context", 0)  # without context the piece edges show: the check can fail
    assert (tiny.salience(mel) - whole).abs().max() > 1e-4


def test_the_bigru_in_pieces_equals_the_bigru_over_the_whole_sequence(monkeypatch):
    torch.manual_seed(0)
    bigru = rvc.RMVPEBiGRU(12, 8, n_layers=2)  # the second layer reads both directions of the first
    x = torch.randn(1, 50, 12)
    with torch.inference_mode():
        whole = bigru.gru(x)[0]  # (1, 50, 16)
        monkeypatch.setattr(rvc, "RMVPE_GRU_PIECE_FRAMES", 16)  # 4 pieces, the last one short
        pieces = bigru(x)
    assert pieces.shape == whole.shape == (1, 50, 16)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-6)
    assert [name for name, _ in bigru.named_parameters()] == [name for name, _ in bigru.gru.named_parameters(
        prefix="gru")]  # rmvpe.pt's keys: the pieces' one-way GRUs hold no weights of their own


def test_rmvpe_maps_its_whole_chunk_tensors_outside_the_heap(tiny, monkeypatch):
    # The pieces' blocks stay in the heap (their sizes repeat); the tensors of a whole chunk
    # are mapped, so that chunks after the first do not grow the heap around them.
    thresholds = []
    real = rvc.blocks_outside_heap

    def recording(threshold=rvc.WEIGHT_MMAP_THRESHOLD):
        thresholds.append(threshold)
        return real(threshold)
    monkeypatch.setattr(rvc, "blocks_outside_heap", recording)
    tiny.f0(glides_and_bursts(1.0))
    assert thresholds == [rvc.RMVPE_MMAP_THRESHOLD]
    assert rvc.RMVPE_MMAP_THRESHOLD > 8 * 2**20  # above the top level's blocks of a 512-frame piece


def test_chunk_sizes_must_keep_the_32_frame_grid(tiny):
    with pytest.raises(ValueError):
        tiny.f0(glides_and_bursts(1.0), chunk_frames=100)


# --- half precision ------------------------------------------------------------

def test_half_precision_net_keeps_a_float32_mel_and_returns_float32_salience(tiny_file):
    model = rvc.load_rmvpe(tiny_file)
    mel = model.mel(torch.from_numpy(glides_and_bursts(1.0)))
    reference = model.salience(mel)
    model.half()
    assert model.mel(torch.from_numpy(glides_and_bursts(1.0))).dtype == torch.float32
    salience = model.salience(mel)
    assert salience.dtype == torch.float32
    torch.testing.assert_close(salience, reference, rtol=0, atol=2e-3)
