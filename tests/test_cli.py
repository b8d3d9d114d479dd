"""The command line as an API: a Go service runs it as a subprocess, with no terminal,
on uploaded files and user-picked model names. What it sees (exit code, stdout, stderr,
the output file) must never lie, never leave a broken file, and never let a file do harm.

Everything here runs on models the tests build themselves (no shared fixtures needed).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import REPO, SCRIPT, run_cli, speech_like
from factories import RunsOnUnpickle, make_hubert_fairseq, make_rmvpe_file, make_voice_model_file

SR = 16000


# --- a models folder and inputs, built once ------------------------------------------

@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """models/ with v1 40k voices (pitch and no pitch), an index, a tiny HuBERT and RMVPE,
    and the broken files of the bad-input corpus."""
    import faiss
    import torch

    root = tmp_path_factory.mktemp("models")
    rvc_dir = root / "rvc"
    rvc_dir.mkdir()
    make_voice_model_file(rvc_dir / "voice.pth", version="v1", sample_rate=40000, f0=True, seed=1)
    make_voice_model_file(rvc_dir / "voice_nof0.pth", version="v1", sample_rate=32000, f0=False, seed=2)
    make_hubert_fairseq(root / "hubert_base.pt", hidden=64, layers=10, heads=4, ffn=128, conv_dim=32,
                        pos_kernel=16, seed=3)
    make_rmvpe_file(root / "rmvpe.pt", size="tiny", seed=4)

    rng = np.random.default_rng(5)
    for name, dim in (("voice", 256), ("wrong_dim", 768)):
        vectors = rng.standard_normal((400, dim)).astype(np.float32)
        index = faiss.index_factory(dim, "IVF4,Flat")
        index.train(vectors)
        index.add(vectors)
        faiss.write_index(index, str(rvc_dir / f"{name}.index"))
    (rvc_dir / "corrupt.index").write_bytes(b"IxF2" + os.urandom(200))
    good = (rvc_dir / "voice.pth").read_bytes()
    (rvc_dir / "truncated.pth").write_bytes(good[: len(good) // 2])
    (rvc_dir / "text.pth").write_text("this is not a model\n")
    # Loading this the unsafe way would create models/PWNED.
    torch.save({"weight": {}, "config": RunsOnUnpickle(os.system, f"touch '{root / 'PWNED'}'")},
               rvc_dir / "payload.pth")
    return root


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "speech.wav"
    sf.write(path, speech_like(1.5), SR, subtype="PCM_16")
    return path


def convert(models: Path, source: Path, output: Path, *extra, model: str = "voice", **kwargs):
    """A conversion as the service runs it (with --json, so every failure also checks it)."""
    return run_cli(source, output, model, "--models_dir", models, "--no_noise", "--json", *extra, **kwargs)


def assert_clean_failure(result, code: int, output: Path, *, mentions: str = "") -> None:
    """One line on stderr `error: ...`, the documented exit code, no traceback, one JSON
    object on stdout saying the same, and nothing left where the output would go (not even
    a temporary file)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert mentions.lower() in errors[0].lower(), errors[0]
    if "--json" in result.args:
        report = json.loads(result.stdout)
        assert report["ok"] is False and report["exit_code"] == code
        assert f"error: {report['message']}" == errors[0]
    if output.parent.is_dir():
        assert not output.exists() or output.is_dir()
        leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
        assert leftovers == []


# --- exit codes are documented -------------------------------------------------------

def test_readme_exit_code_table_matches_the_code():
    table = dict(re.findall(r"^\|\s*`?(\d+)`?\s*\|\s*`?(EXIT_\w+)`?", (REPO / "README.md").read_text(), re.M))
    code = {str(getattr(rvc, name)): name for name in dir(rvc) if name.startswith("EXIT_")}
    assert table == code


def test_version_and_help_exit_zero():
    version = run_cli("--version")
    assert version.returncode == 0 and rvc.__version__ in version.stdout
    assert run_cli("--help").returncode == 0


# --- a successful conversion ---------------------------------------------------------

def test_converts_to_a_mono_16_bit_wav_at_the_model_rate(models, speech, tmp_path):
    out = tmp_path / "out.wav"
    result = run_cli(speech, out, "voice", "--models_dir", models)
    assert result.returncode == 0, result.stderr
    info = sf.info(out)
    assert (info.samplerate, info.channels, info.subtype) == (40000, 1, "PCM_16")
    assert abs(info.duration - 1.5) < 0.05
    audio, _ = sf.read(out)
    assert np.abs(audio).max() > 0.01
    assert result.stdout == ""


def test_json_success_report_is_one_object_with_the_run_facts(models, speech, tmp_path):
    out = tmp_path / "out.flac"
    result = convert(models, speech, out, "--index_name", "voice", "--f0_method", "harvest",
                     "--resample_sr", "22050")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["exit_code"] == 0
    assert report["output"] == str(out) and report["model"] == "voice" and report["index"] == "voice"
    assert (report["model_version"], report["model_sample_rate"], report["model_f0"]) == ("v1", 40000, True)
    assert report["sample_rate"] == 22050 == sf.info(out).samplerate
    assert report["f0_method"] == "harvest" and report["device"] == "cpu" and report["precision"] == "fp32"
    assert abs(report["input_duration"] - 1.5) < 1e-6 and abs(report["output_duration"] - 1.5) < 0.05
    timings = report["timings"]
    assert list(timings) == ["read", "load", "condition", "f0", "features", "synthesis", "postprocess", "other",
                             "total"]
    assert all(v >= 0 for v in timings.values())
    # every second of the total belongs to a stage: what none claims is milliseconds (scipy's
    # import alone, uncounted, was 0.7 s)
    assert abs(sum(v for k, v in timings.items() if k != "total") - timings["total"]) < 1e-6
    assert timings["other"] < 0.1 and min(timings["read"], timings["condition"], timings["postprocess"]) > 0
    assert report["timings"]["total"] >= report["timings"]["load"] + report["timings"]["synthesis"]
    assert 0 < report["rtf"] < (report["timings"]["total"] - report["timings"]["load"]) / 1.5 + 1e-3
    assert 100 < report["peak_rss_mb"] < 10_000  # torch alone takes 200 MB
    assert report["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (report["index_vectors"], report["index_dim"], report["index_nprobe"]) == (400, 256, 1)
    without_index = json.loads(convert(models, speech, tmp_path / "plain.wav").stdout)
    assert "index_vectors" not in without_index and without_index["index"] is None


def test_default_f0_method_is_rmvpe_when_its_weights_are_there_else_harvest(models, speech, tmp_path):
    with_rmvpe = json.loads(convert(models, speech, tmp_path / "a.wav").stdout)
    without = json.loads(convert(models, speech, tmp_path / "b.wav", "--rmvpe", tmp_path / "none.pt").stdout)
    assert (with_rmvpe["f0_method"], without["f0_method"]) == ("rmvpe", "harvest")


def test_same_seed_gives_identical_output_and_no_noise_is_deterministic(models, speech, tmp_path):
    def run(name, *extra):  # in this process: six start-ups would take half a minute
        out = tmp_path / name
        assert rvc.main([str(speech), str(out), "voice", "--models_dir", str(models), "--f0_method", "harvest",
                         "--quiet", *extra]) == 0
        return sf.read(out)[0]

    assert np.array_equal(run("s1.wav", "--seed", "7"), run("s2.wav", "--seed", "7"))
    assert not np.array_equal(run("s3.wav", "--seed", "7"), run("s4.wav", "--seed", "8"))
    assert np.array_equal(run("n1.wav", "--no_noise"), run("n2.wav", "--no_noise"))


def test_threads_are_honoured_and_do_not_change_the_output(models, speech, tmp_path):
    one = convert(models, speech, tmp_path / "one.wav", "--threads", "1")
    two = convert(models, speech, tmp_path / "two.wav", "--threads", "2")
    assert one.returncode == two.returncode == 0, one.stderr + two.stderr
    assert (json.loads(one.stdout)["threads"], json.loads(two.stdout)["threads"]) == (1, 2)
    assert np.array_equal(sf.read(tmp_path / "one.wav")[0], sf.read(tmp_path / "two.wav")[0])


def test_help_and_version_answer_without_importing_torch():
    blocked = ("import runpy, sys; sys.modules['torch'] = sys.modules['numpy'] = None; "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    for flag in ("--version", "--help"):
        result = subprocess.run([sys.executable, "-c", blocked, str(SCRIPT), flag], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert (rvc.__version__ if flag == "--version" else "--f0_method") in result.stdout


def test_dashed_option_spellings_are_accepted(models, speech, tmp_path):
    out = tmp_path / "out.wav"
    result = run_cli(speech, out, "voice", "--models-dir", models, "--index-name", "voice", "--index-rate", "0.5",
                     "--f0-up-key", "2", "--f0-method", "harvest", "--rms-mix-rate", "1", "--no-noise")
    assert result.returncode == 0, result.stderr


def test_model_name_may_carry_its_extension(models, speech, tmp_path):
    assert convert(models, speech, tmp_path / "o.wav", model="voice.pth").returncode == 0


def test_index_rate_without_an_index_is_a_warning_not_an_error(models, speech, tmp_path):
    result = convert(models, speech, tmp_path / "o.wav", "--index_rate", "0.9")
    assert result.returncode == 0
    assert "no effect without --index_name" in result.stderr
    assert any("--index_name" in w for w in json.loads(result.stdout)["warnings"])


def test_crepe_on_a_cpu_gets_a_warning_that_it_is_slow(models, speech, tmp_path):
    result = convert(models, speech, tmp_path / "o.wav", "--f0_method", "crepe", "--device", "cpu", "--check")
    assert result.returncode == 0, result.stderr
    assert "crepe is slow on a CPU" in result.stderr
    assert any("crepe is slow" in w for w in json.loads(result.stdout)["warnings"])
    quiet = convert(models, speech, tmp_path / "o.wav", "--f0_method", "harvest", "--check")
    assert "slow" not in quiet.stderr  # the check can fail: only crepe is warned about


def test_an_existing_output_file_is_replaced_whole(models, speech, tmp_path):
    out = tmp_path / "out.wav"
    out.write_bytes(b"old")
    assert convert(models, speech, out).returncode == 0
    assert sf.info(out).samplerate == 40000


# --- inputs that convert -------------------------------------------------------------

@pytest.mark.parametrize("rate,channels", [(8000, 1), (192000, 1), (44100, 8)])
def test_any_rate_and_channel_count_converts(models, tmp_path, rate, channels):
    source = tmp_path / "in.wav"
    mono = speech_like(1.0, rate)
    sf.write(source, np.stack([mono * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1), rate)
    out = tmp_path / "out.wav"
    result = convert(models, source, out, "--f0_method", "harvest")
    assert result.returncode == 0, result.stderr
    assert abs(sf.info(out).duration - 1.0) < 0.05
    report = json.loads(result.stdout)
    assert (report["input_sample_rate"], report["input_channels"]) == (rate, channels)
    layout = "mono" if channels == 1 else f"{channels} channels"
    assert f"from {rate} Hz {layout})" in result.stderr  # information, not a warning:
    assert not any("channel" in w or "Hz" in w for w in report["warnings"])


def test_a_clipped_input_converts_with_a_warning(models, tmp_path):
    source = tmp_path / "loud.wav"
    sf.write(source, np.clip(speech_like(1.0) * 4, -1, 1), SR, subtype="PCM_16")
    result = convert(models, source, tmp_path / "out.wav")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if "clipped" in line][0].startswith("warning: the input is clipped")
    assert any("clipped" in w for w in json.loads(result.stdout)["warnings"])


def test_pure_silence_gives_a_silent_output_of_the_same_length(models, tmp_path):
    source = tmp_path / "silence.wav"
    sf.write(source, np.zeros(SR), SR, subtype="PCM_16")
    out = tmp_path / "out.wav"
    result = convert(models, source, out, "--rms_mix_rate", "0")
    assert result.returncode == 0, result.stderr
    audio, _ = sf.read(out)
    assert abs(len(audio) / 40000 - 1.0) < 0.05
    assert np.abs(audio).max() == 0  # the input's envelope (0) replaces the output's


def test_a_single_sample_gives_a_wav_of_its_duration(models, tmp_path):
    source = tmp_path / "one.wav"
    sf.write(source, np.array([0.25]), SR, subtype="PCM_16")
    out = tmp_path / "out.wav"
    result = convert(models, source, out)
    assert result.returncode == 0, result.stderr
    assert sf.info(out).frames == 3 and sf.info(out).samplerate == 40000  # 1/16000 s at 40 kHz, rounded up
    assert json.loads(result.stdout)["output_duration"] == 3 / 40000


def test_non_ascii_paths_with_spaces(models, speech, tmp_path):
    folder = tmp_path / "dossier élève 音声"
    folder.mkdir()
    source = folder / "entrée vocale.wav"
    source.write_bytes(speech.read_bytes())
    out = folder / "sortie convertie.wav"
    assert convert(models, source, out).returncode == 0
    assert sf.info(out).samplerate == 40000


def test_a_model_without_pitch_ignores_the_f0_options(models, speech, tmp_path):
    out = tmp_path / "o.wav"
    result = convert(models, speech, out, "--f0_up_key", "5", model="voice_nof0")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["f0_method"] is None and report["sample_rate"] == 32000


# --- the bad-input corpus -------------------------------------------------------------

def _wav_bytes(data: np.ndarray, subtype: str = "PCM_16", rate: int = SR) -> bytes:
    import io

    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


BAD_INPUTS = {
    "empty_file": lambda: b"",
    "zero_length_wav": lambda: _wav_bytes(np.zeros(0)),
    "text_named_wav": lambda: b"hello, I am not audio\n" * 10,
    "truncated_header": lambda: _wav_bytes(speech_like(0.5))[:30],
    "float_nan": lambda: _wav_bytes(np.where(np.arange(SR) == 100, np.nan, speech_like(1.0)), "FLOAT"),
    "float_inf": lambda: _wav_bytes(np.where(np.arange(SR) == 100, np.inf, speech_like(1.0)), "FLOAT"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_audio_exits_5(models, tmp_path, case):
    source = tmp_path / "in.wav"
    source.write_bytes(BAD_INPUTS[case]())
    out = tmp_path / "out.wav"
    assert_clean_failure(convert(models, source, out), rvc.EXIT_BAD_INPUT, out)


def test_missing_input_exits_5(models, tmp_path):
    out = tmp_path / "out.wav"
    assert_clean_failure(convert(models, tmp_path / "nope.wav", out), rvc.EXIT_BAD_INPUT, out, mentions="not found")


@pytest.mark.parametrize("model,code,mentions", [
    ("missing", rvc.EXIT_NOT_FOUND, "not found"),
    ("truncated", rvc.EXIT_BAD_MODEL, "truncated.pth"),
    ("text", rvc.EXIT_BAD_MODEL, "text.pth"),
    ("payload", rvc.EXIT_BAD_MODEL, "unsafe"),
])
def test_bad_voice_models(models, speech, tmp_path, model, code, mentions):
    out = tmp_path / "out.wav"
    assert_clean_failure(convert(models, speech, out, model=model), code, out, mentions=mentions)
    assert not (models / "PWNED").exists()


@pytest.mark.parametrize("name,code,mentions", [
    ("wrong_dim", rvc.EXIT_BAD_MODEL, "768"),
    ("corrupt", rvc.EXIT_BAD_MODEL, "corrupt.index"),
    ("missing", rvc.EXIT_NOT_FOUND, "missing.index"),
])
def test_bad_indexes(models, speech, tmp_path, name, code, mentions):
    out = tmp_path / "out.wav"
    assert_clean_failure(convert(models, speech, out, "--index_name", name), code, out, mentions=mentions)


def test_missing_hubert_exits_3(models, speech, tmp_path):
    out = tmp_path / "out.wav"
    result = convert(models, speech, out, "--hubert", tmp_path / "no_hubert.pt")
    assert_clean_failure(result, rvc.EXIT_NOT_FOUND, out, mentions="hubert")


def test_rmvpe_without_its_weights_exits_3(models, speech, tmp_path):
    out = tmp_path / "out.wav"
    result = convert(models, speech, out, "--f0_method", "rmvpe", "--rmvpe", tmp_path / "none.pt")
    assert_clean_failure(result, rvc.EXIT_NOT_FOUND, out, mentions="rmvpe")


@pytest.mark.parametrize("args,mentions", [
    (["--f0_method", "yin"], "--f0_method"),
    (["--f0_up_key", "49"], "--f0_up_key"),
    (["--f0_up_key", "1.5"], "--f0_up_key"),
    (["--index_rate", "1.01"], "--index_rate"),
    (["--index_rate", "-0.1"], "--index_rate"),
    (["--index_rate", "nan"], "--index_rate"),
    (["--filter_radius", "8"], "--filter_radius"),
    (["--rms_mix_rate", "2"], "--rms_mix_rate"),
    (["--protect", "0.6"], "--protect"),
    (["--resample_sr", "100"], "--resample_sr"),
    (["--resample_sr", "400000"], "--resample_sr"),
    (["--speaker_id", "-1"], "--speaker_id"),
    (["--speaker_id", "99"], "--speaker_id"),
    (["--seed", "-3"], "--seed"),
    (["--device", "tpu"], "--device"),
    (["--precision", "fp8"], "--precision"),
    (["--precision", "fp16", "--device", "cpu"], "--precision"),
    (["--no_such_option"], "--no_such_option"),
])
def test_out_of_range_options_are_usage_errors_naming_the_option(models, speech, tmp_path, args, mentions):
    out = tmp_path / "out.wav"
    assert_clean_failure(convert(models, speech, out, *args), rvc.EXIT_USAGE, out, mentions=mentions)


@pytest.mark.parametrize("name", ["../voice", "rvc/voice", "..", ".hidden", "a\\b", "/etc/passwd"])
def test_model_names_are_not_paths(models, speech, tmp_path, name):
    out = tmp_path / "out.wav"
    assert_clean_failure(convert(models, speech, out, model=name), rvc.EXIT_USAGE, out, mentions="not a path")
    index = convert(models, speech, out, "--index_name", name)
    assert_clean_failure(index, rvc.EXIT_USAGE, out, mentions="--index_name")


def test_missing_positionals_are_a_usage_error(models, tmp_path):
    result = run_cli("only_input.wav", "--models_dir", models)
    assert result.returncode == rvc.EXIT_USAGE and "Traceback" not in result.stderr


def test_unsupported_output_extension_is_a_usage_error(models, speech, tmp_path):
    out = tmp_path / "out.xyz"
    assert_clean_failure(convert(models, speech, out), rvc.EXIT_USAGE, out, mentions=".xyz")


def test_output_directory_missing_exits_7(models, speech, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "out.wav"
    assert_clean_failure(convert(models, speech, out), rvc.EXIT_OUTPUT, out, mentions="does not exist")


def test_output_path_that_is_a_directory_exits_7(models, speech, tmp_path):
    out = tmp_path / "a_directory.wav"
    out.mkdir()
    assert_clean_failure(convert(models, speech, out), rvc.EXIT_OUTPUT, out, mentions="directory")


def test_unwritable_output_directory_exits_7(models, speech, tmp_path):
    if os.geteuid() == 0:
        out = Path("/proc/rvc_out.wav")  # not writable even for root
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "out.wav"
    result = convert(models, speech, out)
    assert_clean_failure(result, rvc.EXIT_OUTPUT, out, mentions="writ")


def test_a_failure_leaves_an_existing_output_untouched(models, tmp_path):
    out = tmp_path / "out.wav"
    out.write_bytes(b"precious")
    source = tmp_path / "bad.wav"
    source.write_bytes(b"not audio")
    result = convert(models, source, out)
    assert result.returncode == rvc.EXIT_BAD_INPUT
    assert out.read_bytes() == b"precious"


# --- --json on every failure ---------------------------------------------------------

@pytest.mark.parametrize("args,code,kind", [
    (["{speech}", "{out}", "missing"], rvc.EXIT_NOT_FOUND, "not_found"),
    (["{speech}", "{out}", "payload"], rvc.EXIT_BAD_MODEL, "bad_model"),
    (["{bad}", "{out}", "voice"], rvc.EXIT_BAD_INPUT, "bad_input"),
    (["{speech}", "{out}", "voice", "--protect", "9"], rvc.EXIT_USAGE, "usage"),
    (["{speech}", "{tmp}/none/out.wav", "voice"], rvc.EXIT_OUTPUT, "output"),
    (["--info", "../x"], rvc.EXIT_USAGE, "usage"),
])
def test_json_failure_report_parses_and_names_the_error(models, speech, tmp_path, args, code, kind):
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    values = {"speech": speech, "out": tmp_path / "out.wav", "bad": bad, "tmp": tmp_path}
    result = run_cli(*[a.format(**values) for a in args], "--models_dir", models, "--json")
    assert result.returncode == code
    report = json.loads(result.stdout)  # exactly one object and nothing else on stdout
    assert report["ok"] is False and report["exit_code"] == code and report["error"] == kind
    assert report["message"] and "\n" not in report["message"]


# --- preflight and discovery ---------------------------------------------------------

def test_check_validates_without_converting(models, speech, tmp_path):
    out = tmp_path / "out.wav"
    result = convert(models, speech, out, "--check", "--index_name", "voice")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True
    assert not out.exists()


def test_list_models_reports_every_model_with_its_indexes(models):
    result = run_cli("--list_models", "--json", "--models_dir", models)
    assert result.returncode == 0, result.stderr
    listed = {m["name"]: m for m in json.loads(result.stdout)["models"]}
    assert listed["voice"]["version"] == "v1" and listed["voice"]["sample_rate"] == 40000
    assert listed["voice"]["f0"] is True and listed["voice"]["speakers"] == 3
    assert listed["voice"]["indexes"] == ["voice"]
    assert listed["voice_nof0"]["f0"] is False
    assert "error" in listed["payload"] and "unsafe" in listed["payload"]["error"]
    assert not (models / "PWNED").exists()


def test_list_models_lists_every_index_and_which_fit_each_model(models):
    """A service can offer an index named unlike its model: every index file, from its
    header, and for each model those of its feature size."""
    report = json.loads(run_cli("--list_models", "--json", "--models_dir", models).stdout)
    indexes = {i["name"]: i for i in report["indexes"]}
    assert indexes["voice"] == {"name": "voice", "dim": 256, "vectors": 400, "nlist": 4}
    assert indexes["wrong_dim"]["dim"] == 768
    assert "not a faiss index" in indexes["corrupt"]["error"]
    listed = {m["name"]: m for m in report["models"]}
    assert listed["voice"]["fitting_indexes"] == ["voice"]  # v1: 256-dim, so not wrong_dim (768)
    text = run_cli("--list_models", "--models_dir", models).stdout
    assert "voice.index\t256-dim\t400 vectors\t4 lists" in text.splitlines()


def test_info_describes_one_model_in_text_and_json(models):
    text = run_cli("--info", "voice", "--models_dir", models)
    assert text.returncode == 0 and "sample_rate: 40000" in text.stdout
    report = json.loads(run_cli("--info", "voice", "--json", "--models_dir", models).stdout)
    assert report["model"]["version"] == "v1" and report["model"]["speakers"] == 3


def test_models_dir_comes_from_the_environment(models, speech, tmp_path):
    result = run_cli(speech, tmp_path / "o.wav", "voice", "--no_noise", env={"RVC_MODELS_DIR": str(models)})
    assert result.returncode == 0, result.stderr


# --- signals and concurrency ---------------------------------------------------------

def read_terminal_until(fd: int, wanted: bytes, timeout: float = 120) -> bytes:
    """What a child wrote to its terminal (the master side `fd`) up to `wanted`."""
    seen, deadline = b"", time.monotonic() + timeout
    while wanted not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {wanted!r} within {timeout} s: {seen!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        assert chunk, f"the terminal closed before {wanted!r}: {seen!r}"
        seen += chunk
    return seen


def test_sigterm_mid_conversion_leaves_nothing_behind_and_is_prompt(models, tmp_path):
    """Here the signal lands while harvest's blocks run on worker threads (tens of seconds
    each): the process must not wait for them, nor for the blocks still queued. Its
    terminal shows when the blocks have started."""
    import pty

    source = tmp_path / "long.wav"
    sf.write(source, speech_like(200.0), SR, subtype="PCM_16")
    out = tmp_path / "out.wav"
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), source, out, "voice", "--models_dir", models,
                             "--f0_method", "harvest", "--json"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    try:
        read_terminal_until(master, b"converting: pitch 0/4")
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        stdout, _ = proc.communicate(timeout=120)
    finally:
        os.close(master)
    assert time.monotonic() - signalled < 10, "waited for the pitch blocks"  # one block takes ~25 s
    assert proc.returncode == rvc.EXIT_INTERRUPTED
    assert json.loads(stdout)["error"] == "interrupted"
    assert list(tmp_path.iterdir()) == [source]


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stderr", [Terminal, io.StringIO], ids=["terminal", "pipe"])
def test_long_inputs_show_progress_on_a_terminal_and_never_in_a_pipe(models, tmp_path, monkeypatch, stderr):
    """In this process, with the thresholds scaled down so a 10 s input is "long": it takes
    three RMVPE chunks and two segments."""
    source = tmp_path / "long.wav"
    sf.write(source, speech_like(10.0), SR, subtype="PCM_16")
    for name, value in (("PROGRESS_MIN_SECONDS", 5), ("RMVPE_MAX_UNCHUNKED_FRAMES", 512),
                        ("RMVPE_CHUNK_FRAMES", 512), ("T_MAX", 8 * SR), ("T_CENTER", 6 * SR), ("T_QUERY", SR)):
        monkeypatch.setattr(rvc, name, value)
    monkeypatch.setattr(sys, "stderr", stderr())
    code = rvc.main([str(source), str(tmp_path / "out.wav"), "voice", "--models_dir", str(models),
                     "--f0_method", "rmvpe"])
    shown = sys.stderr.getvalue()
    assert code == 0, shown
    steps = [(stage, int(done), int(total))
             for stage, done, total in re.findall(r"\rconverting: (\w+) (\d+)/(\d+)", shown)]
    if stderr is io.StringIO:
        assert steps == [] and "converting" not in shown
    else:
        assert steps == ([("pitch", k, 3) for k in range(4)] + [("features", k, 2) for k in range(3)]
                         + [("segment", k, 2) for k in range(3)]), shown


def test_four_conversions_side_by_side(models, speech, tmp_path):
    outs = [tmp_path / f"out{k}.wav" for k in range(4)]
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), speech, out, "voice", "--models_dir", models,
                               "--no_noise", "--f0_method", "harvest"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for out in outs]
    for proc in procs:
        proc.communicate(timeout=600)
        assert proc.returncode == 0
    first = sf.read(outs[0])[0]
    for out in outs[1:]:
        assert np.array_equal(sf.read(out)[0], first)
