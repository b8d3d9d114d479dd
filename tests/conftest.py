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


def snr_db(reference, estimate) -> float:
    """Signal-to-noise ratio of `estimate` against `reference`, in dB."""
    import numpy as np

    reference = np.asarray(reference, dtype=np.float64).ravel()
    estimate = np.asarray(estimate, dtype=np.float64).ravel()
    noise = np.sum((reference - estimate) ** 2)
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(np.sum(reference ** 2) / noise))
