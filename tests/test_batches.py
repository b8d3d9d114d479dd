"""A folder as INPUT and a folder as OUTPUT: every audio file converted (sorted, not
recursing), the models loaded once, a bad file failing alone (exit 8, EXIT_PARTIAL),
each output what a single conversion of that file gives; what no file could survive (a
missing model, no audio at all, OUTPUT a file) stops the batch before any work."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import run_main, speech_like


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three good inputs of different formats and rates, one broken, and what is not an input."""
    root = tmp_path_factory.mktemp("in")
    sf.write(root / "b_speech.wav", speech_like(1.2), 16000, subtype="PCM_16")
    sf.write(root / "a_song.flac", speech_like(0.8, 44100, f0=220.0), 44100, subtype="PCM_16")
    sf.write(root / "c_note.ogg", np.stack([speech_like(0.6, 48000)] * 2, axis=1), 48000)
    (root / "broken.wav").write_bytes(b"RIFF....WAVE but no more")
    (root / "notes.txt").write_text("not audio")
    (root / ".hidden.wav").write_bytes(b"")
    (root / "sub").mkdir()
    sf.write(root / "sub" / "nested.wav", speech_like(0.5), 16000)
    return root


def batch(capsys, models, source, target, *extra):
    return run_main(capsys, source, target, "voice", "--models_dir", models, "--no_noise", "--json", *extra)


def test_every_audio_file_is_converted_and_a_bad_one_fails_alone(capsys, models, folder, tmp_path, monkeypatch):
    loads = {name: 0 for name in ("load_voice_model", "load_hubert", "load_rmvpe")}
    for name in loads:
        def counted(*args, _real=getattr(rvc, name), _name=name, **kwargs):
            loads[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(rvc, name, counted)
    code, report, err = batch(capsys, models, folder, tmp_path / "out")
    assert code == rvc.EXIT_PARTIAL == 8
    assert report["ok"] is False and report["exit_code"] == 8
    names = [f["input"].rsplit("/", 1)[-1] for f in report["files"]]
    assert names == ["a_song.flac", "b_speech.wav", "broken.wav", "c_note.ogg"]  # sorted; no .txt, hidden, nested
    outcome = {name: f for name, f in zip(names, report["files"])}
    assert [n for n, f in outcome.items() if not f["ok"]] == ["broken.wav"]
    broken = outcome["broken.wav"]
    assert broken["exit_code"] == rvc.EXIT_BAD_INPUT and "cannot decode" in broken["message"]
    assert report["summary"] == {"files": 4, "succeeded": 3, "failed": 1, "audio_seconds": pytest.approx(2.6),
                                 "seconds": pytest.approx(report["summary"]["seconds"])}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_song.wav", "b_speech.wav", "c_note.wav"]
    assert outcome["a_song.flac"]["input_sample_rate"] == 44100 and outcome["c_note.ogg"]["input_channels"] == 2
    assert loads == {"load_voice_model": 1, "load_hubert": 1, "load_rmvpe": 1}  # once for the whole folder
    assert "[3/4] broken.wav" in err and "converted 3 of 4 files" in err and "failed: broken.wav" in err
    single = tmp_path / "single.wav"
    code, alone, _ = run_main(capsys, folder / "a_song.flac", single, "voice", "--models_dir", models, "--no_noise",
                              "--json")
    assert code == 0 and single.read_bytes() == (tmp_path / "out" / "a_song.wav").read_bytes()


def test_all_good_exits_0_in_the_format_asked(capsys, models, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for name in ("x.wav", "x.flac"):  # one stem, two files: each keeps its whole name
        sf.write(source / name, speech_like(0.5), 16000)
    code, report, _ = batch(capsys, models, source, tmp_path / "out", "--output_format", "flac")
    assert code == 0 and report["ok"] and report["summary"]["failed"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.flac.flac", "x.wav.flac"]
    assert sf.info(tmp_path / "out" / "x.wav.flac").format == "FLAC"


def test_check_checks_every_file_and_writes_nothing(capsys, models, folder, tmp_path):
    code, report, _ = batch(capsys, models, folder, tmp_path / "out", "--check")
    assert code == rvc.EXIT_PARTIAL and [f["ok"] for f in report["files"]] == [True, True, False, True]
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("case, code, mentions", [
    ("missing model", rvc.EXIT_NOT_FOUND, "voice model not found"),
    ("no audio", rvc.EXIT_BAD_INPUT, "no audio files"),
    ("output is a file", rvc.EXIT_USAGE, "must be a folder too"),
    ("output is the input", rvc.EXIT_USAGE, "another folder"),
])
def test_what_no_file_could_survive_stops_the_batch_before_any_work(capsys, models, folder, tmp_path,
                                                                     case, code, mentions):
    source, target, model = folder, tmp_path / "out", "voice"
    if case == "missing model":
        model = "nobody"
    elif case == "no audio":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "output is a file":
        target.write_text("a file")
    elif case == "output is the input":
        target = folder
    got, report, err = run_main(capsys, source, target, model, "--models_dir", models, "--json")
    assert got == code and mentions in report["message"] and "files" not in report
    assert err.count("error: ") == 1
    if case != "output is a file":
        assert not (tmp_path / "out").exists()


def test_a_folder_cannot_go_to_stdout(capsys, models, folder):
    capsys.readouterr()
    assert rvc.main([str(folder), "-", "voice", "--models_dir", str(models)]) == rvc.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and "must be a folder too" in err
