"""--nprobe and --index_k steer the feature retrieval: the defaults are the WebUI's (the
index file's nprobe, 8 neighbours), other values change what is retrieved, and a large
index searched in one list gets a hint."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import run_main


@pytest.fixture(scope="module")
def voice(fixtures: Path, tmp_path_factory) -> Path:
    """A models folder: the tiny v2 model with its index (12 lists, nprobe 1) and an index of
    random features with NPROBE_HINT_LISTS lists, and the tiny HuBERT and RMVPE."""
    models = tmp_path_factory.mktemp("models")
    (models / "rvc").mkdir()
    shutil.copy(fixtures / "models" / "tiny_v2_40k_f0.pth", models / "rvc" / "tiny.pth")
    shutil.copy(fixtures / "models" / "added_IVF12_Flat_nprobe_1_tiny_v2_v2.index", models / "rvc" / "tiny.index")
    shutil.copytree(fixtures / "models" / "hubert_tiny_v2", models / rvc.HUBERT_FOLDER)
    shutil.copy(fixtures / "models" / "rmvpe_tiny" / "rmvpe.pt", models / rvc.RMVPE_FILE)
    features = models / "work" / rvc.FEATURE_DIRS["v2"]
    features.mkdir(parents=True)
    n = 39 * rvc.NPROBE_HINT_LISTS  # index_lists(n) == NPROBE_HINT_LISTS
    np.save(features / "0_0.npy", np.random.default_rng(0).standard_normal((n, 768)).astype(np.float32))
    assert rvc.main(["--build_index", str(models / "work"), "large", "--models_dir", str(models), "--quiet"]) == 0
    return models


def convert(capsys, voice: Path, speech: Path, out: Path, *options: str) -> tuple[np.ndarray, str]:
    code, report, err = run_main(capsys, speech, out, "tiny", "--models_dir", voice, "--no_noise", "--json",
                                 *options)
    assert code == 0, report
    return sf.read(out)[0], err


def test_the_defaults_are_the_files_nprobe_and_8_neighbours(capsys, voice: Path, speech: Path, tmp_path) -> None:
    default, _ = convert(capsys, voice, speech, tmp_path / "a.wav", "--index_name", "tiny")
    same, _ = convert(capsys, voice, speech, tmp_path / "b.wav", "--index_name", "tiny", "--nprobe", "1",
                      "--index_k", "8")
    np.testing.assert_array_equal(default, same)
    wider, _ = convert(capsys, voice, speech, tmp_path / "c.wav", "--index_name", "tiny", "--nprobe", "12")
    fewer, _ = convert(capsys, voice, speech, tmp_path / "d.wav", "--index_name", "tiny", "--index_k", "1")
    assert not np.array_equal(default, wider) and not np.array_equal(default, fewer)


def test_one_neighbour_is_the_nearest_stored_feature(voice: Path) -> None:
    index = rvc.load_index(voice / "rvc" / "tiny.index", 768)
    query = index.vectors[:5] + 1e-3
    retrieved = rvc.retrieve(query, index, k=1, nprobe=index.nlist)  # every list: exact search
    np.testing.assert_allclose(retrieved, index.vectors[:5], atol=1e-6)


def test_a_large_index_searched_in_one_list_gets_a_hint(capsys, voice: Path, speech: Path, tmp_path) -> None:
    _, err = convert(capsys, voice, speech, tmp_path / "a.wav", "--index_name", "large")
    assert f"large.index has {rvc.NPROBE_HINT_LISTS} lists" in err and f"--nprobe {rvc.NPROBE_SUGGESTED}" in err
    _, err = convert(capsys, voice, speech, tmp_path / "b.wav", "--index_name", "large", "--nprobe", "8")
    assert "lists and is searched" not in err
    _, err = convert(capsys, voice, speech, tmp_path / "c.wav", "--index_name", "tiny")  # 12 lists: no hint
    assert "lists and is searched" not in err


@pytest.mark.parametrize("option, value", [("--nprobe", "0"), ("--index_k", "0"), ("--index_k", "many")])
def test_out_of_range_values_are_usage_errors(capsys, option: str, value: str) -> None:
    code, report, _ = run_main(capsys, "in.wav", "out.wav", "m", option, value, "--json")
    assert code == rvc.EXIT_USAGE and option in report["message"]
