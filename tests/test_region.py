"""--start and --duration convert only that region of the input: exactly what converting
a file cut to that region gives, to the sample; a region past the end is refused (or cut
at the end, with a warning) before any work."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import run_main, speech_like

RATE = 44100  # a source rate the pipeline resamples from


@pytest.fixture(scope="module")
def stereo(tmp_path_factory):
    data = np.stack([speech_like(4.0, RATE), speech_like(4.0, RATE, f0=190.0, seed=1)], axis=1)
    path = tmp_path_factory.mktemp("in") / "stereo.wav"
    sf.write(path, data, RATE, subtype="PCM_16")
    return path, sf.read(path, dtype="int16")[0]


def convert(capsys, models, source, output, *extra):
    return run_main(capsys, source, output, "voice", "--models_dir", models, "--no_noise", "--json", *extra)


@pytest.mark.parametrize("start, duration", [(1.25, 1.5), (0.0, 0.01), (2.5, None)])
def test_a_region_converts_as_that_region_cut_out_would(capsys, models, stereo, tmp_path, start, duration):
    path, samples = stereo
    first = round(start * RATE)
    count = len(samples) - first if duration is None else round(duration * RATE)
    cut = tmp_path / "cut.wav"
    sf.write(cut, samples[first:first + count], RATE, subtype="PCM_16")
    code, whole, _ = convert(capsys, models, cut, tmp_path / "cut_out.wav")
    assert code == 0, whole
    region = ["--start", start] + ([] if duration is None else ["--duration", duration])
    code, report, _ = convert(capsys, models, path, tmp_path / "region_out.wav", *region)
    assert code == 0, report
    assert (tmp_path / "region_out.wav").read_bytes() == (tmp_path / "cut_out.wav").read_bytes()
    assert report["region"] == {"start": round(first / RATE, 6), "duration": round(count / RATE, 6)}
    assert report["output_duration"] == pytest.approx(count / RATE, abs=1 / 40000)


def test_a_duration_past_the_end_is_cut_there_with_a_warning(capsys, models, stereo, tmp_path):
    code, report, err = convert(capsys, models, stereo[0], tmp_path / "o.wav", "--start", 3.5, "--duration", 10)
    assert code == 0
    assert report["region"]["duration"] == pytest.approx(0.5, abs=1 / RATE)
    assert any("--duration 10" in w for w in report["warnings"])


@pytest.mark.parametrize("extra", [["--start", 4.0], ["--start", 9, "--duration", 1], ["--start", 4.5, "--check"]])
def test_a_start_at_or_past_the_end_is_a_usage_error(capsys, models, stereo, tmp_path, extra):
    code, report, err = convert(capsys, models, stereo[0], tmp_path / "o.wav", *extra)
    assert code == rvc.EXIT_USAGE and report["error"] == "usage"
    assert "past the end of the input (4.000 s)" in report["message"] and "--start" in report["message"]
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize("extra", [["--start", "-1"], ["--duration", "0"], ["--duration", "nan"]])
def test_negative_or_empty_regions_are_usage_errors(capsys, models, stereo, tmp_path, extra):
    code, report, _ = convert(capsys, models, stereo[0], tmp_path / "o.wav", *extra)
    assert code == rvc.EXIT_USAGE and extra[0] in report["message"]
