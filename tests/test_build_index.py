"""--build_index makes the WebUI's index (train/train_index.py) of a prepared folder or of a
folder of recordings: the same size, lists and vectors, at <models_dir>/rvc/NAME.index and
under the WebUI's own names, and usable by a conversion."""
from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

import rvc_modulator as rvc
from conftest import main_json

WEBUI_SEEDS = {"v2": 13571, "v1": 13572}  # np.random.seed() the fixture's run made before the script


def webui_index(fixtures: Path, version: str):
    return faiss.read_index(str(fixtures / "training" / f"added_IVF23_Flat_nprobe_1_sh_train40k_{version}.index"))


@pytest.fixture(scope="module")
def work(fixtures: Path, tmp_path_factory) -> Path:
    """A prepared folder holding the WebUI's own features (v1 and v2)."""
    work = tmp_path_factory.mktemp("work")
    for version in ("v1", "v2"):
        shutil.copytree(fixtures / "training" / rvc.FEATURE_DIRS[version], work / rvc.FEATURE_DIRS[version])
    return work


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_the_index_is_the_webuis(fixtures: Path, work: Path, tmp_path: Path, version: str) -> None:
    code, report = main_json("--build_index", work, f"voice_{version}", "--model_version", version,
                             "--models_dir", tmp_path, "--seed", WEBUI_SEEDS[version], "--quiet")
    assert code == 0, report
    ours, theirs = faiss.read_index(report["index"]), webui_index(fixtures, version)
    assert Path(report["index"]) == tmp_path / "rvc" / f"voice_{version}.index"
    ivf, ivf_ref = faiss.extract_index_ivf(ours), faiss.extract_index_ivf(theirs)
    assert (ours.d, ours.ntotal, ivf.nlist, ivf.nprobe) == (theirs.d, theirs.ntotal, ivf_ref.nlist, ivf_ref.nprobe)
    vectors, reference = ours.reconstruct_n(0, ours.ntotal), theirs.reconstruct_n(0, theirs.ntotal)
    np.testing.assert_array_equal(np.unique(vectors, axis=0), np.unique(reference, axis=0))  # the same set
    np.testing.assert_array_equal(vectors, reference)  # and, with the WebUI's seed, in the same order
    # (k-means is chaotic: a float-level difference can move a centre, so the centres are
    # not compared; each vector must sit in the list of its nearest centre.)
    _, nearest = ivf.quantizer.search(vectors, 1)
    lists = np.empty(ours.ntotal, np.int64)
    for k in range(ivf.nlist):
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(k), ivf.invlists.list_size(k)).copy()
        lists[ids] = k
    np.testing.assert_array_equal(lists, nearest[:, 0])


def test_the_webuis_files_are_left_in_the_prepared_folder(work: Path, tmp_path: Path) -> None:
    code, report = main_json("--build_index", work, "me", "--model_version", "v2", "--models_dir", tmp_path,
                             "--quiet")
    assert code == 0, report
    trained, added = (work / name for name in rvc.webui_index_names(23, "me", "v2"))
    assert faiss.read_index(str(trained)).ntotal == 0 and faiss.read_index(str(added)).ntotal == 926
    assert report["files"] == [str(tmp_path / "rvc" / "me.index"), str(trained), str(added)]


def test_a_folder_with_both_feature_sizes_needs_a_version(work: Path, tmp_path: Path) -> None:
    code, report = main_json("--build_index", work, "me", "--models_dir", tmp_path, "--quiet")
    assert code == rvc.EXIT_USAGE and "--model_version" in report["message"]


def test_a_folder_of_recordings_is_prepared_for_its_index(fixtures: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    shutil.copytree(fixtures / "training" / "dataset", dataset)
    code, report = main_json("--build_index", dataset, "rec", "--models_dir", tmp_path / "models",
                             "--hubert", fixtures / "models" / "hubert_tiny_v2", "--quiet")
    assert code == 0, report
    assert (report["vectors"], report["dim"], report["nlist"]) == (926, 768, 23)
    untouched = sorted(p.name for p in (fixtures / "training" / "dataset").iterdir())
    assert sorted(p.name for p in dataset.iterdir()) == untouched  # (prepared elsewhere)


def test_many_features_are_clustered_first(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "work" / rvc.FEATURE_DIRS["v1"]
    folder.mkdir(parents=True)
    np.save(folder / "0_0.npy", np.random.default_rng(0).standard_normal((600, 256)).astype(np.float32))
    monkeypatch.setattr(rvc, "INDEX_MAX_VECTORS", 500)
    monkeypatch.setattr(rvc, "INDEX_CENTRES", 80)
    code, report = main_json("--build_index", tmp_path / "work", "big", "--models_dir", tmp_path, "--quiet")
    assert code == 0, report
    assert (report["features"], report["vectors"], report["nlist"]) == (600, 80, rvc.index_lists(80))


def test_a_built_index_serves_a_conversion(fixtures: Path, work: Path, tmp_path: Path, speech: Path) -> None:
    models = tmp_path / "models"
    (models / "rvc").mkdir(parents=True)
    shutil.copy(fixtures / "models" / "tiny_v2_40k_f0.pth", models / "rvc" / "tiny.pth")
    code, report = main_json("--build_index", work, "tiny", "--model_version", "v2", "--models_dir", models,
                             "--quiet")
    assert code == 0, report
    code, report = main_json(speech, tmp_path / "out.wav", "tiny", "--index_name", "auto", "--models_dir", models,
                             "--hubert", fixtures / "models" / "hubert_tiny_v2",
                             "--rmvpe", fixtures / "models" / "rmvpe_tiny" / "rmvpe.pt", "--quiet")
    assert code == 0 and report["index"] == "tiny", report


def test_no_features_and_no_recordings_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, report = main_json("--build_index", tmp_path / "empty", "x", "--models_dir", tmp_path, "--quiet")
    assert code == rvc.EXIT_BAD_INPUT and "no audio files" in report["message"], report
    assert not (tmp_path / "rvc" / "x.index").exists()
