"""An output lasts exactly as long as its input, to the sample at the output's rate, for
any length (one sample, lengths just off the 10 ms frame grid, several segments), any
source rate and any --resample_sr; the tail the reference leaves out is real audio that
joins the rest without a click."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import run_cli, speech_like
from factories import make_hubert_fairseq, make_rmvpe_file, make_voice_model_file

SR = rvc.SAMPLE_RATE


@pytest.fixture(scope="module")
def converter(tmp_path_factory) -> rvc.Converter:
    root = tmp_path_factory.mktemp("models")
    voice = rvc.load_voice_model(make_voice_model_file(root / "v.pth", version="v1", sample_rate=40000, seed=1))
    hubert = rvc.load_hubert(make_hubert_fairseq(root / "h.pt", hidden=64, layers=10, heads=4, ffn=128,
                                                 conv_dim=32, seed=3))
    return rvc.Converter(voice, hubert, rvc.load_rmvpe(make_rmvpe_file(root / "r.pt", seed=4)))


def params(**kwargs) -> rvc.ConversionParams:
    return rvc.ConversionParams(f0_method="rmvpe", noise=False, **kwargs)


@pytest.mark.parametrize("n", [1, 2, 159, 160, 161, 319, 320, 321, 399, 401, 16000 - 1, 16000 + 7, 23457])
@pytest.mark.parametrize("resample_sr", [0, 44100, 22050])
def test_the_output_lasts_as_long_as_the_input(converter, n, resample_sr):
    samples, rate = converter.convert(speech_like(n / SR + 1e-9)[:n] if n > 1 else np.array([0.25], np.float32),
                                      params(resample_sr=resample_sr))
    assert rate == (resample_sr or 40000)
    assert len(samples) == rvc.output_length(n, SR, rate) == -(-n * rate // SR)


def test_the_last_of_several_segments_reaches_the_end_too(converter, monkeypatch):
    for name, seconds in [("T_MAX", 4), ("T_CENTER", 3), ("T_QUERY", 1)]:
        monkeypatch.setattr(rvc, name, seconds * SR)
    n = 11 * SR + 77
    trace: list = []
    samples, rate = converter.convert(speech_like(12.0)[:n], params(), trace=trace)
    assert len(trace) >= 3
    assert len(samples) == rvc.output_length(n, SR, rate)


def test_the_tail_is_the_decoded_audio_going_on_without_a_click(converter):
    n = 2 * SR + 150  # the reference stops up to 20 ms short of this
    audio = speech_like(3.0)[:n]
    trace: list = []
    samples, rate = converter.convert(audio, params(rms_mix_rate=1.0), trace=trace)  # no re-levelling
    (segment,) = trace
    hop = converter.voice.hop
    start = rvc.X_PAD * rvc.FRAMES_PER_SECOND * hop
    decoded = segment["net_out"][start:]  # the whole segment decoded, the padding on the right included
    reference_end = len(decoded) - start
    assert len(samples) - reference_end > hop // 2  # the reference leaves a tail out (here 9.4 ms)...
    # ...and ours is what the network makes there, scaled to int16 as the rest.
    expected = rvc.to_int16(decoded[:len(samples)], float(np.abs(decoded[:len(samples)]).max()))
    assert np.abs(samples.astype(int) - expected.astype(int)).max() <= 1
    steps = np.abs(np.diff(samples.astype(np.float64)))
    assert steps[reference_end - 1:].max() <= steps[:reference_end].max()


def test_the_duration_is_the_original_files_at_any_source_rate(tmp_path):
    models = tmp_path / "models"
    (models / "rvc").mkdir(parents=True)
    make_voice_model_file(models / "rvc" / "voice.pth", version="v1", sample_rate=40000, f0=False, seed=2)
    make_hubert_fairseq(models / "hubert_base.pt", hidden=64, layers=10, heads=4, ffn=128, conv_dim=32, seed=3)
    for source_rate, frames, resample_sr in [(44100, 44100 + 13, 0), (48000, 24007, 44100), (22050, 11025, 0)]:
        source = tmp_path / f"in_{source_rate}.wav"
        sf.write(source, speech_like(frames / source_rate + 0.01, sr=source_rate)[:frames], source_rate)
        out = tmp_path / "out.wav"
        result = run_cli(source, out, "voice", "--models_dir", models, "--no_noise", "--json",
                         "--resample_sr", resample_sr)
        assert result.returncode == 0, result.stderr
        rate = resample_sr or 40000
        info = sf.info(out)
        assert info.samplerate == rate and info.frames == -(-frames * rate // source_rate), (source_rate, frames)
        assert json.loads(result.stdout)["output_duration"] == round(info.frames / rate, 6)
