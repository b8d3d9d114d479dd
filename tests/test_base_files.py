"""hubert_base.pt and rmvpe.pt, which users download themselves: a missing one is named
with its public source; --check verifies a file of a published release's size against
that release's SHA-256 (a damaged download is a warning); a file under the published name
that fails to load and is smaller than the release says it looks cut short."""
from __future__ import annotations

import hashlib

import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import run_main, speech_like
from factories import make_models_folder

SOURCE = "https://huggingface.co/lj1995/VoiceConversionWebUI/resolve/main/"


@pytest.fixture()
def models(tmp_path):
    return make_models_folder(tmp_path / "models")


@pytest.fixture()
def speech(tmp_path):
    path = tmp_path / "speech.wav"
    sf.write(path, speech_like(0.5), rvc.SAMPLE_RATE, subtype="PCM_16")
    return path


def check(capsys, models, speech, tmp_path, *extra):
    return run_main(capsys, speech, tmp_path / "out.wav", "voice", "--models_dir", models, "--json", "--check",
                    "--index_name", "voice", *extra)


def test_the_published_releases_are_stated_with_their_sizes():
    assert rvc.PUBLISHED_FILES[rvc.HUBERT_FILE] == {
        189507909: "f54b40fd2802423a5643779c4861af1e9ee9c1564dc9d32f54f20b5ffba7db96"}
    assert set(rvc.PUBLISHED_FILES[rvc.RMVPE_FILE]) == {181184272, 181189687}


def test_a_missing_hubert_names_its_public_source(capsys, models, speech, tmp_path):
    (models / "hubert_base.pt").unlink()
    code, report, _ = check(capsys, models, speech, tmp_path)
    assert code == rvc.EXIT_NOT_FOUND and f"download hubert_base.pt (190 MB) from {SOURCE}hubert_base.pt" in \
        report["message"]


def test_a_missing_rmvpe_names_its_public_source(capsys, models, speech, tmp_path):
    (models / "rmvpe.pt").unlink()
    code, report, _ = check(capsys, models, speech, tmp_path, "--f0_method", "rmvpe")
    assert code == rvc.EXIT_NOT_FOUND and f"from {SOURCE}rmvpe.pt" in report["message"]


def test_a_file_of_a_published_size_is_verified(capsys, models, speech, tmp_path, monkeypatch):
    hubert = models / "hubert_base.pt"
    digest = hashlib.sha256(hubert.read_bytes()).hexdigest()
    monkeypatch.setitem(rvc.PUBLISHED_FILES, rvc.HUBERT_FILE, {hubert.stat().st_size: digest})
    code, report, err = check(capsys, models, speech, tmp_path)
    assert code == 0 and report["warnings"] == []
    assert report["resolved"]["hubert_release"] == "the published hubert_base.pt: SHA-256 verified"
    assert f"HuBERT:       {hubert} (the published hubert_base.pt: SHA-256 verified)" in err


def test_a_file_of_a_published_size_with_other_bytes_is_a_warning(capsys, models, speech, tmp_path, monkeypatch):
    rmvpe = models / "rmvpe.pt"
    monkeypatch.setitem(rvc.PUBLISHED_FILES, rvc.RMVPE_FILE, {rmvpe.stat().st_size: "0" * 64})
    code, report, _ = check(capsys, models, speech, tmp_path)
    assert code == 0 and report["resolved"]["rmvpe_release"] == "not the published rmvpe.pt: SHA-256 differs"
    assert report["warnings"] == [f"{rmvpe} has the size of the published rmvpe.pt but not its SHA-256: a damaged "
                                  f"download? ({rvc.where_to_get(rvc.RMVPE_FILE)})"]


def test_a_file_of_another_size_is_not_judged(capsys, models, speech, tmp_path):
    code, report, _ = check(capsys, models, speech, tmp_path)
    assert code == 0 and report["resolved"]["hubert_release"] is None and report["resolved"]["rmvpe_release"] is None


def test_a_cut_short_download_is_called_one(capsys, models, speech, tmp_path):
    hubert = models / "hubert_base.pt"
    hubert.write_bytes(hubert.read_bytes()[:50_000])
    code, report, _ = check(capsys, models, speech, tmp_path)
    assert code == rvc.EXIT_BAD_MODEL
    assert "it holds 50000 of the published 189507909 bytes: an incomplete download?" in report["message"]
    renamed = models / "my_hubert.pt"  # under another name it may be anything: no guess
    hubert.rename(renamed)
    code, report, _ = check(capsys, models, speech, tmp_path, "--hubert", renamed)
    assert code == rvc.EXIT_BAD_MODEL and "incomplete download" not in report["message"]
