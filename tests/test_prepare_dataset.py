"""--prepare_dataset does what the WebUI's dataset preparation does (train/preprocess.py,
extract_f0.py, extract_hubert_feature.py): the same chunks under the same names, the same
16 kHz copies, features and pitch, in the WebUI's layout; it resumes, and refuses a folder
without usable audio.

The references (../shared/fixtures/training/) are the official scripts' output on four
short recordings, with the tiny HuBERT and RMVPE of ../models/.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import main_json, snr_db

CHUNKS = ["0_1", "0_2", "1_1", "1_2", "2_0", "2_2", "2_3", "3_1", "3_2"]  # the WebUI's names, with its gaps


def base_files(fixtures: Path, version: str = "v2") -> list[str]:
    return ["--hubert", fixtures / "models" / f"hubert_tiny_{version}",
            "--rmvpe", fixtures / "models" / "rmvpe_tiny" / "rmvpe.pt"]


@pytest.fixture(scope="module")
def prepared(fixtures: Path, tmp_path_factory) -> tuple[Path, dict]:
    """The training fixture's dataset prepared by us (v2 features, rmvpe pitch), then the v1
    features added to the same folder."""
    work = tmp_path_factory.mktemp("prepared") / "work"
    code, report = main_json("--prepare_dataset", fixtures / "training" / "dataset", work,
                             *base_files(fixtures), "--quiet")
    assert code == 0, report
    code, v1 = main_json("--prepare_dataset", fixtures / "training" / "dataset", work,
                         *base_files(fixtures, "v1"), "--model_version", "v1", "--quiet")
    assert code == 0, v1
    return work, report


def test_chunks_have_the_webuis_names_and_samples(fixtures: Path, prepared) -> None:
    work, report = prepared
    reference = fixtures / "training" / rvc.GT_WAVS
    assert sorted(p.stem for p in (work / rvc.GT_WAVS).glob("*.wav")) == CHUNKS
    assert report["chunks"] == len(CHUNKS) and report["recordings"] == 4
    for name in CHUNKS:
        ours, rate = sf.read(work / rvc.GT_WAVS / f"{name}.wav", dtype="float32")
        theirs, _ = sf.read(reference / f"{name}.wav", dtype="float32")
        assert rate == 40000 and sf.info(work / rvc.GT_WAVS / f"{name}.wav").subtype == "FLOAT"
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_16k_copies_match(fixtures: Path, prepared) -> None:
    work, _ = prepared
    for name in CHUNKS:
        ours, rate = sf.read(work / rvc.WAVS_16K / f"{name}.wav", dtype="float32")
        theirs, _ = sf.read(fixtures / "training" / rvc.WAVS_16K / f"{name}.wav", dtype="float32")
        assert rate == 16000 and len(ours) == len(theirs), name
        assert np.abs(ours - theirs).max() <= 1e-5, name


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_features_match(fixtures: Path, prepared, version: str) -> None:
    work, _ = prepared
    folder = rvc.FEATURE_DIRS[version]
    for name in CHUNKS:
        ours = np.load(work / folder / f"{name}.npy")
        theirs = np.load(fixtures / "training" / folder / f"{name}.npy")
        assert ours.shape == theirs.shape and ours.dtype == np.float32, name
        assert snr_db(theirs, ours) >= 60, name


def test_pitch_matches_with_unvoiced_frames_filled(fixtures: Path, prepared) -> None:
    work, _ = prepared
    for name in CHUNKS:
        hz = np.load(work / rvc.F0_HZ_DIR / f"{name}.wav.npy")
        hz_ref = np.load(fixtures / "training" / rvc.F0_HZ_DIR / f"{name}.wav.npy")
        assert hz.dtype == np.float64 and hz.shape == hz_ref.shape and (hz > 0).all(), name
        assert snr_db(hz_ref, hz) >= 60, name
        coarse = np.load(work / rvc.F0_COARSE_DIR / f"{name}.wav.npy")
        coarse_ref = np.load(fixtures / "training" / rvc.F0_COARSE_DIR / f"{name}.wav.npy")
        assert coarse.dtype == np.int64 and coarse.shape == coarse_ref.shape, name
        assert np.abs(coarse - coarse_ref).max() <= 1 and np.mean(coarse == coarse_ref) >= 0.99, name


def test_a_second_run_redoes_only_what_is_missing(fixtures: Path, prepared, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(prepared[0], work)
    (work / rvc.GT_WAVS / "1_2.wav").unlink()
    (work / rvc.FEATURE_DIRS["v2"] / "2_3.npy").unlink()
    before = (work / rvc.F0_HZ_DIR / "0_1.wav.npy").stat().st_mtime_ns
    code, report = main_json("--prepare_dataset", fixtures / "training" / "dataset", work,
                             *base_files(fixtures), "--quiet")
    assert code == 0, report
    assert (report["written"], report["features_computed"], report["pitch_computed"]) == (1, 1, 0)
    assert (work / rvc.GT_WAVS / "1_2.wav").read_bytes() == (prepared[0] / rvc.GT_WAVS / "1_2.wav").read_bytes()
    assert (work / rvc.F0_HZ_DIR / "0_1.wav.npy").stat().st_mtime_ns == before


def test_a_stereo_44k_recording_is_mixed_down_and_resampled(fixtures: Path, tmp_path: Path) -> None:
    """The WebUI decodes with ffmpeg, we with soundfile and soxr: the same chunks, each as
    long as the WebUI's within one slicer frame (15 ms)."""
    code, report = main_json("--prepare_dataset", fixtures / "training" / "dataset_stereo44k", tmp_path / "w",
                             *base_files(fixtures), "--quiet")
    assert code == 0, report
    expected = rvc_manifest(fixtures)["stereo44k_preprocess(slice sample counts, files not kept)"]
    for folder, rate in ((rvc.GT_WAVS, 40000), (rvc.WAVS_16K, 16000)):
        ours = {p.name: sf.info(p).frames for p in sorted((tmp_path / "w" / folder).glob("*.wav"))}
        assert sorted(ours) == sorted(expected[folder])
        for name, frames in expected[folder].items():
            assert abs(ours[name] - frames) <= round(rate * rvc.SLICE_HOP_MS / 1000), (folder, name)


def rvc_manifest(fixtures: Path) -> dict:
    import json

    return json.loads((fixtures / "training" / "manifest.json").read_text())


def test_the_slicer_cuts_at_silences_and_keeps_some_of_them() -> None:
    rate = 40000
    tone = 0.5 * np.sin(2 * np.pi * 220 * np.arange(2 * rate) / rate)
    pause = np.zeros(rate)
    pieces = rvc.Slicer.at(rate).slices(np.concatenate([tone, pause, tone]))
    assert len(pieces) == 2
    kept = rate * rvc.SLICE_MAX_KEPT_MS // 1000
    for piece in pieces:
        assert 2 * rate <= len(piece) <= 2 * rate + kept + rate * rvc.SLICE_HOP_MS // 1000


def test_chunks_are_numbered_with_the_webuis_gaps() -> None:
    rate = 1000
    pieces = [np.ones(5 * rate), np.ones(2 * rate)]
    chunks = list(rvc.slice_chunks(pieces, rate))
    assert [j for j, _ in chunks] == [0, 2, 3]
    assert [len(c) for _, c in chunks] == [int(rvc.CHUNK_SECONDS * rate), 5 * rate - int(3.4 * rate), 2 * rate]


def test_levelling_is_the_webuis_and_skips_broken_chunks() -> None:
    x = np.array([0.0, 0.5, -1.0])
    np.testing.assert_allclose(rvc.level_chunk(x), x / 1.0 * 0.675 + 0.25 * x)
    assert rvc.level_chunk(np.zeros(4)) is None and rvc.level_chunk(np.array([3.0])) is None


def test_an_empty_folder_is_refused(fixtures: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, report = main_json("--prepare_dataset", tmp_path / "empty", tmp_path / "w", *base_files(fixtures),
                             "--quiet")
    assert code == rvc.EXIT_BAD_INPUT and "no audio files" in report["message"]
    assert not list((tmp_path / "w").rglob("*.wav"))


def test_non_audio_files_are_skipped_with_a_warning_each(fixtures: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("not audio")
    (data / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    code, report = main_json("--prepare_dataset", data, tmp_path / "w", *base_files(fixtures), "--quiet")
    assert code == rvc.EXIT_BAD_INPUT and "no readable audio" in report["message"]
    assert any("notes.txt" in w for w in report["warnings"]) and any("broken.wav" in w for w in report["warnings"])
    shutil.copy(fixtures / "training" / "dataset" / "rec3_owl.wav", data / "owl.wav")
    code, report = main_json("--prepare_dataset", data, tmp_path / "w", *base_files(fixtures), "--quiet")
    assert code == 0 and report["skipped_files"] == ["broken.wav", "notes.txt"]
    # owl.wav is the third entry by name: its chunks are 2_*, as the WebUI numbers them
    assert sorted(p.stem for p in (tmp_path / "w" / rvc.GT_WAVS).glob("*.wav")) == ["2_1", "2_2"]


def test_a_missing_folder_is_not_found(fixtures: Path, tmp_path: Path) -> None:
    code, report = main_json("--prepare_dataset", tmp_path / "nowhere", tmp_path / "w", *base_files(fixtures))
    assert code == rvc.EXIT_NOT_FOUND and "dataset folder not found" in report["message"]


def test_a_folder_prepared_at_another_rate_is_not_mixed(fixtures: Path, prepared, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(prepared[0], work)
    code, report = main_json("--prepare_dataset", fixtures / "training" / "dataset", work, *base_files(fixtures),
                             "--sample_rate", "48k", "--quiet")
    assert code == rvc.EXIT_USAGE and "prepared at 40000 Hz" in report["message"]
