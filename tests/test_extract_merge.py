"""--extract_model and --merge_models write what the WebUI's process_ckpt.py writes (the
same fp16 weights, keys, rate, pitch and version), with a config that describes the
weights, usable by a conversion; what cannot be extracted or merged is refused in one line
and leaves nothing behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import rvc_modulator as rvc
from conftest import main_json

CHECKPOINTS = {  # fixture checkpoint -> (WebUI's extraction, index of its manifest entry)
    "train_v2_40k_f0": ("extracted_v2_40k_f0.pth", 0),
    "train_v1_48k_nof0": ("extracted_v1_48k_nof0.pth", 1),
}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_fp16(ours: dict, theirs: dict, steps: int = 0) -> None:
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert value.dtype == torch.float16 and value.shape == theirs[key].shape, key
        gap = (value.view(torch.int16).int() - theirs[key].view(torch.int16).int()).abs().max().item()
        assert gap <= steps, (key, gap)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
def test_extraction_is_the_webuis_with_a_true_config(fixtures: Path, tmp_path: Path, checkpoint: str) -> None:
    reference, entry = CHECKPOINTS[checkpoint]
    code, report = main_json("--extract_model", fixtures / "training" / checkpoint / "G_2333.pth", "mine",
                             "--comment", "shared extract", "--models_dir", tmp_path, "--quiet")
    assert code == 0, report
    ours, theirs = load(tmp_path / "rvc" / "mine.pth"), load(fixtures / "training" / reference)
    assert list(ours) == list(theirs) == list(rvc.MODEL_FILE_ORDER)
    assert_same_fp16(ours["weight"], theirs["weight"])
    assert not any(k.startswith("enc_q.") for k in ours["weight"])
    facts = ("info", "version", "sr", "f0")
    assert {k: ours[k] for k in facts} == {k: theirs[k] for k in facts}
    manifest = json.loads((fixtures / "training" / "manifest.json").read_text())
    assert ours["config"] == manifest["training_tools"]["checkpoints"][entry]["tiny_config(true shape)"]


@pytest.fixture(scope="module")
def converted_models(fixtures: Path, tmp_path_factory) -> Path:
    """A models folder with both extracted models and the fixture's merge inputs."""
    models = tmp_path_factory.mktemp("models")
    for checkpoint in CHECKPOINTS:
        code, report = main_json("--extract_model", fixtures / "training" / checkpoint / "G_2333.pth", checkpoint,
                                 "--models_dir", models, "--quiet")
        assert code == 0, report
    for path in (fixtures / "training" / "merge_inputs").glob("*.pth"):
        shutil.copy(path, models / "rvc" / path.name)
    return models


def test_the_default_info_names_the_checkpoint_and_epoch(converted_models: Path) -> None:
    assert load(converted_models / "rvc" / "train_v2_40k_f0.pth")["info"] == "extracted from G_2333.pth, epoch 3"


@pytest.mark.parametrize("name, version", [("train_v2_40k_f0", "v2"), ("train_v1_48k_nof0", "v1")])
def test_extracted_models_convert(fixtures: Path, converted_models: Path, speech: Path, tmp_path: Path,
                                  name: str, version: str) -> None:
    code, report = main_json(speech, tmp_path / "out.wav", name, "--models_dir", converted_models,
                             "--hubert", fixtures / "models" / f"hubert_tiny_{version}",
                             "--rmvpe", fixtures / "models" / "rmvpe_tiny" / "rmvpe.pt", "--quiet")
    assert code == 0, report
    assert report["model_version"] == version and report["output_duration"] == pytest.approx(1.0)


def test_merging_is_the_webuis(fixtures: Path, converted_models: Path, speech: Path, tmp_path: Path) -> None:
    code, report = main_json("--merge_models", "tiny_v2_40k_f0", "tiny_v2_40k_f0_seed13700", "merged",
                             "--alpha", "0.3", "--comment", "shared merge", "--models_dir", converted_models,
                             "--quiet")
    assert code == 0, report
    ours = load(converted_models / "rvc" / "merged.pth")
    theirs = load(fixtures / "training" / "merged_v2_40k_alpha03.pth")
    assert list(ours) == list(theirs) == list(rvc.MERGED_FILE_ORDER)
    assert_same_fp16(ours["weight"], theirs["weight"], steps=1)
    assert {k: ours[k] for k in ("config", "sr", "f0", "version", "info")} == \
        {k: theirs[k] for k in ("config", "sr", "f0", "version", "info")}
    code, report = main_json(speech, tmp_path / "out.wav", "merged", "--models_dir", converted_models,
                             "--hubert", fixtures / "models" / "hubert_tiny_v2",
                             "--rmvpe", fixtures / "models" / "rmvpe_tiny" / "rmvpe.pt", "--quiet")
    assert code == 0, report


def test_alpha_weighs_the_two_models(converted_models: Path) -> None:
    for alpha, source in (("1", "tiny_v2_40k_f0"), ("0", "tiny_v2_40k_f0_seed13700")):
        code, report = main_json("--merge_models", "tiny_v2_40k_f0", "tiny_v2_40k_f0_seed13700", "edge",
                                 "--alpha", alpha, "--models_dir", converted_models, "--quiet")
        assert code == 0, report
        merged, original = (load(converted_models / "rvc" / f"{n}.pth")["weight"] for n in ("edge", source))
        assert all(torch.equal(merged[k], original[k].half()) for k in merged)


def test_a_checkpoint_the_shapes_cannot_place_needs_its_rate(fixtures: Path, tmp_path: Path) -> None:
    """A v1 model without pitch or posterior encoder: 32 and 48 kHz have the same shapes."""
    ckpt = load(fixtures / "training" / "train_v1_48k_nof0" / "G_2333.pth")
    bare = tmp_path / "G_1.pth"
    torch.save({"model": {k: v for k, v in ckpt["model"].items() if not k.startswith("enc_q.")}}, bare)
    code, report = main_json("--extract_model", bare, "x", "--models_dir", tmp_path, "--quiet")
    assert code == rvc.EXIT_USAGE and "--sample_rate" in report["message"]
    code, report = main_json("--extract_model", bare, "x", "--models_dir", tmp_path, "--sample_rate", "48k",
                             "--quiet")
    assert code == 0 and report["sample_rate"] == 48000, report
    (tmp_path / "config.json").write_text(json.dumps({"data": {"sampling_rate": 32000}}))  # the WebUI's, beside it
    code, report = main_json("--extract_model", bare, "y", "--models_dir", tmp_path, "--quiet")
    assert code == 0 and report["sample_rate"] == 32000 and report["config"][0] == 513, report


def refused(tmp_path: Path, *args: object) -> dict:
    code, report = main_json(*args, "--models_dir", tmp_path / "models", "--quiet")
    assert code == rvc.EXIT_BAD_MODEL, report
    assert files_in(tmp_path / "models" / "rvc") == [], "nothing may be left behind"
    return report


def test_a_corrupt_checkpoint_is_refused(fixtures: Path, tmp_path: Path) -> None:
    data = (fixtures / "training" / "train_v2_40k_f0" / "G_2333.pth").read_bytes()
    (tmp_path / "G_9.pth").write_bytes(data[: len(data) // 2])
    refused(tmp_path, "--extract_model", tmp_path / "G_9.pth", "x")


def test_a_discriminator_is_refused(tmp_path: Path) -> None:
    torch.save({"model": {"discriminators.0.convs.0.weight": torch.zeros(4, 1, 5)}, "iteration": 1},
               tmp_path / "D_1.pth")
    assert "discriminator" in refused(tmp_path, "--extract_model", tmp_path / "D_1.pth", "x")["message"]


def test_a_small_model_is_not_a_checkpoint(fixtures: Path, tmp_path: Path) -> None:
    report = refused(tmp_path, "--extract_model", fixtures / "models" / "tiny_v2_40k_f0.pth", "x")
    assert "already a small voice model" in report["message"]


def test_a_missing_checkpoint_is_not_found(tmp_path: Path) -> None:
    code, report = main_json("--extract_model", tmp_path / "G_1.pth", "x", "--models_dir", tmp_path, "--quiet")
    assert code == rvc.EXIT_NOT_FOUND, report


@pytest.mark.parametrize("a, b, says", [
    ("tiny_v2_40k_f0", "tiny_v1_40k_f0", "v1"),
    ("tiny_v2_40k_f0", "tiny_v2_32k_f0", "32000 Hz"),
    ("tiny_v2_40k_f0", "tiny_v2_40k_nof0", "without pitch"),
])
def test_models_of_other_kinds_are_not_merged(fixtures: Path, tmp_path: Path, a: str, b: str, says: str) -> None:
    (tmp_path / "models" / "rvc").mkdir(parents=True)
    for name in (a, b):
        shutil.copy(fixtures / "models" / f"{name}.pth", tmp_path / "models" / "rvc")
    code, report = main_json("--merge_models", a, b, "m", "--models_dir", tmp_path / "models", "--quiet")
    assert code == rvc.EXIT_BAD_MODEL and "cannot be merged" in report["message"] and says in report["message"]
    assert not (tmp_path / "models" / "rvc" / "m.pth").exists()


def test_models_of_another_size_are_not_merged(tmp_path: Path) -> None:
    from factories import make_voice_model_file

    folder = tmp_path / "models" / "rvc"
    folder.mkdir(parents=True)
    make_voice_model_file(folder / "a.pth", version="v2", sample_rate=40000)
    make_voice_model_file(folder / "b.pth", version="v2", sample_rate=40000, upsample=([10, 10, 2, 2], [20, 20, 4, 4]))
    code, report = main_json("--merge_models", "a", "b", "m", "--models_dir", tmp_path / "models", "--quiet")
    assert code == rvc.EXIT_BAD_MODEL and "dec.ups.0" in report["message"], report
    assert sorted(p.name for p in folder.iterdir()) == ["a.pth", "b.pth"]
