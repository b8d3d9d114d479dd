"""--train prepares a dataset, trains with the WebUI's recipe and writes a voice model and
its index: progress as JSON lines, checkpoints in the WebUI's format that resume to the
same continuation, a clean stop on SIGINT, and a model that converts audio.

A tiny run: the training fixture's four recordings, the train_step goldens' tiny G_0/D_0
as the pretrained files, the tiny HuBERT and RMVPE; three epochs of four steps."""
from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import rvc_modulator as rvc
from conftest import SCRIPT, run_main

EPOCHS = 3


def train_args(fixtures: Path, models: Path, *extra: object) -> list[str]:
    start = fixtures / "train_step" / "v2_40k_f0"
    return [str(a) for a in ("--train", fixtures / "training" / "dataset", "me", "--models_dir", models,
                             "--pretrained_g", start / "G_0.pth", "--pretrained_d", start / "D_0.pth",
                             "--hubert", fixtures / "models" / "hubert_tiny_v2",
                             "--rmvpe", fixtures / "models" / "rmvpe_tiny" / "rmvpe.pt",
                             "--save_every", 1, "--keep_checkpoints", 0, "--quiet", *extra)]


def train_lines(*args: str) -> tuple[int, list[dict]]:
    """The CLI in this process with --json: (exit code, every JSON line it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = rvc.main([*args, "--json"])
    return code, [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def trained(fixtures: Path, tmp_path_factory) -> dict:
    models = tmp_path_factory.mktemp("models")
    code, lines = train_lines(*train_args(fixtures, models, "--epochs", EPOCHS, "--log_every", 1))
    assert code == 0, lines[-1]
    return {"models": models, "work": models / "training" / "me", "events": lines[:-1], "report": lines[-1]}


def test_progress_is_one_json_line_per_step_then_the_report(trained: dict) -> None:
    events, report = trained["events"], trained["report"]
    assert report["ok"] and report["epochs"] == EPOCHS and report["steps"] == len(events) > 0
    assert [e["step"] for e in events] == list(range(1, len(events) + 1))
    for event in events:
        assert event["event"] == "step" and set(event) == {"event", "epoch", "step", "loss_disc", "loss_gen",
                                                           "loss_fm", "loss_mel", "loss_kl", "lr", "seconds"}
    assert events[-1]["epoch"] == EPOCHS and events[-1]["lr"] < events[0]["lr"]  # decayed per epoch
    assert Path(report["model"]) == trained["models"] / "rvc" / "me.pth" and Path(report["index"]).is_file()


def mel_l1(checkpoint: Path, work: Path) -> float:
    """The mel L1 of a generator on a fixed batch of the dataset, with fixed noise."""
    recipe = rvc.TRAINING_RECIPES[("v2", 40000)]
    batch = rvc.collate([rvc.load_training_item(i, recipe) for i in rvc.training_items(work, "v2", True)])
    state = torch.load(checkpoint, weights_only=True)["model"]
    config = rvc.config_from_weights(state, checkpoint, 40000)
    net = rvc.TrainingSynthesizer(rvc.SynthConfig.from_list(config), 768, True, state["emb_g.weight"].shape[0],
                                  config[0], recipe.segment_frames)
    rvc.load_into(net, state, checkpoint)
    with torch.no_grad():
        out = net.train_forward(batch, torch.Generator().manual_seed(0))
        real = rvc.slice_segments(rvc.spec_to_mel(batch.spec, recipe), out["starts"], recipe.segment_frames)
        fake = rvc.spec_to_mel(rvc.linear_spectrogram(out["y_hat"].squeeze(1), recipe), recipe)
    return float(torch.nn.functional.l1_loss(real, fake))


def test_the_mel_loss_falls(fixtures: Path, trained: dict) -> None:
    work, steps = trained["work"], trained["report"]["steps"]
    losses = [mel_l1(fixtures / "train_step" / "v2_40k_f0" / "G_0.pth", work)]
    losses += [mel_l1(work / f"G_{steps * e // EPOCHS}.pth", work) for e in range(1, EPOCHS + 1)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] * 0.99, losses


def test_checkpoints_are_in_the_webuis_format(trained: dict) -> None:
    last = trained["report"]["steps"]
    g = torch.load(trained["work"] / f"G_{last}.pth", weights_only=True)
    d = torch.load(trained["work"] / f"D_{last}.pth", weights_only=True)
    for ckpt in (g, d):
        assert list(ckpt) == ["model", "iteration", "optimizer", "learning_rate"] and ckpt["iteration"] == EPOCHS
    assert "dec.ups.0.weight_g" in g["model"] and any(k.startswith("enc_q.") for k in g["model"])
    assert "discriminators.0.convs.0.weight_v" in d["model"]
    assert json.loads((trained["work"] / "config.json").read_text())["data"]["sampling_rate"] == 40000


def test_a_resumed_run_continues_exactly(fixtures: Path, trained: dict, tmp_path: Path) -> None:
    code, _ = train_lines(*train_args(fixtures, tmp_path, "--epochs", 1))
    assert code == 0
    code, lines = train_lines(*train_args(fixtures, tmp_path, "--epochs", EPOCHS))
    assert code == 0 and lines[-1]["resumed_from"].endswith(f"G_{trained['report']['steps'] // EPOCHS}.pth")
    last = trained["report"]["steps"]
    ours = torch.load(tmp_path / "training" / "me" / f"G_{last}.pth", weights_only=True)["model"]
    reference = torch.load(trained["work"] / f"G_{last}.pth", weights_only=True)["model"]
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_the_model_is_the_webuis_small_model_and_converts(capsys, fixtures: Path, trained: dict, speech: Path,
                                                          tmp_path: Path) -> None:
    model = torch.load(trained["models"] / "rvc" / "me.pth", weights_only=True)
    assert list(model) == list(rvc.MODEL_FILE_ORDER) and model["sr"] == "40k" and model["f0"] == 1
    assert not any(k.startswith("enc_q.") for k in model["weight"])
    assert all(v.dtype == torch.float16 for v in model["weight"].values())
    code, report, _ = run_main(capsys, speech, tmp_path / "out.wav", "me", "--index_name", "auto",
                               "--models_dir", trained["models"], "--hubert", fixtures / "models" / "hubert_tiny_v2",
                               "--rmvpe", fixtures / "models" / "rmvpe_tiny" / "rmvpe.pt", "--json")
    assert code == 0 and report["index"] == "me", report


def test_sigint_saves_a_checkpoint_and_exits_130(fixtures: Path, tmp_path: Path) -> None:
    args = train_args(fixtures, tmp_path, "--epochs", 1000, "--save_every", 1000, "--log_every", 1, "--json")
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True)
    first = json.loads(process.stdout.readline())  # the first step is done
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == rvc.EXIT_INTERRUPTED, err
    report = json.loads(out.splitlines()[-1])
    assert report["error"] == "interrupted" and report["checkpoints"]
    step = int(Path(report["checkpoints"][-1]).stem.split("_")[1])
    assert step >= first["step"] and (tmp_path / "training" / "me" / f"D_{step}.pth").is_file()


def test_a_discriminator_is_not_a_generator(fixtures: Path, tmp_path: Path) -> None:
    start = fixtures / "train_step" / "v2_40k_f0"
    code, lines = train_lines(*train_args(fixtures, tmp_path, "--pretrained_g", start / "D_0.pth"))
    assert code == rvc.EXIT_BAD_MODEL and "expected a generator" in lines[-1]["message"]
    code, lines = train_lines(*train_args(fixtures, tmp_path, "--pretrained_d", tmp_path / "nowhere.pth"))
    assert code == rvc.EXIT_NOT_FOUND, lines[-1]


def test_each_checkpoint_can_bring_its_voice_model(fixtures: Path, tmp_path: Path) -> None:
    code, lines = train_lines(*train_args(fixtures, tmp_path, "--epochs", 2, "--save_models"))
    assert code == 0, lines[-1]
    steps = lines[-1]["steps"]
    names = sorted(p.name for p in (tmp_path / "rvc").glob("*.pth"))
    assert names == sorted(["me.pth", f"me_e1_s{steps // 2}.pth", f"me_e2_s{steps}.pth"])
    last, final = (torch.load(tmp_path / "rvc" / n, weights_only=True)["weight"] for n in (names[-1], "me.pth"))
    assert all(torch.equal(last[k], final[k]) for k in final)


def test_a_non_finite_loss_stops_with_exit_6_and_keeps_the_checkpoint(fixtures: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    real_step, calls = rvc.train_step, []

    def failing_step(*args, **kwargs):
        report, out = real_step(*args, **kwargs)
        calls.append(1)
        return (replace(report, loss_mel=float("nan")) if len(calls) > 4 else report), out

    monkeypatch.setattr(rvc, "train_step", failing_step)
    code, lines = train_lines(*train_args(fixtures, tmp_path, "--epochs", 3))
    assert code == rvc.EXIT_INFERENCE and "finite" in lines[-1]["message"], lines[-1]
    work = tmp_path / "training" / "me"
    assert sorted(p.name for p in work.glob("G_*.pth")) == ["G_4.pth"]  # epoch 1's, the last good one
    assert not (tmp_path / "rvc" / "me.pth").exists()


def test_without_pretrained_files_training_starts_from_random_weights(fixtures: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    monkeypatch.setattr(rvc, "WEBUI_FULL_SIZE", dict(inter=16, hidden=8, filter=32, heads=2, layers=2, initial=16,
                                                     gin=16))  # (full-size networks are too slow for a test)
    monkeypatch.setattr(rvc, "SCALE_CHANNELS", ((1, 1), (2, 1), (8, 1), (32, 2), (32, 8), (32, 1)))
    monkeypatch.setattr(rvc, "PERIOD_CHANNELS", (1, 4, 16, 32, 32))
    args = [a for a in train_args(fixtures, tmp_path, "--epochs", 1) if "G_0" not in a and "D_0" not in a]
    args = [a for a in args if a not in ("--pretrained_g", "--pretrained_d")]
    code, lines = train_lines(*args)
    assert code == 0, lines[-1]
    assert any("random weights" in w for w in lines[-1]["warnings"])
    model = torch.load(tmp_path / "rvc" / "me.pth", weights_only=True)
    speakers = model["weight"]["emb_g.weight"]
    assert speakers.shape == (rvc.WEBUI_SPEAKERS, 16) and speakers.float().std() > 0.5  # drawn, not zeros


def test_on_the_cpu_training_is_fp32_whatever_the_precision(fixtures: Path, tmp_path: Path) -> None:
    code, lines = train_lines(*train_args(fixtures, tmp_path, "--epochs", 1, "--precision", "bf16"))
    assert code == 0 and any("--precision bf16 has no effect on training" in w for w in lines[-1]["warnings"])


def test_the_webuis_own_checkpoints_resume(fixtures: Path, tmp_path: Path) -> None:
    """A WebUI training folder's G_/D_ (here the golden's, after its one step of epoch 1):
    weights and AdamW state load by position, and training goes on with epoch 2."""
    work = tmp_path / "training" / "me"
    work.mkdir(parents=True)
    for kind in "GD":
        (work / f"{kind}_1.pth").write_bytes((fixtures / "train_step" / "v2_40k_f0" / f"{kind}_1.pth").read_bytes())
    code, lines = train_lines(*train_args(fixtures, tmp_path, "--epochs", 2))
    assert code == 0, lines[-1]
    assert lines[-1]["resumed_from"] == str(work / "G_1.pth") and lines[-1]["steps"] > 1
    resumed = torch.load(work / f"G_{lines[-1]['steps']}.pth", weights_only=True)
    assert resumed["iteration"] == 2 and resumed["optimizer"]["state"][0]["step"] > 1
