"""Shared test plumbing: where the reference fixtures are, and how to run the CLI.

The fixtures (../shared/fixtures, or $RVC_FIXTURES) hold small random-weight models in
the real formats and golden outputs of the official RVC WebUI. A user's clone has no
fixtures: tests that need them skip with a visible reason. In CI (CI=true) they must
never skip, so there a missing fixture folder is a failure.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIXTURES = Path(os.environ.get("RVC_FIXTURES", REPO.parent / "shared" / "fixtures"))
IN_CI = os.environ.get("CI", "").lower() == "true"

# The goldens were made with 2 threads; matching that keeps float summation order close.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The reference fixture folder; skips (fails in CI) when it is absent."""
    if not (FIXTURES / "manifest.json").is_file():
        message = f"reference fixtures not found at {FIXTURES} (set RVC_FIXTURES)"
        if IN_CI:
            pytest.fail(message + "; CI must run the fixture tests")
        pytest.skip(message)
    return FIXTURES


@pytest.fixture(scope="session")
def manifest(fixtures: Path) -> dict:
    return json.loads((fixtures / "manifest.json").read_text())


def reference_input_16k(fixtures: Path, case: dict):
    """The exact 16 kHz float32 signal the reference pipeline saw for a manifest case."""
    import numpy as np
    import soundfile as sf

    source = case["files"]["input_16k"]
    if source == "SAME_AS_SOUNDFILE_READ_OF_INPUT":
        return sf.read(fixtures / case["input"], dtype="float32")[0]
    return np.load(fixtures / source)


def snr_db(reference, estimate) -> float:
    """Signal-to-noise ratio of `estimate` against `reference`, in dB."""
    import numpy as np

    reference = np.asarray(reference, dtype=np.float64).ravel()
    estimate = np.asarray(estimate, dtype=np.float64).ravel()
    noise = np.sum((reference - estimate) ** 2)
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(np.sum(reference ** 2) / noise))


SCRIPT = REPO / "rvc_modulator.py"
_RVC_ENV = ("RVC_MODELS_DIR", "RVC_HUBERT", "RVC_RMVPE")


def run_cli(*args, env: dict | None = None, timeout: float = 600, **kwargs):
    """Run the CLI the way a Go service does: a subprocess, no terminal, stdin closed."""
    import subprocess

    base = {k: v for k, v in os.environ.items() if k not in _RVC_ENV}
    base.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=base, timeout=timeout, **kwargs)


def speech_like(seconds: float, sr: int = 16000, f0: float = 140.0, seed: int = 0):
    """A voice-like test signal: a harmonic tone with vibrato and syllable-rate amplitude,
    short noise bursts (consonants) and pauses. Peak 0.5."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
    consonants = rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 3 * t + np.pi) > 0.9)
    y = voice * syllables + 0.3 * consonants
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


def run_main(capsys, *args) -> tuple[int, dict, str]:
    """The CLI in this process (no torch import to wait for): (exit code, its --json
    report, its stderr). `args` must include --json."""
    import rvc_modulator as rvc

    capsys.readouterr()
    code = rvc.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def main_json(*args) -> tuple[int, dict]:
    """The CLI in this process with --json and its stdout captured (usable where capsys is
    not, e.g. in a module-scoped fixture): (exit code, its report)."""
    import contextlib
    import io

    import rvc_modulator as rvc

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = rvc.main([str(a) for a in args] + ["--json"])
    return code, json.loads(out.getvalue())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder as the README lays it out, with tiny networks (factories.
    make_models_folder), one per test module; a module may define its own instead."""
    from factories import make_models_folder

    return make_models_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """One second of speech_like() as a 16 kHz 16-bit WAV."""
    import soundfile as sf

    path = tmp_path_factory.mktemp("in") / "speech.wav"
    sf.write(path, speech_like(1.0), 16000, subtype="PCM_16")
    return path
