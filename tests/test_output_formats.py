"""The output's format: its extension's (.wav, .flac, .ogg, .mp3), else --output_format's
(outputs without an extension, "-"); WAV and FLAC at --bit_depth 16 (the WebUI's int16
samples), 24 or 32f (WAV), which keep the same audio without the rounding to 16 bits; MP3
at an MPEG rate (a 40 kHz model's output goes to 44.1 kHz); a soundfile that cannot write
MP3 is a clear output error before any work."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import run_main, speech_like


@pytest.fixture(scope="module")
def reference(tmp_path_factory, models, speech):
    """The 16-bit WAV every other format is compared with."""
    out = tmp_path_factory.mktemp("ref") / "ref.wav"
    assert rvc.main([str(speech), str(out), "voice", "--models_dir", str(models), "--no_noise", "--quiet",
                     "--index_name", "voice"]) == 0
    return sf.read(out, dtype="float64")[0]


def convert(capsys, models, speech, output, *extra):
    return run_main(capsys, speech, output, "voice", "--models_dir", models, "--json", "--no_noise",
                    "--index_name", "voice", *extra)


@pytest.mark.parametrize("depth, subtype, step", [("24", "PCM_24", 2.0**-23), ("32f", "FLOAT", 0.0)])
def test_a_deeper_wav_holds_the_same_audio_unrounded(capsys, models, speech, tmp_path, reference, depth, subtype,
                                                     step):
    code, report, _ = convert(capsys, models, speech, tmp_path / "deep.wav", "--bit_depth", depth)
    assert code == 0 and report["output_subtype"] == subtype == sf.info(tmp_path / "deep.wav").subtype
    deep = sf.read(tmp_path / "deep.wav", dtype="float64")[0]
    assert len(deep) == len(reference)
    difference = np.abs(deep - reference)
    assert difference.max() <= 2.0**-15 + step  # int16 truncates toward zero: at most one 16-bit step
    assert difference.mean() > 2.0**-18  # and it is not the 16-bit samples again


def test_flac_has_24_bits_but_no_float(capsys, models, speech, tmp_path):
    code, report, _ = convert(capsys, models, speech, tmp_path / "out.flac", "--bit_depth", "24")
    assert code == 0 and sf.info(tmp_path / "out.flac").subtype == "PCM_24"
    code, report, _ = convert(capsys, models, speech, tmp_path / "float.flac", "--bit_depth", "32f")
    assert code == rvc.EXIT_USAGE and report["message"] == "FLAC holds 16 or 24-bit samples, not 32f (--bit_depth)"


def test_mp3_of_a_40k_model_is_written_at_44k(capsys, models, speech, tmp_path, reference):
    code, report, err = convert(capsys, models, speech, tmp_path / "out.mp3")
    assert code == 0, report
    info = sf.info(tmp_path / "out.mp3")
    assert (info.format, info.samplerate, report["sample_rate"]) == ("MP3", 44100, 44100)
    assert abs(info.duration - 1.0) < 0.06  # an MP3 frame's rounding at most
    assert "MP3 has no 40000 Hz audio: the output is resampled to 44100 Hz" in err


def test_mp3_at_a_rate_mpeg_lacks_is_refused(capsys, models, speech, tmp_path):
    code, report, _ = convert(capsys, models, speech, tmp_path / "out.mp3", "--resample_sr", "40000")
    assert code == rvc.EXIT_USAGE and "MP3 has no 40000 Hz audio" in report["message"]
    assert not (tmp_path / "out.mp3").exists()


def test_a_soundfile_without_mp3_is_a_clear_output_error(capsys, models, speech, tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "available_formats", lambda: {"WAV": "WAV", "FLAC": "FLAC", "OGG": "OGG"})
    code, report, _ = convert(capsys, models, speech, tmp_path / "out.mp3")
    assert code == rvc.EXIT_OUTPUT and "cannot write MP3" in report["message"]
    assert "pip install --upgrade soundfile" in report["message"] and "timings" not in report


def test_an_output_without_extension_takes_output_format(capsys, models, speech, tmp_path, reference):
    code, report, _ = convert(capsys, models, speech, tmp_path / "take1", "--output_format", "flac")
    assert code == 0 and sf.info(tmp_path / "take1").format == "FLAC" and report["output_format"] == "flac"
    assert np.array_equal(sf.read(tmp_path / "take1", dtype="float64")[0], reference)  # FLAC is lossless
    code, report, _ = convert(capsys, models, speech, tmp_path / "take2")
    assert code == rvc.EXIT_USAGE and "give --output_format" in report["message"]


def test_a_known_extension_wins_over_output_format(capsys, models, speech, tmp_path):
    code, report, _ = convert(capsys, models, speech, tmp_path / "out.wav", "--output_format", "ogg")
    assert code == 0 and sf.info(tmp_path / "out.wav").format == "WAV"
    assert report["warnings"] == ["--output_format ogg has no effect: OUTPUT's extension makes it wav"]


def test_bit_depth_on_a_lossy_format_is_warned_about(capsys, models, speech, tmp_path):
    code, report, _ = convert(capsys, models, speech, tmp_path / "out.ogg", "--bit_depth", "24")
    assert code == 0 and sf.info(tmp_path / "out.ogg").subtype == "VORBIS"
    assert report["warnings"] == ["--bit_depth has no effect on OGG: a lossy format has no bit depth"]


def test_a_folder_batch_writes_its_outputs_in_output_format_and_bit_depth(capsys, models, speech, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    sf.write(source / "a.wav", speech_like(0.5), rvc.SAMPLE_RATE)
    code, report, _ = run_main(capsys, source, tmp_path / "out", "voice", "--models_dir", models, "--json",
                               "--output_format", "wav", "--bit_depth", "24", "--index_name", "voice")
    assert code == 0 and sf.info(tmp_path / "out" / "a.wav").subtype == "PCM_24"
    code, report, _ = run_main(capsys, source, tmp_path / "out2", "voice", "--models_dir", models, "--json",
                               "--output_format", "flac", "--bit_depth", "32f")
    assert code == rvc.EXIT_USAGE and not (tmp_path / "out2").exists()
