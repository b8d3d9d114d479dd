"""HuBERT content encoder: the plain-PyTorch network against the WebUI's goldens,
and the loaders for fairseq checkpoints (hubert_base.pt) and transformers folders."""
from __future__ import annotations

import builtins
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rvc_modulator as rvc
from conftest import snr_db
from factories import RunsOnUnpickle, make_hubert_fairseq, make_hubert_transformers, write_safetensors

HUBERT_FIXTURES = ("hubert_tiny_v1", "hubert_tiny_v2")
VERSION = {"hubert_tiny_v1": "v1", "hubert_tiny_v2": "v2"}
FEATURE_MAX_ABS = 1e-4  # fixtures README: HuBERT features max abs <= 1e-4, SNR >= 80 dB
FEATURE_MIN_SNR_DB = 80.0


def hubert_input(fixtures: Path, manifest: dict) -> torch.Tensor:
    return torch.from_numpy(np.load(fixtures / manifest["modules"]["hubert"]["input"]))[None]  # (1, N)


def wave(seconds: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(1, int(seconds * rvc.SAMPLE_RATE), generator=gen)  # (1, N)


def assert_matches_golden(actual: torch.Tensor, golden: np.ndarray) -> None:
    actual = actual.detach().numpy()
    assert actual.shape == golden.shape
    assert np.abs(actual - golden).max() <= FEATURE_MAX_ABS
    assert snr_db(golden, actual) >= FEATURE_MIN_SNR_DB


@pytest.fixture(scope="module")
def tiny_fairseq(tmp_path_factory) -> Path:
    return make_hubert_fairseq(tmp_path_factory.mktemp("hubert") / "hubert_base.pt", seed=3)


# --- numerical equivalence with the WebUI ------------------------------------

@pytest.mark.parametrize("file_format", ["transformers", "fairseq"])
@pytest.mark.parametrize("name", HUBERT_FIXTURES)
def test_features_match_the_webui_goldens(fixtures, manifest, name, file_format):
    entry = manifest["modules"][name]
    model = rvc.load_hubert(fixtures / entry["model" if file_format == "transformers" else "fairseq_model"])
    x = hubert_input(fixtures, manifest)
    with torch.no_grad():
        assert_matches_golden(model.extract(x, VERSION[name])[0], np.load(fixtures / entry["feats"]))
        assert_matches_golden(model(x, model.config.layers)[0], np.load(fixtures / entry["last_hidden_state"]))
        if "layer9" in entry:
            assert_matches_golden(model(x, 9)[0], np.load(fixtures / entry["layer9"]))


@pytest.mark.parametrize("name", HUBERT_FIXTURES)
def test_fairseq_file_and_transformers_folder_of_the_same_weights_agree(fixtures, manifest, name):
    entry = manifest["modules"][name]
    x = hubert_input(fixtures, manifest)
    a = rvc.load_hubert(fixtures / entry["model"]).extract(x, VERSION[name])
    b = rvc.load_hubert(fixtures / entry["fairseq_model"]).extract(x, VERSION[name])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_every_layout_of_factory_weights_gives_the_same_features(tmp_path, tiny_fairseq):
    x = wave(0.5)
    reference = rvc.load_hubert(tiny_fairseq).extract(x, "v1")
    layouts = [
        make_hubert_fairseq(tmp_path / "args.pt", seed=3, config_style="args"),  # pre-hydra `args`
        make_hubert_transformers(tmp_path / "safetensors", seed=3),  # parametrizations.weight.original0/1
        make_hubert_transformers(tmp_path / "bin", seed=3, weights="bin"),  # weight_g / weight_v
    ]
    for path in layouts:
        torch.testing.assert_close(rvc.load_hubert(path).extract(x, "v1"), reference, rtol=0, atol=1e-6)
    other_seed = make_hubert_transformers(tmp_path / "other", seed=4)
    assert not torch.allclose(rvc.load_hubert(other_seed).extract(x, "v1"), reference)


def test_loaded_model_computes_in_fp32_in_eval_mode(tiny_fairseq):
    model = rvc.load_hubert(tiny_fairseq)  # the file is fp16
    assert not model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.extract(wave(0.5), "v2").dtype == torch.float32


def test_the_transformers_fp16_weights_stay_fp16_and_give_exactly_the_fp32_result(tiny_fairseq):
    model = rvc.load_hubert(tiny_fairseq)  # the file is fp16
    half = {name for name, p in model.named_parameters() if p.dtype == torch.float16}
    stored = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, rvc.StoredLinear)}
    assert half == stored and len(stored) == 6 * model.config.layers  # q, k, v, out, two FFN layers
    assert {p.dtype for name, p in model.named_parameters() if name not in half} == {torch.float32}
    x = wave(0.5)
    widened = rvc.load_hubert(tiny_fairseq)
    for name in half:
        module, _, attr = name.rpartition(".")
        getattr(widened.get_submodule(module), attr).data = getattr(widened.get_submodule(module), attr).data.float()
    assert torch.equal(model.extract(x, "v2"), widened.extract(x, "v2"))


def test_half_precision_model_takes_fp32_audio_and_agrees_with_fp32(tiny_fairseq):
    model = rvc.load_hubert(tiny_fairseq)
    x = wave(0.5)
    reference = model.extract(x, "v1")
    half = model.half().extract(x, "v1")  # fp32 input, fp16 model: extract casts the input
    assert half.dtype == torch.float16
    assert snr_db(reference.numpy(), half.float().numpy()) > 30


# --- which layer RVC reads --------------------------------------------

def test_frame_count_is_floor_of_n_minus_400_over_320_plus_1(tiny_fairseq):
    model = rvc.load_hubert(tiny_fairseq)
    for n in (400, 719, 720, 1039, 16000, 16000 + 123):
        expected = (n - 400) // 320 + 1
        assert model.extract(torch.zeros(1, n), "v2").shape == (1, expected, 64)
        assert model.num_frames(n) == expected
    with pytest.raises(rvc.InputAudioError):
        model.extract(torch.zeros(1, 399), "v2")


def test_long_segments_run_the_feature_extractor_in_pieces_with_the_whole_segments_norm(tiny_fairseq, monkeypatch):
    model = rvc.load_hubert(tiny_fairseq)
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal(16000 * 3 + 77) * 0.1).float()[None]
    pieces = []
    conv0 = model.feature_extractor.conv_layers[0]
    forward = conv0.forward
    monkeypatch.setattr(conv0, "forward", lambda x, stats=None: pieces.append(x.shape[-1]) or forward(x, stats))
    monkeypatch.setattr(rvc, "HUBERT_CHUNK_FRAMES", 10**9)
    whole = model.extract(wave, "v2")
    assert len(pieces) == 1
    pieces.clear()
    monkeypatch.setattr(rvc, "HUBERT_CHUNK_FRAMES", 32)
    chunked = model.extract(wave, "v2")
    assert len(pieces) == -(-whole.shape[1] // 32)  # 150 frames: 5 pieces of at most 32
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_v1_reads_layer_9_through_final_proj_and_v2_the_last_layer(tiny_fairseq):
    model = rvc.load_hubert(tiny_fairseq)  # 10 layers, 64 wide
    x = wave(0.5)
    with torch.no_grad():
        v1, v2 = model.extract(x, "v1"), model.extract(x, "v2")
        assert v1.shape == (1, 24, 256) and v2.shape == (1, 24, 64)
        torch.testing.assert_close(v1, model.final_proj(model(x, 9)), rtol=0, atol=0)
        assert not torch.allclose(v1, model.final_proj(model(x, 10)), atol=1e-3)
        torch.testing.assert_close(v2, model(x, 10), rtol=0, atol=0)
        assert not torch.allclose(v2, model(x, 9), atol=1e-3)
    with pytest.raises(ValueError, match="v3"):
        model.extract(x, "v3")


def test_v2_features_are_768_wide_and_v1_needs_9_layers(tmp_path):
    model = rvc.load_hubert(make_hubert_fairseq(tmp_path / "h.pt", hidden=768, layers=2, heads=12, ffn=64))
    assert model.extract(wave(0.1), "v2").shape == (1, 4, 768)
    with pytest.raises(rvc.ModelFileError, match="layer 9.*only 2 layers"):
        model.extract(wave(0.1), "v1")


# --- fairseq checkpoints: safe unpickling -------------------------------------

def test_fairseq_dictionary_is_an_inert_stand_in_and_fairseq_is_never_imported(tiny_fairseq):
    assert "fairseq" not in sys.modules
    checkpoint = rvc.load_torch_file(tiny_fairseq, allow_standins=True)
    dictionary = checkpoint["task_state"]["dictionaries"][0]
    assert isinstance(dictionary, rvc._Standin)
    assert type(dictionary).__module__ == "fairseq.data.dictionary" and type(dictionary).__name__ == "Dictionary"
    assert dictionary._state["symbols"][:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    rvc.load_hubert(tiny_fairseq)
    assert "fairseq" not in sys.modules


def test_only_cfg_model_and_the_state_dict_are_read_from_a_fairseq_checkpoint(tmp_path, tiny_fairseq):
    checkpoint = rvc.load_torch_file(tiny_fairseq, allow_standins=True)
    stripped = tmp_path / "stripped.pt"  # no args, task_state, optimizer, cfg["task"], ...
    torch.save({"cfg": {"model": checkpoint["cfg"]["model"]}, "model": checkpoint["model"]}, stripped)
    x = wave(0.5)
    torch.testing.assert_close(rvc.load_hubert(stripped).extract(x, "v1"),
                               rvc.load_hubert(tiny_fairseq).extract(x, "v1"), rtol=0, atol=0)


@pytest.mark.parametrize("payload", [
    lambda marker: RunsOnUnpickle(os.system, f"touch {marker}"),
    lambda marker: RunsOnUnpickle(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
])
def test_a_hubert_file_whose_pickle_would_run_code_is_refused(tmp_path, tiny_fairseq, payload):
    marker = tmp_path / "marker"
    checkpoint = rvc.load_torch_file(tiny_fairseq, allow_standins=True)
    evil = tmp_path / "hubert_base.pt"
    torch.save({"cfg": checkpoint["cfg"], "model": checkpoint["model"], "extra_state": payload(marker)}, evil)
    folder = make_hubert_transformers(tmp_path / "folder", weights="bin")
    torch.save({"final_proj.bias": payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(rvc.ModelFileError, match="unsafe") as error:
        rvc.load_hubert(evil)
    assert error.value.subject == str(evil)
    with pytest.raises(rvc.ModelFileError) as error:  # torch's weights-only unpickler refuses it
        rvc.load_hubert(folder)
    assert error.value.subject == str(folder / "pytorch_model.bin")
    assert not marker.exists()


# --- broken files: one clear error naming the file and the problem ------------

def error_of(path: Path) -> rvc.ModelFileError:
    with pytest.raises(rvc.ModelFileError) as error:
        rvc.load_hubert(path)
    assert "\n" not in str(error.value)
    return error.value


def test_truncated_or_non_pickle_fairseq_files_are_refused(tmp_path, tiny_fairseq):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_fairseq.read_bytes()[: tiny_fairseq.stat().st_size // 2])
    text = tmp_path / "text.pt"
    text.write_text("this is not a checkpoint\n" * 10)
    for path, problem in ((truncated, "corrupt or truncated"), (text, "not a readable PyTorch weights file")):
        error = error_of(path)
        assert problem in error.message and error.subject == str(path)


def test_a_checkpoint_that_is_not_a_hubert_is_refused(tmp_path):
    voice_model = tmp_path / "voice.pth"
    torch.save({"weight": {}, "config": [], "version": "v2"}, voice_model)
    assert "no 'model' state dict" in error_of(voice_model).message
    numbered = tmp_path / "numbered.pt"
    torch.save({"model": {0: torch.zeros(1)}}, numbered)
    assert "no 'model' state dict" in error_of(numbered).message
    no_config = tmp_path / "no_config.pt"
    torch.save({"model": {}}, no_config)
    assert "model configuration" in error_of(no_config).message


def test_truncated_or_garbled_safetensors_are_refused(tmp_path):
    folder = make_hubert_transformers(tmp_path / "h")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    assert "truncated" in error_of(folder).message
    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    assert "header is not JSON" in error_of(folder).message
    weights.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    assert "header length" in error_of(folder).message
    assert error_of(folder).subject == str(weights)


def test_safetensors_reader_returns_every_dtype_and_shape_as_written(tmp_path):
    tensors = {"f16": torch.randn(3, 5).half(), "bf16": torch.randn(7).bfloat16(), "f32": torch.randn(2, 2, 2),
               "i64": torch.arange(5), "u8": torch.arange(3, dtype=torch.uint8), "empty": torch.zeros(0, 4)}
    loaded = rvc.read_safetensors(write_safetensors(tmp_path / "t.safetensors", tensors))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def drop(key: str):
    return lambda state: state.pop(key)


def reshape(key: str):
    return lambda state: state.__setitem__(key, state[key][..., :-1].clone())


@pytest.mark.parametrize("tamper, key, problem", [
    (drop("encoder.layers.3.fc1.weight"), "encoder.layers.3.fc1.weight", "missing"),
    (reshape("encoder.layers.0.self_attn.q_proj.weight"), "encoder.layers.0.self_attn.q_proj.weight", "[64, 63]"),
    (reshape("feature_extractor.conv_layers.0.0.weight"), "feature_extractor.conv_layers.0.0.weight", "shape"),
    (reshape("encoder.pos_conv.0.weight_g"), "encoder.pos_conv.0.weight_g", "[1, 1, 15]"),
    (drop("encoder.pos_conv.0.weight_v"), "encoder.pos_conv.0.weight_v", "missing"),
    (drop("final_proj.bias"), "final_proj.bias", "missing"),
    (lambda state: state.__setitem__("encoder.extra", torch.zeros(1)), "encoder.extra", "unexpected"),
])
def test_missing_misshaped_or_unknown_fairseq_tensors_are_named_as_the_file_names_them(tmp_path, tamper, key, problem):
    path = make_hubert_fairseq(tmp_path / "h.pt", tamper=tamper)
    error = error_of(path)
    assert repr(key) in error.message and problem in error.message and error.subject == str(path)


@pytest.mark.parametrize("tamper, key, problem", [
    (drop("encoder.layers.1.attention.k_proj.bias"), "encoder.layers.1.attention.k_proj.bias", "missing"),
    (reshape("feature_projection.projection.weight"), "feature_projection.projection.weight", "[64, 31]"),
    (reshape("encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
     "encoder.pos_conv_embed.conv.parametrizations.weight.original1", "[64, 4, 15]"),
])
def test_missing_or_misshaped_transformers_tensors_are_named(tmp_path, tamper, key, problem):
    folder = make_hubert_transformers(tmp_path / "h", tamper=tamper)
    error = error_of(folder)
    assert repr(key) in error.message and problem in error.message
    assert error.subject == str(folder / "model.safetensors")


def test_tensors_only_pretraining_uses_are_optional(tmp_path):
    def strip(state):
        for key in ("mask_emb", "label_embs_concat"):
            state.pop(key)
    x = wave(0.2)
    torch.testing.assert_close(rvc.load_hubert(make_hubert_fairseq(tmp_path / "a.pt", tamper=strip)).extract(x, "v1"),
                               rvc.load_hubert(make_hubert_fairseq(tmp_path / "b.pt")).extract(x, "v1"))


def test_missing_paths_and_incomplete_folders_are_reported(tmp_path):
    with pytest.raises(rvc.NotFoundError):
        rvc.load_hubert(tmp_path / "absent.pt")
    folder = make_hubert_transformers(tmp_path / "h")
    (folder / "model.safetensors").unlink()
    assert "no weights" in error_of(folder).message
    (folder / "config.json").unlink()
    assert "no config.json" in error_of(folder).message
    (folder / "config.json").write_text("{broken")
    assert "unreadable config.json" in error_of(folder).message


# --- configurations ------------------------------------------------------------

@pytest.mark.parametrize("override", [
    {"layer_norm_first": True}, {"extractor_mode": "layer_norm"}, {"conv_bias": True},
    {"activation_fn": "relu"}, {"layer_type": "conformer"}, {"pos_conv_depth": 5},
])
def test_unsupported_fairseq_configurations_are_refused(tmp_path, override):
    (key, value), = override.items()
    error = error_of(make_hubert_fairseq(tmp_path / "h.pt", cfg_overrides=override))
    assert f"unsupported HuBERT configuration {key} = {value!r}" in error.message


@pytest.mark.parametrize("override", [
    {"do_stable_layer_norm": True}, {"feat_extract_norm": "layer"}, {"conv_bias": True},
    {"hidden_act": "relu"}, {"feat_extract_activation": "relu"}, {"feat_proj_layer_norm": False},
    {"conv_pos_batch_norm": True}, {"model_type": "wav2vec2"},
])
def test_unsupported_transformers_configurations_are_refused(tmp_path, override):
    (key, value), = override.items()
    error = error_of(make_hubert_transformers(tmp_path / "h", config_overrides=override))
    assert f"unsupported HuBERT configuration {key} = {value!r}" in error.message
    assert error.subject.endswith("config.json")


@pytest.mark.parametrize("override, problem", [
    ({"encoder_layers": "12"}, "encoder_layers = '12'"),
    ({"encoder_attention_heads": 5}, "not divisible"),
    ({"conv_feature_layers": "[(32, 10, 5)] * 2 ** 40"}, "cannot read conv_feature_layers"),
])
def test_invalid_fairseq_configuration_values_are_refused(tmp_path, override, problem):
    assert problem in error_of(make_hubert_fairseq(tmp_path / "h.pt", cfg_overrides=override)).message


@pytest.mark.parametrize("override, problem", [
    ({"conv_kernel": [10, 3]}, "lists of equal length"),
    ({"conv_stride": [0] * 7}, "positive integers"),
    ({"hidden_size": 64.0}, "hidden_size = 64.0"),
    ({"layer_norm_eps": "1e-5"}, "invalid layer_norm_eps"),
])
def test_invalid_transformers_configuration_values_are_refused(tmp_path, override, problem):
    assert problem in error_of(make_hubert_transformers(tmp_path / "h", config_overrides=override)).message


def test_a_conv_spec_that_is_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    code = f"__import__('os').system('touch {marker}')"
    assert "cannot read conv_feature_layers" in error_of(
        make_hubert_fairseq(tmp_path / "h.pt", cfg_overrides={"conv_feature_layers": code})).message
    assert not marker.exists()


REAL_CONV_LAYERS = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@pytest.mark.parametrize("spec", [
    "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",  # hubert_base's cfg
    "[(512, 10, 5)] + 4 * [(512, 3, 2)] + [(512, 2, 2), (512, 2, 2)]",
])
def test_conv_feature_layers_parser_reads_the_real_spec(spec):
    assert rvc.parse_conv_feature_layers(spec) == REAL_CONV_LAYERS


@pytest.mark.parametrize("spec", [
    "__import__('os').system('true')", "[(1, 2, 3)] * 10 ** 9", "[(1, 2, 3)] * 100000", "[(1, 2)]",
    "[(1.5, 2, 3)]", "[(True, 2, 3)]", "[(-1, 2, 3)]", "[x for x in range(3)]", "(1, 2, 3)", "",
    "[(1, 2, 3)] - [(1, 2, 3)]", "lambda: 0", "[(1, 2, 3)" + ", (1, 2, 3)" * 200 + "]", "[]", "[(1,2,3)] * 0",
])
def test_conv_feature_layers_parser_rejects_anything_else(spec):
    with pytest.raises(ValueError):
        rvc.parse_conv_feature_layers(spec)
