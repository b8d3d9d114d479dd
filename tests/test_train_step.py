"""One training step is the WebUI's (train/train.py train_and_evaluate): from the goldens'
initial weights and batch, the same losses, gradients and weights after the update, within
the tolerances the goldens' README states (../shared/fixtures/train_step/)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import rvc_modulator as rvc

CASES = ["v2_40k_f0", "v1_40k_nof0"]


def step_case(fixtures: Path, case: str) -> dict:
    """The golden's nets loaded into ours, and one step of ours on its batch."""
    folder = fixtures / "train_step" / case
    manifest = json.loads((folder / "manifest.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    g0 = torch.load(folder / "G_0.pth", map_location="cpu", weights_only=True)["model"]
    d0 = torch.load(folder / "D_0.pth", map_location="cpu", weights_only=True)["model"]
    version = rvc.PHONE_DIM_VERSIONS[g0["enc_p.emb_phone.weight"].shape[1]]
    recipe = replace(rvc.TRAINING_RECIPES[(version, config["data"]["sampling_rate"])],
                     segment=config["train"]["segment_size"])
    config_list = manifest["generator"]["config_list"]
    net_g = rvc.TrainingSynthesizer(rvc.SynthConfig.from_list(config_list), g0["enc_p.emb_phone.weight"].shape[1],
                                    "enc_p.emb_pitch.weight" in g0, g0["emb_g.weight"].shape[0], config_list[0],
                                    recipe.segment_frames)
    net_g.load_state_dict(rvc.from_webui_names(g0))
    net_d = rvc.MultiPeriodDiscriminator.from_state(d0, folder / "D_0.pth")
    net_d.load_state_dict(rvc.from_webui_names(d0))
    arrays = {p.stem: torch.from_numpy(np.load(p)) for p in (folder / "batch").glob("*.npy")}
    batch = rvc.TrainingBatch(arrays["phone"], arrays["phone_lengths"], arrays.get("pitch"), arrays.get("pitchf"),
                              arrays["spec"], arrays["spec_lengths"], arrays["wave"], arrays["sid"])
    optim_g = rvc.webui_adamw(net_g.webui_parameters(), recipe)
    optim_d = rvc.webui_adamw(list(net_d.parameters()), recipe)
    rng = torch.Generator().manual_seed(manifest["args"]["seed"] + 2)  # as the golden re-seeded its forward
    report, out = rvc.train_step(net_g, net_d, optim_g, optim_d, batch, recipe, rng)
    return dict(folder=folder, manifest=manifest, net_g=net_g, net_d=net_d, optim_g=optim_g, optim_d=optim_d,
                report=report, out=out)


@pytest.fixture(scope="module", params=CASES)
def case(request, fixtures: Path) -> dict:
    return step_case(fixtures, request.param)


def webui_param_names(net: torch.nn.Module, params: list) -> list[str]:
    names = {id(p): n for n, p in net.named_parameters()}
    return list(rvc.to_webui_names({names[id(p)]: p for p in params}))


def test_parameters_are_in_the_webuis_order(case: dict) -> None:
    """(AdamW's state is kept by position: a WebUI checkpoint's optimizer resumes ours)"""
    assert webui_param_names(case["net_g"], case["net_g"].webui_parameters()) == \
        case["manifest"]["generator"]["param_order"]
    assert webui_param_names(case["net_d"], list(case["net_d"].parameters())) == \
        case["manifest"]["discriminator"]["param_order"]


def test_the_losses_and_gradient_norms_are_the_webuis(case: dict) -> None:
    report, expected = case["report"], case["manifest"]["losses"]
    for name in ("loss_disc", "loss_gen", "loss_fm", "loss_mel", "loss_kl", "loss_gen_all"):
        assert getattr(report, name) == pytest.approx(expected[name], rel=1e-5), name
    norms = case["manifest"]["grad_norms"]
    assert report.grad_norm_d == pytest.approx(norms["grad_norm_d"], rel=1e-5)
    assert report.grad_norm_g == pytest.approx(norms["grad_norm_g"], rel=1e-5)


def test_the_forward_is_the_webuis(case: dict) -> None:
    out, folder = case["out"], case["folder"]
    assert out["starts"].tolist() == case["manifest"]["ids_slice"]  # the random slice: same draws, same order
    for name, tolerance in (("y_hat", 1e-4), ("z", 1e-4), ("z_p", 1e-4), ("m_p", 1e-4), ("logs_p", 1e-4),
                            ("m_q", 1e-4), ("logs_q", 1e-4), ("y_mel", 1e-4), ("y_hat_mel", 2e-3)):
        reference = np.load(folder / "step" / f"{name}.npy")
        np.testing.assert_allclose(out[name].detach().numpy(), reference, atol=tolerance, err_msg=name)


@pytest.mark.parametrize("net, optim, checkpoint", [("net_g", "optim_g", "G_1.pth"), ("net_d", "optim_d", "D_1.pth")])
def test_the_update_is_the_webuis(case: dict, net: str, optim: str, checkpoint: str) -> None:
    saved = torch.load(case["folder"] / checkpoint, map_location="cpu", weights_only=True)
    ours = rvc.to_webui_names(case[net].state_dict())
    noise = set(case["manifest"]["generator"]["noise_grad_params"]) if net == "net_g" else set()
    lr = case["manifest"]["optimizer"]["lr_used"]
    off = 0
    for key, value in saved["model"].items():
        gap = (ours[key] - value).abs()
        bound = 2.5 * lr if key in noise else 1e-5  # (noise: an analytically zero gradient, see the README)
        off += int((gap > bound).sum())
        assert float(gap.max()) <= 2.5 * lr, key  # a near-cancelling gradient's sign may differ: ±lr each way
    assert off <= 3
    # the gradients themselves, through AdamW's first moment: grad = exp_avg / (1 - beta1)
    state, reference = case[optim].state_dict()["state"], saved["optimizer"]["state"]
    ours_g = torch.cat([state[i]["exp_avg"].flatten() for i in sorted(reference)])
    theirs_g = torch.cat([reference[i]["exp_avg"].flatten() for i in sorted(reference)])
    assert float((ours_g - theirs_g).norm() / theirs_g.norm()) <= 1e-4
