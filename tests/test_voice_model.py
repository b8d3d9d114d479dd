"""Voice models: the synthesizer network and the .pth loader.

The network is proven against the official WebUI's goldens (noise off); the loader against
files in the WebUI format written by tests/factories.py, and against the refusals a loader owes its users.
"""
from __future__ import annotations

import copy
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import rvc_modulator as rvc
from conftest import snr_db
from factories import RunsOnUnpickle, make_voice_model, make_voice_model_file, synth_inputs

FIXTURE_SYNTHS = ["tiny_v1_32k_f0", "tiny_v1_32k_nof0", "tiny_v1_40k_f0", "tiny_v1_48k_f0",
                  "tiny_v2_32k_f0", "tiny_v2_40k_f0", "tiny_v2_40k_nof0", "tiny_v2_48k_f0",
                  "tiny_v2_48k_nof0"]
VERSIONS_RATES_F0 = [(v, sr, f0) for v in ("v1", "v2") for sr in (32000, 40000, 48000) for f0 in (True, False)]


def fixture_facts(name: str) -> tuple[str, int, bool]:
    """(version, sample rate, pitch model) from a fixture name such as tiny_v2_48k_nof0."""
    _, version, rate, f0 = name.split("_")
    return version, int(rate[:-1]) * 1000, f0 == "f0"


def run(net: rvc.Synthesizer, inputs: dict, **kwargs) -> torch.Tensor:
    pitch, nsff0 = (inputs["pitch"], inputs["nsff0"]) if net.has_f0 else (None, None)
    return net.infer(inputs["phone"], pitch, nsff0, inputs["sid"], **kwargs)


def saved(ckpt: dict, path: Path) -> Path:
    torch.save(ckpt, path)
    return path


def refusal(path: Path) -> str:
    """The message of the ModelFileError load_voice_model raises for `path` (fails if it loads)."""
    with pytest.raises(rvc.ModelFileError) as info:
        rvc.load_voice_model(path)
    message = str(info.value)
    assert str(path) in message  # every refusal names the file
    return message


# --- the network against the WebUI goldens ---------------------------------------------


def test_every_synth_golden_is_covered(manifest):
    assert sorted(manifest["modules"]["synth"]) == FIXTURE_SYNTHS


@pytest.mark.parametrize("name", FIXTURE_SYNTHS)
def test_synthesizer_reproduces_webui_goldens_with_noise_off(name, fixtures, manifest):
    entry = manifest["modules"]["synth"][name]
    model = rvc.load_voice_model(fixtures / entry["model"])
    load = lambda key: torch.from_numpy(np.load(fixtures / entry[key]))[None]  # noqa: E731
    pitch, nsff0 = (load("pitch"), load("nsff0")) if model.has_f0 else (None, None)
    stages = model.net.infer_stages(load("phone"), pitch, nsff0, torch.tensor([entry["sid"]]), noise=False)
    for stage, golden in (("m_p", "m_p"), ("logs_p", "logs_p"), ("z", "z_flow_out")):
        assert np.abs(stages[stage][0].numpy() - np.load(fixtures / entry[golden])).max() <= 1e-4, stage
    out, golden = stages["out"][0].numpy(), np.load(fixtures / entry["out"])
    assert out.shape == golden.shape == (entry["T"] * model.hop,)
    assert np.abs(out - golden).max() <= 1e-3
    assert snr_db(golden, out) >= 60


@pytest.mark.parametrize("name", FIXTURE_SYNTHS)
def test_fixture_models_load_with_their_version_rate_pitch_and_speakers(name, fixtures):
    version, sample_rate, has_f0 = fixture_facts(name)
    model = rvc.load_voice_model(fixtures / "models" / f"{name}.pth")
    assert (model.version, model.sample_rate, model.has_f0, model.n_speakers) == (version, sample_rate, has_f0, 3)
    assert model.phone_dim == {"v1": 256, "v2": 768}[version]
    assert model.hop == sample_rate // 100
    assert not model.net.training and next(model.net.parameters()).dtype == torch.float32


@pytest.mark.parametrize("window, frames", [(10, 1), (10, 4), (10, 11), (10, 30), (2, 9)])
def test_relative_position_skews_follow_the_window_rule(window, frames):
    gen = torch.Generator().manual_seed(frames)
    rel = torch.randn(1, 2, frames, 2 * window + 1, generator=gen)
    absolute = torch.randn(1, 2, frames, frames, generator=gen)
    expected_abs, expected_rel = torch.zeros(1, 2, frames, frames), torch.zeros_like(rel)
    for i in range(frames):
        for j in range(frames):
            if abs(j - i) <= window:
                expected_abs[..., i, j] = rel[..., i, j - i + window]
                expected_rel[..., i, j - i + window] = absolute[..., i, j]
    assert torch.equal(rvc.relative_to_absolute(rel, window), expected_abs)
    assert torch.equal(rvc.absolute_to_relative(absolute, window), expected_rel)
    for start in range(frames):  # any block of query rows gives those rows of the whole
        for stop in range(start + 1, frames + 1):
            rows = slice(start, stop)
            assert torch.equal(rvc.relative_to_absolute(rel[:, :, rows], window, frames, start), expected_abs[:, :, rows])
            assert torch.equal(rvc.absolute_to_relative(absolute[:, :, rows], window, start), expected_rel[:, :, rows])


def test_attention_over_query_blocks_equals_attention_in_one_block(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    attention = rvc.SynthAttention(channels=8, n_heads=2, window=3)
    for p in attention.parameters():
        p.data = torch.randn(p.shape, generator=gen)
    x = torch.randn(1, 8, 37, generator=gen)
    whole = attention(x)
    monkeypatch.setattr(rvc, "ATTENTION_QUERY_ROWS", 5)
    torch.testing.assert_close(attention(x), whole, rtol=1e-5, atol=1e-6)


# --- the decoder's fast paths compute what the plain layers compute ------------------


@pytest.mark.parametrize("rate,kernel", [(10, 16), (10, 20), (12, 24), (2, 4), (8, 16), (5, 10), (3, 6), (4, 4)])
def test_transposed_convolution_as_matrix_product_and_overlap_add_equals_the_layer(rate, kernel):
    padding, output_padding = rvc.upsample_padding(rate, kernel)
    up = torch.nn.ConvTranspose1d(24, 12, kernel, rate, padding=padding, output_padding=output_padding)
    x = torch.randn(2, 24, 57)
    with torch.no_grad():
        expected, fast = up(x), rvc.conv_transpose1d_gemm(x, up)
    assert fast.shape == expected.shape == (2, 12, 57 * rate)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [1, 2, 4, 40, 120])
def test_one_channel_convolution_as_a_matrix_product_equals_the_layer(stride):
    kernel, padding = rvc.noise_conv_geometry(stride)
    conv = torch.nn.Conv1d(1, 16, kernel, stride, padding=padding)
    x = torch.randn(2, 1, 480 * 7)
    with torch.no_grad():
        expected, fast = conv(x), rvc.conv1d_one_channel(x, conv)
    assert fast.shape == expected.shape
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [100, 9000])
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (11, 5)])
def test_a_low_precision_convolution_is_the_convolution_in_bf16(length, kernel, dilation):
    conv = torch.nn.Conv1d(32, 32, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2)
    x = torch.randn(2, 32, length)
    with torch.no_grad():
        expected, low = conv(x), rvc.LowPrecisionConv1d(conv, torch.bfloat16)(x)
    assert low.dtype == torch.bfloat16 and low.shape == expected.shape
    assert snr_db(expected, low.float()) > 40  # bf16 has an 8-bit mantissa: about 48 dB


@pytest.mark.parametrize("f0", [True, False])
def test_a_long_input_decoded_in_chunks_equals_the_one_piece_decoding(f0, monkeypatch):
    _, net = make_voice_model(f0=f0)
    inputs = synth_inputs(net.phone_dim, frames=300)
    whole = run(net, inputs, noise=False)
    monkeypatch.setattr(rvc, "DECODER_CHUNK_FRAMES", 64)  # five chunks, each with its context
    chunked = run(net, inputs, noise=False)
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max().item() <= 1e-5
    monkeypatch.setattr(rvc, "DECODER_CONTEXT_FRAMES", 0)  # the check can fail: without context it does
    assert (run(net, inputs, noise=False) - whole).abs().max().item() > 1e-3


@pytest.mark.parametrize("keep", [(0, 300), (100, 200), (37, 300), (150, 150)])
def test_decoding_only_the_kept_frames_gives_those_frames_of_the_whole(keep):
    _, net = make_voice_model(f0=True)
    inputs = synth_inputs(net.phone_dim, frames=300)
    whole = run(net, inputs, rng=torch.Generator().manual_seed(3))
    kept = run(net, inputs, rng=torch.Generator().manual_seed(3), keep=keep)  # the same noise, drawn whole
    first, last = keep
    assert kept.shape == (1, (last - first) * net.hop)
    if last > first:
        assert (kept - whole[:, first * net.hop: last * net.hop]).abs().max().item() <= 1e-5


# --- randomness ------------------------------------------------------------------------


@pytest.mark.parametrize("f0", [True, False])
def test_seeded_noise_is_reproducible_and_seeds_differ(f0):
    _, net = make_voice_model(f0=f0)
    inputs = synth_inputs(net.phone_dim, frames=16)
    first = run(net, inputs, rng=torch.Generator().manual_seed(1))
    again = run(net, inputs, rng=torch.Generator().manual_seed(1))
    other = run(net, inputs, rng=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-4)


@pytest.mark.parametrize("f0", [True, False])
def test_noise_off_is_deterministic_and_differs_from_noise_on(f0):
    _, net = make_voice_model(f0=f0)
    inputs = synth_inputs(net.phone_dim, frames=16)
    quiet = run(net, inputs, noise=False)
    assert torch.equal(quiet, run(net, inputs, noise=False))
    assert not torch.allclose(quiet, run(net, inputs, rng=torch.Generator().manual_seed(1)), atol=1e-4)


def test_excitation_noise_is_small_when_voiced_and_a_third_of_the_sine_amplitude_when_unvoiced():
    frames, upp = 200, 100
    f0 = torch.cat([torch.full((1, frames), 220.0), torch.zeros(1, frames)], dim=1)
    noise = torch.randn(1, 2 * frames * upp, 1, generator=torch.Generator().manual_seed(0))
    sine_gen = rvc.SynthSineGen(sample_rate=upp * 100)
    added = (sine_gen(f0, upp, noise) - sine_gen(f0, upp, None))[0, :, 0]
    voiced, unvoiced = added[: frames * upp], added[frames * upp:]
    assert voiced.std().item() == pytest.approx(rvc.NOISE_STD, rel=0.05)
    assert unvoiced.std().item() == pytest.approx(rvc.SINE_AMP / 3, rel=0.05)


def test_half_precision_source_keeps_its_phase_in_float32():
    # 60 s of a steady tone at 40 kHz: a phase accumulated in fp16 would be useless by then.
    frames, upp = 6000, 400
    f0 = torch.full((1, frames), 261.5)  # exact in fp16
    source = rvc.SynthSource(sample_rate=40000)
    with torch.no_grad():
        source.l_linear.weight.fill_(2.0)
        source.l_linear.bias.fill_(0.0)
        reference = source(f0, upp, None)
        half = copy.deepcopy(source).half()(f0.half(), upp, None)
    assert half.dtype == torch.float16
    assert (half.float() - reference).abs().max().item() <= 2e-3


def test_half_precision_net_matches_float32():
    _, net = make_voice_model()
    inputs = synth_inputs(net.phone_dim, frames=40)
    reference = run(net, inputs, noise=False)
    half = run(copy.deepcopy(net).half(), inputs, noise=False)
    assert half.dtype == torch.float32 and half.shape == reference.shape
    assert snr_db(reference, half) >= 25


# --- the WebUI file format -------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_SYNTHS)
def test_factory_files_have_the_exact_layout_of_webui_files(name, fixtures):
    version, sample_rate, has_f0 = fixture_facts(name)
    ckpt, _ = make_voice_model(version, sample_rate, has_f0)
    webui = torch.load(fixtures / "models" / f"{name}.pth", weights_only=True)
    layout = lambda weight: [(k, tuple(v.shape), v.dtype) for k, v in weight.items()]  # noqa: E731
    assert layout(ckpt["weight"]) == layout(webui["weight"])
    assert ckpt["config"][:15] == webui["config"][:15] and ckpt["config"][16:] == webui["config"][16:]
    assert [(k, ckpt[k]) for k in ("sr", "f0", "version")] == [(k, webui[k]) for k in ("sr", "f0", "version")]


@pytest.mark.parametrize("version, sample_rate, f0", VERSIONS_RATES_F0)
def test_factory_models_round_trip_through_the_webui_format(version, sample_rate, f0, tmp_path):
    ckpt, net = make_voice_model(version, sample_rate, f0)
    path = saved(ckpt, tmp_path / "model.pth")

    on_disk = torch.load(path, weights_only=True)
    assert list(on_disk) == ["weight", "config", "info", "sr", "f0", "version"]
    assert on_disk["sr"] == f"{sample_rate // 1000}k" and on_disk["f0"] == int(f0) and on_disk["version"] == version
    assert len(on_disk["config"]) == 18 and on_disk["config"][-1] == sample_rate
    assert {v.dtype for v in on_disk["weight"].values()} == {torch.float16}
    assert "dec.ups.0.weight_g" in on_disk["weight"] and "dec.ups.0.weight_v" in on_disk["weight"]
    assert "dec.ups.0.weight" not in on_disk["weight"]

    model = rvc.load_voice_model(path)
    assert (model.version, model.sample_rate, model.has_f0, model.n_speakers) == (version, sample_rate, f0, 3)
    inputs = synth_inputs(net.phone_dim, frames=12, sid=2)
    expected = run(net, inputs, noise=False)
    assert expected.shape == (1, 12 * sample_rate // 100) and expected.dtype == torch.float32
    torch.testing.assert_close(run(model.net, inputs, noise=False), expected, atol=1e-5, rtol=0)


def test_full_size_model_has_the_official_tensor_count_and_loads(tmp_path):
    path = make_voice_model_file(tmp_path / "full.pth", size="full", n_speakers=109)  # official
    weight = torch.load(path, weights_only=True)["weight"]
    assert len(weight) == 457  # the WebUI's v2 40k pitch model has 457 tensors
    assert sum(v.numel() for v in weight.values()) == 27_537_346
    model = rvc.load_voice_model(path)
    assert model.metadata["tensors"] == 457 and model.metadata["weights_dtype"] == "float16"
    assert run(model.net, synth_inputs(768, frames=2), noise=False).shape == (1, 2 * 400)


# --- accepted variants -----------------------------------------------------------------


def assert_loads_like(net: rvc.Synthesizer, path: Path, **kwargs) -> rvc.VoiceModel:
    model = rvc.load_voice_model(path, **kwargs)
    inputs = synth_inputs(net.phone_dim, frames=12)
    torch.testing.assert_close(run(model.net, inputs, noise=False), run(net, inputs, noise=False),
                               atol=1e-5, rtol=0)
    return model


def test_applio_metadata_is_accepted_and_reported(tmp_path):
    ckpt, net = make_voice_model(applio=True)
    warnings = []
    model = assert_loads_like(net, saved(ckpt, tmp_path / "applio.pth"), warn=warnings.append)
    assert model.sample_rate == 40000 and model.has_f0
    assert warnings == []
    for key in ("epoch", "step", "embedder_model", "vocoder", "model_name", "author", "creation_date"):
        assert model.metadata[key] == ckpt[key]
    assert model.metadata["sr"] == 40000


def test_parametrizations_weight_norm_names_load(tmp_path):
    ckpt, net = make_voice_model(weight_norm="parametrizations")
    assert "dec.ups.0.parametrizations.weight.original0" in ckpt["weight"]
    assert_loads_like(net, saved(ckpt, tmp_path / "param.pth"))


def test_fp32_weights_load(tmp_path):
    ckpt, net = make_voice_model(fp16=False)
    assert {v.dtype for v in ckpt["weight"].values()} == {torch.float32}
    assert_loads_like(net, saved(ckpt, tmp_path / "fp32.pth"))


@pytest.mark.parametrize("n_speakers", [1, 109])
def test_speaker_count_comes_from_the_speaker_table(n_speakers, tmp_path):
    ckpt, net = make_voice_model(n_speakers=n_speakers)
    assert ckpt["config"][15] == 109  # the stale value the WebUI writes
    model = assert_loads_like(net, saved(ckpt, tmp_path / "speakers.pth"))
    assert model.n_speakers == n_speakers
    with pytest.raises(rvc.UsageError, match="speaker id"):
        run(model.net, synth_inputs(net.phone_dim, frames=4, sid=n_speakers))


def test_weights_decide_version_and_pitch_when_the_keys_disagree(tmp_path):
    ckpt, net = make_voice_model("v2", f0=True)
    ckpt.update(version="v1", f0=0)
    warnings = []
    model = assert_loads_like(net, saved(ckpt, tmp_path / "mislabelled.pth"), warn=warnings.append)
    assert (model.version, model.has_f0) == ("v2", True)
    assert any("version 'v1'" in w for w in warnings) and any("f0=0" in w for w in warnings)


def test_very_old_files_without_version_and_f0_keys_load(tmp_path):
    ckpt, net = make_voice_model("v2", f0=False)
    del ckpt["version"], ckpt["f0"]
    model = assert_loads_like(net, saved(ckpt, tmp_path / "old.pth"))
    assert (model.version, model.has_f0) == ("v2", False)


def test_models_trained_with_another_content_encoder_get_a_warning(tmp_path):
    ckpt, _ = make_voice_model(applio=True)
    ckpt["embedder_model"] = "spin"
    warnings = []
    rvc.load_voice_model(saved(ckpt, tmp_path / "spin.pth"), warn=warnings.append)
    assert any("'spin'" in w for w in warnings)


def test_sample_rate_names_in_the_config_are_accepted(tmp_path):
    ckpt, net = make_voice_model(sample_rate=48000)
    ckpt["config"][-1] = "48k"
    assert assert_loads_like(net, saved(ckpt, tmp_path / "named.pth")).sample_rate == 48000


@pytest.mark.parametrize("sample_rate, rates, kernels", [
    (24000, [10, 6, 2, 2], [20, 12, 4, 4]),  # Applio's 24 kHz config
    (30000, [10, 2, 5, 3], [20, 4, 10, 6]),  # odd rates: Applio's padding rule, odd noise-conv strides
])
@pytest.mark.parametrize("f0", [True, False])
def test_non_standard_decoders_are_built_from_the_config(sample_rate, rates, kernels, f0, tmp_path):
    ckpt, net = make_voice_model(sample_rate=sample_rate, f0=f0, upsample=(rates, kernels))
    model = assert_loads_like(net, saved(ckpt, tmp_path / "custom.pth"))
    assert model.hop == sample_rate // 100
    assert run(model.net, synth_inputs(net.phone_dim, frames=7), noise=False).shape == (1, 7 * model.hop)


# --- refusals --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_checkpoint() -> dict:
    return make_voice_model()[0]


@pytest.fixture
def model_file(valid_checkpoint, tmp_path) -> tuple[dict, Path]:
    """A valid model: its checkpoint dict (a copy, free to spoil) and the file it was saved to."""
    ckpt = copy.deepcopy(valid_checkpoint)
    return ckpt, saved(ckpt, tmp_path / "model.pth")


def test_truncated_file_is_refused(model_file, tmp_path):
    data = model_file[1].read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in refusal(truncated)


def test_file_that_is_not_a_pickle_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n" * 20)
    assert "not a readable PyTorch weights file" in refusal(path)


def test_missing_tensor_is_named(model_file, tmp_path):
    ckpt = model_file[0]
    del ckpt["weight"]["flow.flows.2.post.bias"]
    assert "missing tensor 'flow.flows.2.post.bias'" in refusal(saved(ckpt, tmp_path / "m.pth"))


def test_missing_half_of_a_weight_norm_pair_is_named(model_file, tmp_path):
    ckpt = model_file[0]
    del ckpt["weight"]["dec.ups.1.weight_v"]
    assert "'dec.ups.1.weight_v'" in refusal(saved(ckpt, tmp_path / "m.pth"))


def test_misshaped_tensor_is_named_with_both_shapes(model_file, tmp_path):
    ckpt = model_file[0]
    ckpt["weight"]["enc_p.proj.weight"] = torch.zeros(32, 16, 3, dtype=torch.float16)
    message = refusal(saved(ckpt, tmp_path / "m.pth"))
    assert "'enc_p.proj.weight'" in message and "[32, 16, 3]" in message and "[32, 16, 1]" in message


def test_unexpected_tensor_is_named(model_file, tmp_path):
    ckpt = model_file[0]
    ckpt["weight"]["dec.extra.weight"] = torch.zeros(3, dtype=torch.float16)
    assert "unexpected tensor 'dec.extra.weight'" in refusal(saved(ckpt, tmp_path / "m.pth"))


def test_non_finite_weights_are_refused(model_file, tmp_path):
    ckpt = model_file[0]
    ckpt["weight"]["enc_p.emb_phone.bias"][3] = float("nan")
    assert "'enc_p.emb_phone.bias' has non-finite values" in refusal(saved(ckpt, tmp_path / "m.pth"))


@pytest.mark.parametrize("index, value, problem", [
    (None, None, "expected a list of 18"),
    (None, [1025, 32, 16], "expected a list of 18"),
    (2, "sixteen", "inter_channels must be a positive integer"),
    (9, "2", "resblock type '2' is not supported"),
    (17, 44100, "the sample rate is 44100 Hz"),
    (14, [16, 16, 4, 5], "upsample stage 3 (rate 2, kernel 5)"),
])
def test_bad_config_is_refused(index, value, problem, model_file, tmp_path):
    ckpt = model_file[0]
    if index is None:
        ckpt["config"] = value
    else:
        ckpt["config"][index] = value
    message = refusal(saved(ckpt, tmp_path / "m.pth"))
    assert "bad 'config'" in message and problem in message


def test_training_checkpoint_is_refused_with_advice(model_file, tmp_path):
    weight = dict(model_file[0]["weight"])
    weight["enc_q.pre.weight"] = torch.zeros(16, 513, 1)
    ckpt = {"model": weight, "iteration": 10, "optimizer": {}, "learning_rate": 1e-4}
    message = refusal(saved(ckpt, tmp_path / "G_2333333.pth"))
    assert "training checkpoint" in message and "--extract_model" in message


def test_discriminator_checkpoint_is_refused(tmp_path):
    ckpt = {"model": {"discriminators.0.convs.0.bias": torch.zeros(16),
                      "discriminators.1.conv_post.weight": torch.zeros(1, 1024, 3, 1)},
            "iteration": 10, "optimizer": {}, "learning_rate": 1e-4}
    assert "discriminator checkpoint" in refusal(saved(ckpt, tmp_path / "D_2333333.pth"))


def _rename_decoder(ckpt: dict, old: str, new: str) -> None:
    ckpt["weight"] = {k.replace(old, new): v for k, v in ckpt["weight"].items()}


@pytest.mark.parametrize("variant, named", [
    ("vocoder=MRF HiFi-GAN", "'MRF HiFi-GAN'"),
    ("vocoder=RefineGAN", "'RefineGAN'"),
    ("keys=dec.ups.>dec.upsamples.", "MRF HiFi-GAN"),
    ("keys=dec.resblocks.>dec.mrfs.", "MRF HiFi-GAN"),
    ("keys=dec.conv_pre.>dec.pre_conv.", "RefineGAN"),
    ("keys=dec.ups.>dec.upsample_blocks.", "RefineGAN"),
    ("harmonics=9", "9 harmonics"),
])
def test_other_applio_vocoders_are_refused(variant, named, model_file, tmp_path):
    ckpt = model_file[0]
    kind, _, value = variant.partition("=")
    if kind == "vocoder":
        ckpt["vocoder"] = value
    elif kind == "keys":
        _rename_decoder(ckpt, *value.split(">"))
    else:
        ckpt["weight"]["dec.m_source.l_linear.weight"] = torch.zeros(1, int(value), dtype=torch.float16)
    message = refusal(saved(ckpt, tmp_path / "vocoder.pth"))
    assert "unsupported vocoder" in message and named in message


@pytest.mark.parametrize("content, hint", [
    ({"foo": 1, "bar": [1, 2]}, "'bar', 'foo'"),
    ({"unet.encoder.bn.weight": torch.ones(1), "fc.0.weight": torch.ones(2)}, "RMVPE"),
    ({"weight": torch.ones(3), "bias": torch.ones(3)}, "'weight' is not a dict of named tensors"),
    (torch.ones(3), "holds a Tensor"),
])
def test_files_that_are_not_voice_models_are_refused(content, hint, tmp_path):
    message = refusal(saved(content, tmp_path / "other.pth"))
    assert "not a voice model" in message and hint in message


def test_hubert_checkpoint_is_refused_as_not_a_voice_model(fixtures):
    message = refusal(fixtures / "models" / "hubert_tiny_v2_fairseq.pt")
    assert "not a voice model" in message and "fairseq" in message


def test_pickle_that_would_run_code_is_refused_and_never_runs(model_file, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = model_file[0]
    ckpt["info"] = RunsOnUnpickle(os.system, f"touch {shlex.quote(str(marker))}")
    path = saved(ckpt, tmp_path / "evil.pth")
    assert "unsafe" in refusal(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe loader would have run it
    assert marker.exists()


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(rvc.NotFoundError):
        rvc.load_voice_model(tmp_path / "absent.pth")
