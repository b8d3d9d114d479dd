"""Long inputs are converted disk to disk: every stage reads and writes bounded pieces, and
the result is the one-piece result, whatever the size of the pieces; peak memory does not
grow with the length of the input."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import filtfilt

import rvc_modulator as rvc
from conftest import REPO, speech_like
from factories import make_hubert_fairseq, make_rmvpe_file, make_voice_model_file


def test_a_sample_file_reads_back_what_was_written(tmp_path):
    values = np.arange(1000, dtype=np.float64) / 7
    with rvc.SampleFile(np.float64, tmp_path) as samples:
        samples.append(values[:600])
        samples.append(values[600:])
        samples.write_at(10, -values[10:20])
        assert len(samples) == 1000
        expected = values.copy()
        expected[10:20] *= -1
        assert np.array_equal(samples[:], expected)
        assert np.array_equal(samples[5:15], expected[5:15])
        assert np.array_equal(samples[990:2000], expected[990:])  # slices clip, as arrays do
        assert samples[500:400].shape == (0,)
        assert np.array_equal(np.asarray(samples), expected)
    assert list(tmp_path.iterdir()) == []  # unnamed: nothing to clean up


@pytest.mark.parametrize("n", [1, 2, 5, 300])
@pytest.mark.parametrize("pad", [0, 3, 299, 1000])
def test_reflect_padded_slices_are_those_of_numpy_pad(n, pad):
    x = np.random.default_rng(n).standard_normal(n)
    expected = np.pad(x, pad, mode="reflect")
    padded = rvc.ReflectPadded(x, pad)
    assert len(padded) == len(expected)
    for start, stop in [(0, len(expected)), (0, 1), (pad, pad + n), (len(expected) - 7, len(expected) + 3),
                        (max(0, pad - 4), pad + 4)]:
        assert np.array_equal(padded[start:stop], expected[start:stop]), (start, stop)


@pytest.mark.parametrize("n", [1, 2, 19, 20, 5000])
def test_conditioning_in_blocks_is_scipys_filtfilt_exactly(n):
    x = (np.random.default_rng(n).standard_normal(n) * 0.1).astype(np.float32)
    b, a = rvc.highpass_coefficients()
    expected = filtfilt(b, a, x, padlen=min(3 * max(len(a), len(b)), n - 1))
    for block in (7, 1000, rvc.BLOCK):
        with rvc.condition(x, block=block) as out:
            assert np.array_equal(out[:], expected), block


def test_loud_inputs_are_attenuated_to_the_input_peak_before_filtering():
    x = (np.random.default_rng(0).standard_normal(4000) * 2).astype(np.float32)
    b, a = rvc.highpass_coefficients()
    expected = filtfilt(b, a, x / (np.abs(x).max() / rvc.INPUT_PEAK), padlen=18)
    with rvc.condition(x, block=333) as out:
        assert np.array_equal(out[:], expected)


def test_reading_in_blocks_gives_the_whole_file_decoded_at_once(tmp_path, monkeypatch):
    stereo = np.stack([speech_like(3.0, sr=44100), speech_like(3.0, sr=44100, f0=200.0)], axis=1) * 0.5
    sf.write(tmp_path / "in.wav", stereo.astype(np.float32), 44100, subtype="FLOAT")
    whole = rvc.read_input_audio(tmp_path / "in.wav", warn=lambda _: None)
    monkeypatch.setattr(rvc, "READ_BLOCK", 1000)
    blocks = rvc.read_input_audio(tmp_path / "in.wav", warn=lambda _: None)
    expected = rvc.resample(rvc.downmix(stereo.astype(np.float32)), 44100, rvc.SAMPLE_RATE)
    assert np.array_equal(blocks.samples[:], whole.samples[:])
    assert np.array_equal(whole.samples[:], expected)
    assert blocks.peak == whole.peak == float(np.abs(expected).max())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    return dict(voice=rvc.load_voice_model(make_voice_model_file(root / "v.pth", version="v1", seed=1)),
                hubert=rvc.load_hubert(make_hubert_fairseq(root / "h.pt", hidden=64, layers=10, heads=4,
                                                           ffn=128, conv_dim=32, seed=3)),
                rmvpe=rvc.load_rmvpe(make_rmvpe_file(root / "r.pt", seed=4)))


def test_the_conversion_is_the_same_whatever_the_size_of_its_pieces(tiny_models, monkeypatch):
    # Segments of ~3 s (the reference's 38 s, scaled down) so that 14 s of input crosses
    # several segments, several conditioning blocks and several post-processing pieces.
    for name, seconds in [("T_MAX", 4), ("T_CENTER", 3), ("T_QUERY", 1)]:
        monkeypatch.setattr(rvc, name, seconds * rvc.SAMPLE_RATE)
    audio = speech_like(14.0)
    params = rvc.ConversionParams(f0_method="rmvpe", rms_mix_rate=0.4, resample_sr=44100, noise=False)
    converter = rvc.Converter(tiny_models["voice"], tiny_models["hubert"], tiny_models["rmvpe"])
    trace: list = []
    converter.convert(audio, params, trace=trace)
    assert len(trace) >= 4  # several segments
    # (Not the traced run's output: a trace decodes the padding too, in other decoder chunks,
    # whose float rounding may move a sample by one step.)
    whole, rate = converter.convert(audio, params)
    monkeypatch.setattr(rvc, "MIX_PIECE", 10_000)
    pieces = np.concatenate(list(converter.stream(audio, params, block=20_000)))
    assert rate == 44100 and len(whole) > 13 * rate
    assert np.array_equal(pieces, whole)


# The child converts with the tiny networks and reports its peak RSS (VmHWM). Segments are
# scaled down (as above) so that both lengths reach the same largest segment: what remains
# is the pipeline's own memory per second of input, which disk to disk is nearly nothing.
PEAK_OF_CONVERSION = f"""
import re, sys
sys.path.insert(0, {str(REPO)!r})
import rvc_modulator as rvc
rvc.T_MAX, rvc.T_CENTER, rvc.T_QUERY = 10 * rvc.SAMPLE_RATE, 8 * rvc.SAMPLE_RATE, 1 * rvc.SAMPLE_RATE
code = rvc.main(sys.argv[1:])
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
sys.exit(code)
"""
# Measured (tiny networks, 20 s against 120 s): +14 MB, heap fragmentation that levels off
# (120 s and 480 s peak the same). Without the bounded convolution cache (main's
# LRU_CACHE_CAPACITY) it was +29 MB and still growing at 480 s; the whole-array pipeline
# disk to disk replaced grew 40 MB/min, and more for longer inputs.
GROWTH_PER_MINUTE_MB = 15


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_does_not_grow_with_the_input(tmp_path):
    models = tmp_path / "models"
    (models / "rvc").mkdir(parents=True)
    make_voice_model_file(models / "rvc" / "voice.pth", version="v1", f0=False, seed=1)
    make_hubert_fairseq(models / "hubert_base.pt", hidden=64, layers=10, heads=4, ffn=128, conv_dim=32, seed=3)

    def peak_mb(seconds: float) -> float:
        source = tmp_path / f"in{seconds}.wav"
        sf.write(source, speech_like(seconds), rvc.SAMPLE_RATE)
        result = subprocess.run([sys.executable, "-c", PEAK_OF_CONVERSION, str(source), str(tmp_path / "out.wav"),
                                 "voice", "--models_dir", str(models), "--quiet"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split()[-1]) / 1024

    short, long = peak_mb(20.0), peak_mb(120.0)
    assert long - short <= GROWTH_PER_MINUTE_MB * (120 - 20) / 60, (short, long)
