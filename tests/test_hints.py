"""What a new user is told: every option that changes nothing gets a warning, once; a
mistyped model or index name gets the close names; a path as MODEL gets the --models_dir
that reaches it; an index that belongs to the model is named, never used silently, and
--index_name auto uses it; --check says what it resolved; ordinary inputs (44.1 kHz
stereo) are information, not warnings; --verbose shows the traceback of an error."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import run_main, speech_like
from factories import make_models_folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = make_models_folder(tmp_path_factory.mktemp("models"))
    (root / "rvc" / "Narrator.pth").write_bytes((root / "rvc" / "plain.pth").read_bytes())
    return root


def run(capsys, models, speech, tmp_path, model="voice", *extra):
    return run_main(capsys, speech, tmp_path / "out.wav", model, "--models_dir", models, "--json", "--no_noise",
                    "--check", *extra)


NO_EFFECT = [  # (model, options, the warning)
    ("plain", ["--f0_up_key", "12"], "--f0_up_key has no effect: plain is a model without pitch"),
    ("plain", ["--f0_method", "harvest"], "--f0_method has no effect: plain is a model without pitch"),
    ("plain", ["--filter_radius", "5"], "--filter_radius has no effect: plain is a model without pitch"),
    ("plain", ["--interp_unvoiced"], "--interp_unvoiced has no effect: plain is a model without pitch"),
    ("plain", ["--protect", "0.2"], "--protect has no effect: plain is a model without pitch"),
    ("voice", ["--filter_radius", "5", "--f0_method", "rmvpe", "--index_name", "voice"],
     "--filter_radius has no effect with --f0_method rmvpe"),
    ("voice", ["--protect", "0.2", "--index_rate", "0.5"], "--protect has no effect without retrieval"),
    ("voice", ["--protect", "0.2", "--index_name", "voice", "--index_rate", "0"],
     "--protect has no effect without retrieval"),
    ("voice", ["--protect", "0.2", "--index_name", "voice", "--interp_unvoiced"],
     "--protect has no effect with --interp_unvoiced"),
    ("voice", ["--index_rate", "0.5"], "--index_rate has no effect without --index_name"),
]


@pytest.mark.parametrize("model, options, warning", NO_EFFECT, ids=[" ".join(o) for _, o, _ in NO_EFFECT])
def test_an_option_that_changes_nothing_is_warned_about_once(capsys, models, speech, tmp_path, model, options,
                                                             warning):
    code, report, err = run(capsys, models, speech, tmp_path, model, *options)
    assert code == 0, report
    assert [w for w in report["warnings"] if warning in w] != []
    assert err.count(warning) == 1


def test_options_that_do_something_draw_no_warning(capsys, models, speech, tmp_path):
    code, report, _ = run(capsys, models, speech, tmp_path, "voice", "--index_name", "voice", "--f0_method",
                          "harvest", "--filter_radius", "5", "--protect", "0.2", "--f0_up_key", "3")
    assert code == 0 and report["warnings"] == []


@pytest.mark.parametrize("given, meant", [("VOICE", "voice"), ("vocie", "voice"), ("narator", "Narrator")])
def test_a_mistyped_model_name_gets_the_close_names(capsys, models, speech, tmp_path, given, meant):
    code, report, _ = run(capsys, models, speech, tmp_path, given)
    assert code == rvc.EXIT_NOT_FOUND
    assert f"did you mean '{meant}'?" in report["message"] and "--list_models" in report["message"]


def test_a_name_like_none_says_where_the_names_are(capsys, models, speech, tmp_path):
    code, report, _ = run(capsys, models, speech, tmp_path, "zzzzzz")
    assert code == rvc.EXIT_NOT_FOUND and "did you mean" not in report["message"]
    assert "--list_models" in report["message"]


def test_a_mistyped_index_name_gets_the_close_names(capsys, models, speech, tmp_path):
    code, report, _ = run(capsys, models, speech, tmp_path, "voice", "--index_name", "Voise")
    assert code == rvc.EXIT_NOT_FOUND and "did you mean 'voice'?" in report["message"]


def test_a_path_as_model_says_which_models_dir_and_name_reach_it(capsys, models, speech, tmp_path):
    code, report, _ = run(capsys, models, speech, tmp_path, str(models / "rvc" / "voice.pth"))
    assert code == rvc.EXIT_USAGE
    assert f"give --models_dir {models} and voice as MODEL" in report["message"]
    elsewhere = tmp_path / "downloads" / "Singer.pth"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes((models / "rvc" / "voice.pth").read_bytes())
    code, report, _ = run(capsys, models, speech, tmp_path, str(elsewhere))
    assert code == rvc.EXIT_USAGE
    assert "move the file into <models_dir>/rvc/ and give Singer as MODEL" in report["message"]


def test_the_models_own_index_is_named_but_never_used_silently(capsys, models, speech, tmp_path):
    code, report, err = run(capsys, models, speech, tmp_path, "voice")
    assert code == 0 and report["index"] is None and report["resolved"]["index"] is None
    hint = "voice's index voice.index is not used: give --index_name voice (or --index_name auto) to use it"
    assert report["warnings"] == [hint] and f"warning: {hint}" in err
    code, report, _ = run(capsys, models, speech, tmp_path, "voice", "--index_rate", "0")  # no retrieval, on purpose
    assert code == 0 and report["warnings"] == []


def test_index_name_auto_uses_the_models_one_index(capsys, models, speech, tmp_path):
    code, report, _ = run(capsys, models, speech, tmp_path, "voice", "--index_name", "auto")
    assert code == 0 and report["index"] == "voice" and report["warnings"] == []
    assert report["resolved"]["index"] == str(models / "rvc" / "voice.index")


def test_index_name_auto_without_an_index_warns_and_converts_without(capsys, models, speech, tmp_path):
    code, report, _ = run(capsys, models, speech, tmp_path, "plain", "--index_name", "auto")
    assert code == 0 and report["index"] is None
    assert report["warnings"] == [f"--index_name auto found no index for plain in {models / 'rvc'}: "
                                  f"converting without one"]


def test_index_name_auto_with_several_indexes_asks_for_one(capsys, models, speech, tmp_path):
    extra = models / "rvc" / "added_IVF4_Flat_nprobe_1_voice_v1.index"
    extra.write_bytes((models / "rvc" / "voice.index").read_bytes())
    try:
        code, report, _ = run(capsys, models, speech, tmp_path, "voice", "--index_name", "auto")
    finally:
        extra.unlink()
    assert code == rvc.EXIT_USAGE
    assert "auto finds 2 indexes for voice (added_IVF4_Flat_nprobe_1_voice_v1, voice)" in report["message"]


def test_check_says_what_it_resolved(capsys, models, speech, tmp_path):
    code, report, err = run(capsys, models, speech, tmp_path, "voice", "--index_name", "voice")
    assert code == 0 and report["check"] == "ok"
    resolved = report["resolved"]
    assert resolved["model"] == str(models / "rvc" / "voice.pth")
    assert resolved["hubert"] == str(models / "hubert_base.pt")
    assert resolved["rmvpe"] == str(models / "rmvpe.pt") and resolved["f0_method"] == "rmvpe"
    assert resolved["f0_reason"] == f"the default: {models / 'rmvpe.pt'} is there"
    assert (resolved["device"], resolved["precision"], resolved["sample_rate"]) == ("cpu", "fp32", 40000)
    lines = dict(line.split(":", 1) for line in err.splitlines() if not line.startswith("ok:"))
    assert lines["voice model"].strip() == f"{models / 'rvc' / 'voice.pth'} (v1, 40000 Hz, with pitch)"
    assert lines["pitch"].strip().startswith("rmvpe (the default")
    assert lines["index"].strip() == f"{models / 'rvc' / 'voice.index'} (256-dim, 400 vectors)"
    assert lines["device"].strip().startswith("cpu, fp32")


def test_check_says_why_pitch_falls_back_to_harvest(capsys, models, speech, tmp_path):
    code, report, err = run(capsys, models, speech, tmp_path, "voice", "--rmvpe", tmp_path / "none.pt",
                            "--index_name", "voice")
    assert code == 0 and report["resolved"]["f0_method"] == "harvest" and report["resolved"]["rmvpe"] is None
    assert f"no {tmp_path / 'none.pt'}" in report["resolved"]["f0_reason"]
    assert "huggingface.co/lj1995/VoiceConversionWebUI" in report["resolved"]["f0_reason"]


def test_a_44k_stereo_input_is_information_not_a_warning(capsys, models, tmp_path):
    source = tmp_path / "stereo.wav"
    sf.write(source, np.stack([speech_like(1.0, 44100)] * 2, axis=1), 44100, subtype="PCM_16")
    code, report, err = run_main(capsys, source, tmp_path / "out.wav", "voice", "--models_dir", models, "--json",
                                 "--index_name", "voice")
    assert code == 0 and report["warnings"] == [] and "warning" not in err
    assert (report["input_sample_rate"], report["input_channels"]) == (44100, 2)
    assert "from 44100 Hz stereo" in err.splitlines()[-1]


def test_verbose_prints_the_traceback_of_an_error(capsys, models, speech, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(rvc, "condition", broken)
    argv = [speech, tmp_path / "out.wav", "voice", "--models_dir", models, "--json", "--index_name", "voice"]
    code, report, err = run_main(capsys, *argv)
    assert code == rvc.EXIT_INTERNAL and "Traceback" not in err and "(run with --verbose" in report["message"]
    code, report, err = run_main(capsys, *argv, "--verbose")
    assert code == rvc.EXIT_INTERNAL and "NoneType: None" not in err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: a bug" in err
    assert err.strip().splitlines()[-1] == "error: internal error: ZeroDivisionError: a bug"
