"""Pitch: every F0 estimator finds the pitch it should, the reference's estimators match
its dumps, and the key shift and coarse quantisation are exactly the reference's."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import rvc_modulator as rvc
from conftest import reference_input_16k, speech_like

SR = rvc.SAMPLE_RATE


def padded(audio: np.ndarray) -> np.ndarray:
    """The signal the reference estimates pitch on: conditioned and reflect-padded by T_PAD."""
    return np.pad(rvc.condition(audio), (rvc.T_PAD, rvc.T_PAD), mode="reflect")


def tone(hz: float, seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    y = sum(np.sin(2 * np.pi * k * hz * t) / k for k in range(1, 6))
    return (0.4 * y / np.abs(y).max()).astype(np.float32)


def semitones(a: np.ndarray, b: float) -> np.ndarray:
    return 12 * np.abs(np.log2(a / b))


# --- the coarse pitch the text encoder embeds ----------------------------------------

@pytest.mark.parametrize("hz,coarse", [(0, 1), (30, 1), (50, 1), (100, 20), (200, 54), (440, 122),
                                       (1000, 238), (1100, 255), (4000, 255)])
def test_coarse_pitch_matches_the_reference_table(hz, coarse):
    assert rvc.coarse_pitch(np.array([hz], dtype=np.float64))[0] == coarse


def test_coarse_pitch_is_monotonic_over_the_voice_range():
    coarse = rvc.coarse_pitch(np.linspace(50, 1100, 5000))
    assert np.all(np.diff(coarse) >= 0) and coarse[0] == 1 and coarse[-1] == 255


# --- key shift ------------------------------------------------------------------------

@pytest.mark.parametrize("key", [-12, -5, 3, 12])
def test_f0_up_key_shifts_the_pitch_by_exactly_that_many_semitones(key):
    x = padded(tone(180))
    p_len = len(x) // rvc.HOP
    _, base = rvc.estimate_f0(x, p_len, "harvest")
    coarse, shifted = rvc.estimate_f0(x, p_len, "harvest", f0_up_key=key)
    voiced = base > 0
    assert voiced.mean() > 0.5
    np.testing.assert_allclose(shifted[voiced] / base[voiced], 2 ** (key / 12), rtol=1e-12)
    assert np.all(shifted[~voiced] == 0)
    assert np.array_equal(coarse, rvc.coarse_pitch(shifted))


def test_unvoiced_frames_stay_unvoiced_unless_interpolation_is_asked_for():
    x = padded(np.concatenate([tone(200, 0.6), np.zeros(SR // 2, np.float32), tone(300, 0.6)]))
    p_len = len(x) // rvc.HOP
    _, classic = rvc.estimate_f0(x, p_len, "harvest")
    _, filled = rvc.estimate_f0(x, p_len, "harvest", interp_unvoiced=True)
    gap = slice(rvc.T_PAD // rvc.HOP + 70, rvc.T_PAD // rvc.HOP + 100)  # inside the silence
    assert np.all(classic[gap] == 0)
    assert np.all((filled[gap] >= 190) & (filled[gap] <= 310))


def test_estimates_have_exactly_p_len_frames():
    x = padded(speech_like(1.0))
    p_len = len(x) // rvc.HOP
    for method in ("harvest", "dio"):
        coarse, f0 = rvc.estimate_f0(x, p_len, method)
        assert coarse.shape == f0.shape == (p_len,)


# --- every estimator finds a known pitch ---------------------------------------------

def _available(method: str) -> bool:
    module = rvc.F0_OPTIONAL_PACKAGES.get(method, (None,))[0]
    return module is None or importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("method", ["harvest", "dio", "pm", "crepe"])
@pytest.mark.parametrize("hz", [110.0, 261.6, 440.0])
def test_estimator_finds_a_steady_tone_within_a_semitone(method, hz):
    if not _available(method):
        pytest.skip(f"{method} needs {rvc.F0_OPTIONAL_PACKAGES[method][1]}, which is not installed")
    x = padded(tone(hz))
    p_len = len(x) // rvc.HOP
    _, f0 = rvc.estimate_f0(x, p_len, method)
    middle = f0[rvc.T_PAD // rvc.HOP + 20: -rvc.T_PAD // rvc.HOP - 20]  # the tone, away from its edges
    voiced = middle[middle > 0]
    assert len(voiced) > 0.8 * len(middle)
    assert np.median(semitones(voiced, hz)) < 1.0


def test_a_missing_optional_package_is_a_usage_error_saying_what_to_install(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_parselmouth(name, *args, **kwargs):
        if name == "parselmouth":
            raise ImportError("No module named 'parselmouth'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_parselmouth)
    with pytest.raises(rvc.UsageError, match="pip install praat-parselmouth"):
        rvc.estimate_f0(np.zeros(SR), SR // rvc.HOP, "pm")


def test_rmvpe_without_weights_is_not_found():
    with pytest.raises(rvc.NotFoundError, match="rmvpe"):
        rvc.estimate_f0(np.zeros(SR), SR // rvc.HOP, "rmvpe", rmvpe=None)


# --- the reference's own estimators match its dumps ----------------------------------

def _reference_cases(manifest, method):
    return [c for c in manifest["cases"] if c["if_f0"] and c["params"]["f0_method"] == method]


@pytest.mark.parametrize("method", ["harvest", "pm", "rmvpe"])
def test_f0_matches_the_reference_dumps(fixtures, manifest, method):
    if not _available(method):
        pytest.skip(f"{method} needs {rvc.F0_OPTIONAL_PACKAGES[method][1]}, which is not installed")
    rmvpe = rvc.load_rmvpe(fixtures / "models/rmvpe_tiny/rmvpe.pt") if method == "rmvpe" else None
    cases = _reference_cases(manifest, method)
    assert cases
    for case in cases:
        x = padded(reference_input_16k(fixtures, case))
        p_len = len(x) // rvc.HOP
        params = case["params"]
        coarse, f0 = rvc.estimate_f0(x, p_len, method, f0_up_key=params["f0_up_key"],
                                     filter_radius=params["filter_radius"], rmvpe=rmvpe)
        ref_f0 = np.load(fixtures / case["files"]["f0_full"])[:p_len]
        ref_coarse = np.load(fixtures / case["files"]["f0_coarse_full"])[:p_len]
        same_voicing = (f0 > 0) == (ref_f0 > 0)
        assert (~same_voicing).sum() <= (1 if method == "rmvpe" else 0), case["id"]
        both = same_voicing & (f0 > 0)
        # rmvpe: fixtures README tolerance. harvest/pm: bit-exact with the reference's own
        # builds; pyworld compiled from source here differs in the last bits (~1e-6 Hz).
        tolerance = 0.01 if method == "rmvpe" else 1e-4
        assert np.abs(f0[both] - ref_f0[both]).max() <= tolerance, case["id"]
        off = coarse != ref_coarse
        assert off.mean() <= 0.005 and np.abs(coarse - ref_coarse).max() <= (1 if off.any() else 0), case["id"]


# --- long inputs ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["harvest", "dio"])
def test_long_inputs_are_estimated_in_blocks_that_agree_with_one_piece(method):
    """WORLD's memory grows faster than the signal, so long inputs run in blocks; with the
    context kept on both sides the blocks reproduce the one-piece contour."""
    x = padded(speech_like(20.0, f0=170.0, seed=3))
    whole = rvc.f0_harvest(x, 0) if method == "harvest" else rvc.f0_dio(x)
    calls, world = [], rvc.world_f0(method)

    def estimator(block):
        calls.append(len(block))
        return world(block)

    blocks = rvc.in_blocks(estimator, x, block_frames=500, context_frames=300)
    assert len(calls) == 5 and max(calls) <= (500 + 2 * 300) * rvc.HOP
    assert blocks.shape == whole.shape
    assert np.array_equal(blocks > 0, whole > 0)  # the same voicing everywhere
    assert np.abs(blocks - whole).max() <= 1e-3  # Hz (measured: harvest 5.6e-4, dio 1e-10)


def test_blocks_run_concurrently_and_give_the_same_contour_in_the_same_order():
    """WORLD releases the GIL, so blocks run on threads; the result is the one-thread result."""
    import threading

    x = padded(speech_like(20.0, f0=170.0, seed=4))
    barrier = threading.Barrier(2, timeout=30)  # broken unless the first two blocks are in flight at once
    calls, dio = iter(range(1000)), rvc.world_f0("dio")  # next() on an iterator is atomic under the GIL

    def meeting_dio(block):
        if next(calls) < 2:
            barrier.wait()
        return dio(block)

    seen = []
    one = rvc.in_blocks(dio, x, block_frames=500, context_frames=300, workers=1)
    two = rvc.in_blocks(meeting_dio, x, block_frames=500, context_frames=300, workers=2,
                        progress=lambda *step: seen.append(step))
    assert np.array_equal(one, two)
    assert seen == [("pitch", k, 5) for k in range(0, 6)]


def test_short_inputs_run_in_one_piece():
    x = np.zeros(10 * SR)
    seen_lengths = rvc.in_blocks(lambda block: np.full(len(block) // rvc.HOP + 1, float(len(block))), x)
    assert len(seen_lengths) == 1001 and set(seen_lengths) == {len(x)}
