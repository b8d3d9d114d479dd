"""--check makes every check a real run makes, and a real run makes them all before any
work: for each way a run can be doomed, both exit with the same code and the same message,
and the real run fails before its conversion starts (its report has no timings yet)."""
from __future__ import annotations

import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import run_main, speech_like
from factories import make_hubert_fairseq, make_models_folder, make_voice_model_file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_models_folder(tmp_path_factory.mktemp("models"))
    make_voice_model_file(root / "rvc" / "v2voice.pth", version="v2", sample_rate=40000, f0=True, seed=6)
    extra = root / "extra"
    extra.mkdir()
    make_hubert_fairseq(extra / "two_layers.pt", hidden=64, layers=2, heads=4, ffn=128, conv_dim=32, seed=7)
    good = (root / "hubert_base.pt").read_bytes()
    (extra / "truncated_hubert.pt").write_bytes(good[: len(good) // 2])
    (extra / "garbage_rmvpe.pt").write_bytes(b"not a model")
    sf.write(extra / "speech.wav", speech_like(1.0), rvc.SAMPLE_RATE, subtype="PCM_16")
    (extra / "broken.wav").write_bytes(b"RIFF nothing")
    return root, extra


# (case, options or MODEL override, exit code, what the message says)
DOOMED = [
    ("v2 model, HuBERT of 64-dim features", ["MODEL=v2voice"], rvc.EXIT_BAD_MODEL, "768"),
    ("v1 model, HuBERT without layer 9", ["--hubert", "{extra}/two_layers.pt"], rvc.EXIT_BAD_MODEL, "layer 9"),
    ("HuBERT missing", ["--hubert", "{extra}/none.pt"], rvc.EXIT_NOT_FOUND, "HuBERT"),
    ("HuBERT truncated", ["--hubert", "{extra}/truncated_hubert.pt"], rvc.EXIT_BAD_MODEL, "truncated_hubert.pt"),
    ("RMVPE missing", ["--f0_method", "rmvpe", "--rmvpe", "{extra}/none.pt"], rvc.EXIT_NOT_FOUND, "RMVPE"),
    ("RMVPE garbage", ["--rmvpe", "{extra}/garbage_rmvpe.pt"], rvc.EXIT_BAD_MODEL, "garbage_rmvpe.pt"),
    ("index missing", ["--index_name", "nothing"], rvc.EXIT_NOT_FOUND, "index"),
    ("index of another feature size", ["MODEL=v2voice", "--index_name", "voice"], rvc.EXIT_BAD_MODEL, "256"),
    ("model missing", ["MODEL=nobody"], rvc.EXIT_NOT_FOUND, "voice model not found"),
    ("speaker out of range", ["--speaker_id", "7"], rvc.EXIT_USAGE, "speaker 7"),
    ("input undecodable", ["INPUT={extra}/broken.wav"], rvc.EXIT_BAD_INPUT, "cannot decode"),
    ("input missing", ["INPUT={extra}/none.wav"], rvc.EXIT_BAD_INPUT, "not found"),
    ("region past the end", ["--start", "5"], rvc.EXIT_USAGE, "--start"),
    ("output folder missing", ["OUTPUT={extra}/no/such/out.wav"], rvc.EXIT_OUTPUT, "does not exist"),
    ("no GPU", ["--device", "cuda:7"], rvc.EXIT_USAGE, "--device"),
]


def command(setup, tmp_path, spec):
    root, extra = setup
    places = {"INPUT": str(extra / "speech.wav"), "OUTPUT": str(tmp_path / "out.wav"), "MODEL": "voice"}
    options = []
    for item in (s.format(extra=extra) for s in spec):
        name, _, value = item.partition("=")
        if name in places and value:
            places[name] = value
        else:
            options.append(item)
    return [places["INPUT"], places["OUTPUT"], places["MODEL"], "--models_dir", root, "--json", *options]


@pytest.mark.parametrize("case, spec, code, mentions", DOOMED, ids=[d[0] for d in DOOMED])
def test_check_and_a_real_run_refuse_alike_before_any_work(capsys, setup, tmp_path, case, spec, code, mentions):
    if case == "no GPU" and rvc.torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    argv = command(setup, tmp_path, spec)
    checked, check_report, _ = run_main(capsys, *argv, "--check")
    real, real_report, _ = run_main(capsys, *argv)
    assert checked == real == code, (check_report, real_report)
    assert check_report["message"] == real_report["message"]
    assert mentions in real_report["message"]
    assert "timings" not in real_report  # refused in the preparation, before the conversion began
    assert not (tmp_path / "out.wav").exists()


def test_a_hubert_that_does_not_fit_names_its_file_and_both_feature_sizes(capsys, setup, tmp_path):
    root, _ = setup
    code, report, _ = run_main(capsys, *command(setup, tmp_path, ["MODEL=v2voice"]))
    assert code == rvc.EXIT_BAD_MODEL
    message = report["message"]
    assert str(root / "hubert_base.pt") in message and "64" in message and "768" in message


def test_everything_in_place_checks_ok(capsys, setup, tmp_path):
    code, report, _ = run_main(capsys, *command(setup, tmp_path, ["--index_name", "voice"]), "--check")
    assert code == 0 and report["check"] == "ok"
