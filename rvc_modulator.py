#!/usr/bin/env python3
"""rvc_modulator: Retrieval-based Voice Conversion (RVC) from the command line.

    python rvc_modulator.py in.wav out.wav MODEL [--index_name INDEX] [options]

Changes the timbre of the voice in a recording to the voice of an RVC model and keeps
the words and the intonation. Everything neural is implemented here in plain PyTorch and
loads the files users already have: WebUI voice models (`.pth`, v1/v2, 32k/40k/48k, with
or without pitch), `hubert_base.pt` (fairseq format, read without fairseq) or a
transformers-format HuBERT folder, `rmvpe.pt`, and faiss `.index` files.

The specification we work to is SPEC.md (shared with the fixtures); section numbers
below (§n) refer to it. Sources read for facts (key names, shapes, constants):
  - RVC WebUI, RVC-Project/Retrieval-based-Voice-Conversion-WebUI (main @ 4338f12, and
    the classic 20240604 branch): synthesizer, pipeline, RMVPE, index building.
  - fairseq (facebookresearch/fairseq): HuBERT / wav2vec 2.0 encoder and checkpoint layout.
  - transformers (huggingface/transformers): modeling_hubert.py and its fairseq converter.
  - Applio (IAHispano/Applio): the extra keys and vocoders forks write into `.pth` files.
No code was copied from them.

Map of this file, in order:
  1. Constants        audio, pipeline and pitch constants, stated once.
  2. CLI              argument parsing, the run and its reporting (--json), entry point.
  3. Errors           exit codes and the exception types that carry them.
  4. Audio I/O        decoding any input to 16 kHz mono, atomic writing of the output.
  5. Weight loading   safe unpickling, weight-norm folding, key/shape checking, and the
                      loaders for voice models, HuBERT and RMVPE.
  6. Networks         HuBERT content encoder, RVC synthesizer (text encoder, flow,
                      NSF-HiFiGAN), RMVPE pitch network.
  7. Pitch            F0 estimators (rmvpe, harvest, dio, crepe, pm) and coarse pitch.
  8. Retrieval        faiss index loading and feature blending.
  9. Pipeline         segmentation, per-segment conversion and post-processing (§5).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__version__ = "0.1.0"

# =============================================================================
# 1. Constants
# =============================================================================

SAMPLE_RATE = 16000  # Hz: HuBERT, the F0 estimators and the pipeline all work at 16 kHz
HOP = 160  # samples per pitch frame at 16 kHz: 10 ms, 100 frames/s
HUBERT_HOP = 320  # samples per HuBERT frame: 20 ms, 50 frames/s (twice HOP)

# Pitch range and the mel-scaled coarse pitch that the text encoder embeds (§4.1).
F0_MIN = 50.0  # Hz
F0_MAX = 1100.0  # Hz
F0_MEL_MIN = 1127.0 * math.log(1.0 + F0_MIN / 700.0)  # ~77.755
F0_MEL_MAX = 1127.0 * math.log(1.0 + F0_MAX / 700.0)  # ~1064.408
F0_COARSE_BINS = 256  # coarse pitch in 1..255; 1 means unvoiced

# =============================================================================
# 2. CLI
# =============================================================================

# [section: CLI]

# =============================================================================
# 3. Errors
# =============================================================================

# Exit codes are part of the interface (a Go service reads them); README.md documents
# the same table and tests/test_cli.py checks the two agree.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: an unexpected exception
EXIT_USAGE = 2  # bad command line or invalid option value
EXIT_NOT_FOUND = 3  # a model, index, HuBERT or RMVPE file is missing
EXIT_BAD_MODEL = 4  # a model, index, HuBERT or RMVPE file is invalid, unsupported, corrupt or unsafe
EXIT_BAD_INPUT = 5  # the input audio is unreadable, empty or invalid
EXIT_INFERENCE = 6  # inference failed (out of memory, non-finite output, ...)
EXIT_OUTPUT = 7  # the output cannot be written
EXIT_INTERRUPTED = 130  # SIGINT or SIGTERM


class RVCError(Exception):
    """An expected failure: reported as one line `error: <message> (<subject>)`."""

    exit_code = EXIT_INTERNAL
    kind = "internal"

    def __init__(self, message: str, subject: str | os.PathLike | None = None):
        super().__init__(message)
        self.message = message
        self.subject = None if subject is None else str(subject)

    def __str__(self) -> str:
        return self.message if self.subject is None else f"{self.message} ({self.subject})"


class UsageError(RVCError):
    exit_code, kind = EXIT_USAGE, "usage"


class NotFoundError(RVCError):
    exit_code, kind = EXIT_NOT_FOUND, "not_found"


class ModelFileError(RVCError):
    exit_code, kind = EXIT_BAD_MODEL, "bad_model"


class InputAudioError(RVCError):
    exit_code, kind = EXIT_BAD_INPUT, "bad_input"


class InferenceError(RVCError):
    exit_code, kind = EXIT_INFERENCE, "inference"


class OutputError(RVCError):
    exit_code, kind = EXIT_OUTPUT, "output"


class Interrupted(RVCError):
    exit_code, kind = EXIT_INTERRUPTED, "interrupted"


WARNINGS: list[str] = []  # every warning of this run, also reported by --json


def warn(message: str) -> None:
    """A one-line warning on stderr (the input was clipped, resampled, ...)."""
    WARNINGS.append(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


# =============================================================================
# 4. Audio I/O
# =============================================================================

# [section: audio I/O]

# =============================================================================
# 5. Weight loading
# =============================================================================

# Model files are untrusted input. Everything goes through torch's weights-only
# unpickler, which rebuilds tensors and plain containers and refuses every other
# global. fairseq checkpoints (hubert_base.pt) additionally pickle a few harmless
# objects (fairseq's Dictionary, argparse.Namespace, ...): for those files, and only
# for globals from the modules below, we register inert stand-in classes under the
# pickled names. A stand-in imports nothing and runs nothing; a global from any other
# module (os.system, builtins.eval, ...) is refused as unsafe.
STANDIN_MODULE_PREFIXES = ("fairseq.", "argparse", "omegaconf.", "numpy.", "collections")


class _Standin:
    """Inert placeholder for a pickled object of a class we neither have nor trust."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._args = args

    def __setstate__(self, state: Any) -> None:
        self._state = state


def _standin_for(qualified_name: str) -> tuple[type, str]:
    module, _, name = qualified_name.rpartition(".")
    cls = type(name or "Standin", (_Standin,), {"__module__": module})
    return cls, qualified_name


def _pickled_globals(path: Path) -> list[str]:
    """The globals a torch checkpoint names beyond torch's own allow-list (no code runs)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as exc:  # not a zip checkpoint: legacy format, or not torch at all
        raise _describe_load_failure(path, exc) from exc


def _describe_load_failure(path: Path, exc: BaseException) -> ModelFileError:
    text = str(exc)
    if "Unsupported global" in text or "unrecognized function" in text or "allowlisted" in text:
        return ModelFileError("unsafe file: it references Python code or objects that are not weights; refusing to load it", path)
    if isinstance(exc, (EOFError,)) or "failed finding central directory" in text or "truncated" in text.lower():
        return ModelFileError("corrupt or truncated file", path)
    return ModelFileError(f"not a readable PyTorch weights file ({type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'})", path)


def load_torch_file(path: Path, *, allow_standins: bool = False) -> Any:
    """Load a torch.save file without ever executing code from it.

    allow_standins: accept harmless pickled objects from STANDIN_MODULE_PREFIXES modules
    (fairseq checkpoints) as inert placeholders; all other globals are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError("file not found", path)
    if path.stat().st_size == 0:
        raise ModelFileError("empty file", path)
    standins: list[tuple[type, str]] = []
    if allow_standins:
        names = _pickled_globals(path)
        unsafe = [n for n in names if not n.startswith(STANDIN_MODULE_PREFIXES)]
        if unsafe:
            raise ModelFileError(f"unsafe file: it references {unsafe[0]}; refusing to load it", path)
        standins = [_standin_for(n) for n in names]
    try:
        with torch.serialization.safe_globals(standins):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except RVCError:
        raise
    except Exception as exc:
        raise _describe_load_failure(path, exc) from exc


def weight_from_norm(g: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """Weight-norm reparametrisation: w = g * v / ||v||, the norm over every axis but `dim`."""
    axes = [a for a in range(v.dim()) if a != dim % v.dim()]
    return g * v / v.norm(dim=axes, keepdim=True)


# Weight-norm pairs: legacy torch.nn.utils.weight_norm names and the newer parametrizations.
_WEIGHT_NORM_SUFFIXES = ((".weight_g", ".weight_v"),
                         (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def fold_weight_norm(state: Mapping[str, torch.Tensor], dim: int = 0) -> dict[str, torch.Tensor]:
    """Replace every (g, v) weight-norm pair by the plain `weight` it stands for (fp32)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for g_suffix, v_suffix in _WEIGHT_NORM_SUFFIXES:
            if key.endswith(v_suffix):
                break
            if key.endswith(g_suffix):
                base = key[: -len(g_suffix)]
                v = state.get(base + v_suffix)
                if v is None:
                    raise KeyError(base + v_suffix)
                out[base + ".weight"] = weight_from_norm(value.float(), v.float(), dim)
                break
        else:
            out[key] = value
    return out


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                     ignore: Iterable[str] = ()) -> None:
    """Every key the module needs is present with its exact shape, and nothing else is.

    Raises ModelFileError naming the first offending key. `ignore`: keys of the file that
    inference does not use (they may be present or not).
    """
    ignore = set(ignore)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise ModelFileError(f"missing tensor {key!r}", path)
        if not isinstance(state[key], torch.Tensor):
            raise ModelFileError(f"{key!r} is not a tensor", path)
        if tuple(state[key].shape) != shape:
            raise ModelFileError(f"tensor {key!r} has shape {list(state[key].shape)}, expected {list(shape)}", path)
    extra = sorted(k for k in state if k not in expected and k not in ignore)
    if extra:
        raise ModelFileError(f"unexpected tensor {extra[0]!r}", path)


def load_checked(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                 ignore: Iterable[str] = ()) -> nn.Module:
    """check_state_dict, then copy the weights in as fp32 and switch to eval mode."""
    check_state_dict(module, state, path, ignore)
    own = set(module.state_dict())
    module.load_state_dict({k: v.float() if v.is_floating_point() else v
                            for k, v in state.items() if k in own}, strict=True)
    return module.eval()


# -----------------------------------------------------------------------------
# 5a. Voice models (.pth)
# -----------------------------------------------------------------------------

# [section: voice model loading]

# -----------------------------------------------------------------------------
# 5b. HuBERT (fairseq hubert_base.pt or a transformers folder)
# -----------------------------------------------------------------------------

# [section: HuBERT loading]

# -----------------------------------------------------------------------------
# 5c. RMVPE (rmvpe.pt)
# -----------------------------------------------------------------------------

# [section: RMVPE loading]

# =============================================================================
# 6. Networks
# =============================================================================

# -----------------------------------------------------------------------------
# 6a. HuBERT content encoder (§3)
# -----------------------------------------------------------------------------

# [section: HuBERT network]

# -----------------------------------------------------------------------------
# 6b. RVC synthesizer: text encoder, flow, NSF-HiFiGAN decoder (§2)
# -----------------------------------------------------------------------------

# [section: synthesizer network]

# -----------------------------------------------------------------------------
# 6c. RMVPE pitch network (§4.5)
# -----------------------------------------------------------------------------

# [section: RMVPE network]

# =============================================================================
# 7. Pitch
# =============================================================================

# [section: pitch]

# =============================================================================
# 8. Retrieval
# =============================================================================

# [section: retrieval]

# =============================================================================
# 9. Pipeline
# =============================================================================

# [section: pipeline]


if __name__ == "__main__":
    sys.exit(main())
