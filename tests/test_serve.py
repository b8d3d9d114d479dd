"""The service worker (--serve), driven as the Go AIService drives it: a subprocess with
pipes and no terminal, one JSON request per line in, exactly one JSON response per
request out, in order; a bad request fails alone; models load once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

import rvc_modulator as rvc
from conftest import REPO, run_cli, speech_like
from factories import make_hubert_fairseq, make_rmvpe_file, make_voice_model_file

SCRIPT = REPO / "rvc_modulator.py"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    (root / "rvc").mkdir()
    make_voice_model_file(root / "rvc" / "voice.pth", version="v1", sample_rate=40000, f0=True, seed=1)
    make_voice_model_file(root / "rvc" / "plain.pth", version="v1", sample_rate=32000, f0=False, seed=2)
    make_hubert_fairseq(root / "hubert_base.pt", hidden=64, layers=10, heads=4, ffn=128, conv_dim=32, seed=3)
    make_rmvpe_file(root / "rmvpe.pt", size="tiny", seed=4)
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    sf.write(folder / "short.wav", speech_like(1.5), rvc.SAMPLE_RATE)
    sf.write(folder / "long.wav", speech_like(90.0), rvc.SAMPLE_RATE)
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    return folder


class Worker:
    """A worker process with the pipes a service holds."""

    def __init__(self, models: Path, *options: str):
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--serve", "--models_dir", str(models), *options],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.ready = self.read()

    def send(self, request: dict | str) -> None:
        self.proc.stdin.write((request if isinstance(request, str) else json.dumps(request)) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the worker ended: {self.proc.stderr.read()}"
        return json.loads(line)

    def ask(self, request: dict | str) -> dict:
        self.send(request)
        return self.read()

    def close(self) -> tuple[int, str, str]:
        stdout, stderr = self.proc.communicate(timeout=120)
        return self.proc.returncode, stdout, stderr


@pytest.fixture
def worker(models):
    w = Worker(models, "--quiet")
    yield w
    if w.proc.poll() is None:
        w.proc.kill()
        w.proc.wait()


def test_the_worker_says_it_is_ready_with_its_version_device_and_protocol(worker):
    assert worker.ready == {"ready": True, "version": rvc.__version__, "device": "cpu", "precision": "fp32",
                            "protocol": rvc.SERVE_PROTOCOL}


def test_each_request_gets_one_response_in_order_and_bad_ones_fail_alone(worker, inputs, tmp_path):
    good = {"input": str(inputs / "short.wav"), "model": "voice", "seed": 1}
    requests = [
        {**good, "id": 1, "output": str(tmp_path / "a.wav")},
        "this is not json",
        {"id": "two", "op": "convert", **good, "output": str(tmp_path / "b.wav"), "f0_up_key": 99},
        {"id": 3, **good, "model": "nobody", "output": str(tmp_path / "c.wav")},
        {"id": 4, **good, "input": str(inputs / "broken.wav"), "output": str(tmp_path / "d.wav")},
        {"id": 5, **good, "output": str(tmp_path / "e.wav"), "unknown_option": 1},
        {"id": 6, **good, "output": str(tmp_path / "f.wav"), "models_dir": "/elsewhere"},
        ["a", "list"],
        {"id": [7], **good, "output": str(tmp_path / "g.wav")},
    ]
    for request in requests:
        worker.send(request)
    responses = [worker.read() for _ in requests]
    assert [r.get("id") for r in responses] == [1, None, "two", 3, 4, 5, 6, None, [7]]
    assert [r["exit_code"] for r in responses] == [0, 2, 2, 3, 5, 2, 2, 2, 0]
    assert [r["ok"] for r in responses] == [True, False, False, False, False, False, False, False, True]
    assert "f0_up_key" in responses[2]["message"] and "nobody" in responses[3]["message"]
    assert "unknown_option" in responses[5]["message"] and "models_dir" in responses[6]["message"]
    assert (tmp_path / "a.wav").is_file() and (tmp_path / "g.wav").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "g.wav"]  # failures leave nothing
    code, rest, stderr = worker.close()
    assert code == 0 and rest == ""  # end of input: exit 0 after the last response, nothing else on stdout
    assert "error:" in stderr  # the human-readable lines go to stderr


def test_a_worker_conversion_is_byte_identical_to_the_command_lines(worker, models, inputs, tmp_path):
    options = {"f0_up_key": 3, "index_rate": 0, "rms_mix_rate": 0.5, "seed": 11}
    response = worker.ask({"id": 1, "input": str(inputs / "short.wav"), "output": str(tmp_path / "served.wav"),
                           "model": "voice", **options})
    assert response["ok"], response
    argv = [str(inputs / "short.wav"), str(tmp_path / "cli.wav"), "voice", "--models_dir", str(models), "--json"]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    cli = run_cli(*argv)
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "served.wav").read_bytes() == (tmp_path / "cli.wav").read_bytes()
    expected = json.loads(cli.stdout)
    for key in ("model", "model_version", "model_sample_rate", "f0_method", "sample_rate", "output_duration"):
        assert response[key] == expected[key], key


def test_models_stay_loaded_and_a_changed_model_file_is_reloaded(worker, models, inputs, tmp_path):
    request = {"input": str(inputs / "short.wav"), "model": "voice", "seed": 1}
    first = worker.ask({**request, "id": 1, "output": str(tmp_path / "1.wav")})
    second = worker.ask({**request, "id": 2, "output": str(tmp_path / "2.wav")})
    assert first["ok"] and second["ok"]
    assert first["timings"]["load"] > 0.05 and second["timings"]["load"] < 0.01
    assert (tmp_path / "1.wav").read_bytes() == (tmp_path / "2.wav").read_bytes()

    changed = models / "rvc" / "changed.pth"
    make_voice_model_file(changed, version="v1", sample_rate=40000, f0=True, seed=1)
    third = worker.ask({**request, "model": "changed", "id": 3, "output": str(tmp_path / "3.wav")})
    make_voice_model_file(changed, version="v1", sample_rate=40000, f0=True, seed=5)  # new weights
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # a different mtime, whatever the clock
    fourth = worker.ask({**request, "model": "changed", "id": 4, "output": str(tmp_path / "4.wav")})
    assert third["ok"] and fourth["ok"] and fourth["timings"]["load"] > 0.01
    assert (tmp_path / "3.wav").read_bytes() != (tmp_path / "4.wav").read_bytes()


def test_check_list_models_and_info_are_requests_too(worker, inputs, tmp_path):
    check = worker.ask({"id": "c", "op": "check", "input": str(inputs / "short.wav"),
                        "output": str(tmp_path / "x.wav"), "model": "voice"})
    listing = worker.ask({"id": "l", "op": "list_models"})
    info = worker.ask({"id": "i", "op": "info", "model": "plain"})
    unknown = worker.ask({"id": "u", "op": "train"})
    assert check["ok"] and check["check"] == "ok" and not (tmp_path / "x.wav").exists()
    assert listing["ok"] and {"plain", "voice"} <= {m["name"] for m in listing["models"]}
    assert info["ok"] and info["model"]["name"] == "plain" and info["model"]["f0"] is False
    assert not unknown["ok"] and unknown["exit_code"] == 2 and "train" in unknown["message"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_abandons_the_running_request_cleanly_and_exits_130(worker, inputs, tmp_path):
    worker.send({"id": "slow", "input": str(inputs / "long.wav"), "output": str(tmp_path / "slow.wav"),
                 "model": "voice"})
    time.sleep(3)
    worker.proc.send_signal(signal.SIGTERM)
    response = worker.read()
    code, _, _ = worker.close()
    assert response["id"] == "slow" and response["error"] == "interrupted" and response["exit_code"] == 130
    assert code == 130
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file
