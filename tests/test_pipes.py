""""-" as INPUT reads the audio from stdin and "-" as OUTPUT writes a WAV to stdout, byte
for byte what file mode gives; with --json the report is then stderr's last line; a
failure leaves stdout empty; nothing is left in the temporary folder."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import REPO, speech_like
from factories import make_models_folder

SCRIPT = REPO / "rvc_modulator.py"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "speech.flac"
    sf.write(path, speech_like(1.5, 22050), 22050, subtype="PCM_16")
    return path


def run(models, tmp_path, source, output, *extra, stdin: bytes = b""):
    """The CLI with bytes on stdin, its own temporary folder, stdout and stderr captured."""
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RVC_")} | {"TMPDIR": str(scratch)}
    result = subprocess.run([sys.executable, str(SCRIPT), str(source), str(output), "voice", "--models_dir",
                             str(models), "--no_noise", *extra], input=stdin, capture_output=True, env=env,
                            timeout=300)
    assert list(scratch.iterdir()) == []  # the run's private folder is gone
    return result


@pytest.mark.parametrize("source, output", [("-", "-"), ("-", "file"), ("file", "-")])
def test_pipes_give_the_bytes_file_mode_gives(models, speech, tmp_path, source, output):
    expected = tmp_path / "expected.wav"
    assert run(models, tmp_path, speech, expected).returncode == 0
    target = tmp_path / "out.wav"
    result = run(models, tmp_path, "-" if source == "-" else speech, "-" if output == "-" else target, "--json",
                 stdin=speech.read_bytes() if source == "-" else b"")
    assert result.returncode == 0, result.stderr
    produced = result.stdout if output == "-" else target.read_bytes()
    assert produced == expected.read_bytes()
    report_line = (result.stderr if output == "-" else result.stdout).decode().strip().splitlines()[-1]
    report = json.loads(report_line)
    assert report["ok"] and report["output"] == ("-" if output == "-" else str(target))
    assert report["input_sample_rate"] == 22050
    if output == "-":
        data, rate = sf.read(io.BytesIO(result.stdout), dtype="int16")
        assert rate == 40000 and len(data) == round(1.5 * 40000)


def test_undecodable_stdin_fails_with_exit_5_naming_stdin_and_an_empty_stdout(models, tmp_path):
    result = run(models, tmp_path, "-", "-", "--json", stdin=b"not audio at all")
    assert result.returncode == rvc.EXIT_BAD_INPUT
    assert result.stdout == b""
    *_, error, report = result.stderr.decode().strip().splitlines()
    assert error.startswith("error: cannot decode audio") and error.endswith("(stdin)")
    assert json.loads(report)["error"] == "bad_input"


def test_a_failure_before_any_audio_leaves_stdout_empty(models, speech, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "-", "-", "missing", "--models_dir", str(models), "--json"],
                            input=speech.read_bytes(), capture_output=True, timeout=300)
    assert result.returncode == rvc.EXIT_NOT_FOUND and result.stdout == b""
    assert json.loads(result.stderr.decode().strip().splitlines()[-1])["error"] == "not_found"


def test_a_worker_request_may_not_use_the_workers_own_pipes():
    worker = rvc.build_parser().parse_args(["--serve"])
    for field in ("input", "output"):
        with pytest.raises(rvc.UsageError, match="stdin/stdout"):
            rvc.request_args({"input": "a.wav", "output": "b.wav", "model": "m", field: "-"}, worker)
