"""The sanity guard: non-finite audio, or silence from an input that is not silent, is never
written as a success. In reduced precision the conversion runs once more in fp32 (with a
warning) and gives what an fp32 run gives; in fp32 it is an inference failure (exit 6)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

import rvc_modulator as rvc
from conftest import run_main


def convert(capsys, models, source, output, *extra):
    return run_main(capsys, source, output, "voice", "--models_dir", models, "--no_noise", "--json",
                    "--index_name", "voice", *extra)


def broken_synthesizer(monkeypatch, make: str, times: int | None = None) -> list:
    """Synthesizer.infer gives NaN ("nan") or zeros ("zeros") for its first `times` calls
    (None: always); returns the dtypes of the decoder's blocks, one per call."""
    real = rvc.Synthesizer.infer
    calls: list = []

    def infer(self, *args, **kwargs):
        calls.append(self.dec.resblocks[0].compute_dtype or torch.float32)
        audio = real(self, *args, **kwargs)
        if times is None or len(calls) <= times:
            return torch.full_like(audio, torch.nan) if make == "nan" else torch.zeros_like(audio)
        return audio

    monkeypatch.setattr(rvc.Synthesizer, "infer", infer)
    return calls


@pytest.mark.parametrize("make", ["nan", "zeros"])
def test_reduced_precision_retries_in_fp32_and_gives_the_fp32_output(capsys, models, speech, tmp_path,
                                                                      monkeypatch, make):
    code, plain, _ = convert(capsys, models, speech, tmp_path / "fp32.wav")
    assert code == 0
    calls = broken_synthesizer(monkeypatch, make, times=1)
    code, report, err = convert(capsys, models, speech, tmp_path / "bf16.wav", "--precision", "bf16")
    assert code == 0, report
    assert calls == [torch.bfloat16, torch.float32]
    (warning,) = [w for w in report["warnings"] if "again in fp32" in w]
    assert ("non-finite" if make == "nan" else "silence") in warning and "bf16" in warning
    assert f"warning: {warning}" in err
    assert report["precision"] == "fp32"
    assert (tmp_path / "bf16.wav").read_bytes() == (tmp_path / "fp32.wav").read_bytes()
    assert report["output_sha256"] == plain["output_sha256"]


@pytest.mark.parametrize("make, mentions", [("nan", "non-finite"), ("zeros", "silence")])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_network_that_keeps_failing_is_an_inference_error_and_writes_nothing(capsys, models, speech, tmp_path,
                                                                               monkeypatch, make, mentions, precision):
    existing = tmp_path / "out.wav"
    existing.write_bytes(b"an older output")
    calls = broken_synthesizer(monkeypatch, make)
    code, report, err = convert(capsys, models, speech, existing, "--precision", precision)
    assert code == rvc.EXIT_INFERENCE and report["error"] == "inference"
    assert mentions in report["message"]
    assert len(calls) == (2 if precision == "bf16" else 1)  # reduced precision: one more try only
    assert existing.read_bytes() == b"an older output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # no temporary file


def test_silence_in_gives_silence_out_without_complaint(capsys, models, tmp_path, monkeypatch):
    source = tmp_path / "quiet.wav"
    sf.write(source, np.full(8000, 1e-4, np.float32) * np.sign(np.sin(np.arange(8000))), rvc.SAMPLE_RATE)
    broken_synthesizer(monkeypatch, "zeros")  # what any network may give for an input below -60 dBFS
    code, report, _ = convert(capsys, models, source, tmp_path / "o.wav")
    assert code == 0 and report["warnings"] == []
    assert not sf.read(tmp_path / "o.wav", dtype="int16")[0].any()
