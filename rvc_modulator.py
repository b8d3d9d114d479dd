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

# rmvpe.pt is a bare state dict of RVC's E2E network. The hyper-parameters are not stored;
# they follow from the tensor shapes and the number of indexed blocks. (The pooling size
# leaves no trace in the weights; every known file uses (2, 2).)
_RMVPE_PROBE = "unet.encoder.bn.weight"  # present in every RMVPE file, in nothing else we load


def _rmvpe_count(state: Mapping[str, Any], pattern: str) -> int:
    """1 + the largest index captured by `pattern` over the keys, 0 when none matches."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for key in state if isinstance(key, str) and (m := rx.match(key))]
    return 1 + max(found) if found else 0


def _rmvpe_shape(state: Mapping[str, Any], key: str, ndim: int, path: Path) -> tuple[int, ...]:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise ModelFileError(f"not an RMVPE model: missing tensor {key!r}", path)
    if value.dim() != ndim:
        raise ModelFileError(f"tensor {key!r} has shape {list(value.shape)}, expected {ndim} dimensions", path)
    return tuple(value.shape)


def rmvpe_config_from_state(state: Mapping[str, Any], path: Path) -> RMVPEConfig:
    """Infer the E2E hyper-parameters from an RMVPE state dict (ModelFileError if it is not one)."""
    if "weight" in state and "config" in state:
        raise ModelFileError("this is an RVC voice model (.pth), not an RMVPE model (rmvpe.pt)", path)
    if _RMVPE_PROBE not in state:
        raise ModelFileError(f"not an RMVPE model: missing tensor {_RMVPE_PROBE!r}", path)
    cfg = RMVPEConfig(
        n_blocks=_rmvpe_count(state, r"unet\.encoder\.layers\.\d+\.conv\.(\d+)\."),
        n_gru=_rmvpe_count(state, r"fc\.0\.gru\.weight_ih_l(\d+)$"),
        en_de_layers=_rmvpe_count(state, r"unet\.encoder\.layers\.(\d+)\."),
        inter_layers=_rmvpe_count(state, r"unet\.intermediate\.layers\.(\d+)\."),
        in_channels=_rmvpe_shape(state, _RMVPE_PROBE, 1, path)[0],
        en_out_channels=_rmvpe_shape(state, "unet.encoder.layers.0.conv.0.conv.0.weight", 4, path)[0],
    )
    # 5 levels of 2×2 pooling take the 128 mel bands to 4 and need the 32-frame padding;
    # deeper nets would need a different padding than the reference's.
    if not 1 <= cfg.en_de_layers <= 5:
        raise ModelFileError(f"unsupported RMVPE model: {cfg.en_de_layers} encoder levels (1 to 5 supported)", path)
    for name in ("n_blocks", "n_gru", "inter_layers"):
        if getattr(cfg, name) < 1:
            raise ModelFileError(f"not an RMVPE model: no {name.replace('_', ' ')} found in the weights", path)
    return cfg


def load_rmvpe(path: Path) -> RMVPE:
    """Load rmvpe.pt (any E2E size) as a float32 RMVPE in eval mode, refusing anything else."""
    path = Path(path)
    state = load_torch_file(path)
    if not isinstance(state, Mapping):
        raise ModelFileError(f"not an RMVPE model: the file holds a {type(state).__name__}, not a state dict", path)
    model = RMVPE(rmvpe_config_from_state(state, path))
    # BatchNorm batch counters are training bookkeeping that some files omit.
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    return load_checked(model, {**counters, **state}, path)


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

# RMVPE (Wei et al. 2023, "RMVPE: A Robust Model for Vocal Pitch Estimation in Polyphonic
# Music") maps a log-mel spectrogram, read as a one-channel (time × mel) image, through a
# residual U-Net and a BiGRU to 360 pitch-bin saliences per 10 ms frame.

# Log-mel front-end, as RVC's MelSpectrogram(is_half, 128, 16000, 1024, 160, None, 30, 8000).
RMVPE_N_FFT = 1024  # samples; also the periodic-Hann window length; frames are centred on t·HOP
RMVPE_N_MELS = 128
RMVPE_FMIN, RMVPE_FMAX = 30.0, 8000.0  # Hz; HTK mel scale, Slaney area normalisation
RMVPE_LOG_FLOOR = 1e-5  # log(max(mel, floor))

# Output bins: 20 cents apart, cents measured above 10 Hz, bin 0 ≈ 31.7 Hz, bin 359 ≈ 2005.5 Hz.
RMVPE_N_BINS = 360
RMVPE_CENTS = 20.0 * np.arange(RMVPE_N_BINS) + 1997.3794084376191  # (360,) float64
RMVPE_DECODE_HALF_WIDTH = 4  # the pitch is the salience-weighted mean of 9 bins around the peak
RMVPE_THRESHOLD = 0.03  # a frame is voiced when its peak salience exceeds this

# The U-Net halves time five times, so the mel is zero-padded to a multiple of 32 frames.
RMVPE_FRAME_MULTIPLE = 32

# Long inputs. The real net's activations take ~0.09 MB per frame: an hour (360,000 frames)
# in one piece would need ~32 GB. Signals longer than RMVPE_MAX_UNCHUNKED_FRAMES run in
# chunks of RMVPE_CHUNK_FRAMES, each with RMVPE_CONTEXT_FRAMES of real signal on both sides
# that is cropped away afterwards (peak ~1 GB). The context covers the receptive field of
# the real U-Net (about ±1590 frames), so in each chunk's core the U-Net output is the
# whole-signal one; only the BiGRU starts 16 s early instead of at the signal's start.
# Chunks and context are multiples of 32 frames so the pooling grid stays aligned.
RMVPE_MAX_UNCHUNKED_FRAMES = 8192  # ~82 s: one piece, exactly as the reference
RMVPE_CHUNK_FRAMES = 8192
RMVPE_CONTEXT_FRAMES = 1600  # 16 s each side


def _hz_to_mel_htk(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz_htk(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def rmvpe_mel_filterbank() -> np.ndarray:
    """Triangular HTK-mel filters with Slaney area normalisation, (128, 513) float32.

    Equals librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=30, fmax=8000,
    htk=True) bit for bit, without importing librosa: the same float64 arithmetic,
    rounded to float32 before the normalisation as librosa does.
    """
    fft_hz = np.fft.rfftfreq(RMVPE_N_FFT, d=1.0 / SAMPLE_RATE)  # (513,)
    edges = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(RMVPE_FMIN), _hz_to_mel_htk(RMVPE_FMAX),
                                       RMVPE_N_MELS + 2))  # (130,) band edges and centres
    width = np.diff(edges)  # (129,)
    ramps = edges[:, None] - fft_hz[None, :]  # (130, 513)
    rising = -ramps[:-2] / width[:-1, None]  # (128, 513)
    falling = ramps[2:] / width[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    area = 2.0 / (edges[2:] - edges[:-2])  # (128,)
    return (weights * area[:, None]).astype(np.float32)


def decode_salience(salience: np.ndarray, threshold: float = RMVPE_THRESHOLD) -> np.ndarray:
    """(T, 360) salience → (T,) f0 in Hz (float64), 0 where the peak salience ≤ threshold.

    The pitch is the salience-weighted mean of the cents of the 9 bins centred on the
    peak (bins beyond either end of the table count as zero), as `f0 = 10·2^(cents/1200)`.
    """
    salience = np.asarray(salience)
    half = RMVPE_DECODE_HALF_WIDTH
    peak = salience.argmax(axis=1)  # (T,)
    padded = np.pad(salience, ((0, 0), (half, half)))  # (T, 368): zero bins beyond the ends
    cents_table = np.pad(RMVPE_CENTS, (half, half))  # (368,)
    window = peak[:, None] + np.arange(2 * half + 1)  # (T, 9) columns of `padded`
    weights = np.take_along_axis(padded, window, axis=1)  # (T, 9)
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero windows are unvoiced anyway
        cents = (weights * cents_table[window]).sum(axis=1) / weights.sum(axis=1)  # (T,)
    voiced = salience.max(axis=1) > threshold
    return np.where(voiced, 10.0 * 2.0 ** (cents / 1200.0), 0.0)


@dataclass(frozen=True)
class RMVPEConfig:
    """E2E hyper-parameters (RVC hard-codes E2E(4, 1, (2, 2)) = these defaults)."""

    n_blocks: int = 4  # residual blocks per encoder level, intermediate layer and decoder level
    n_gru: int = 1  # BiGRU layers
    kernel_size: tuple[int, int] = (2, 2)  # (time, mel) average-pool of each encoder level
    en_de_layers: int = 5  # encoder (and decoder) levels
    inter_layers: int = 4  # intermediate layers at the bottom of the U
    in_channels: int = 1
    en_out_channels: int = 16  # channels of the first encoder level; doubled at each level


def _rmvpe_batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=0.01)


class RMVPEConvBlockRes(nn.Module):
    """Two 3×3 conv → BN → ReLU layers plus a residual (1×1 conv when channels change)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _rmvpe_batch_norm(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _rmvpe_batch_norm(c_out), nn.ReLU(),
        )
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T, F) -> (B, C_out, T, F)
        return self.conv(x) + (x if self.shortcut is None else self.shortcut(x))


def _rmvpe_res_blocks(c_in: int, c_out: int, n_blocks: int) -> nn.ModuleList:
    """n_blocks residual blocks; the first one changes the channel count."""
    return nn.ModuleList([RMVPEConvBlockRes(c_in if i == 0 else c_out, c_out) for i in range(n_blocks)])


class RMVPEResStack(nn.Module):
    """A ResEncoderBlock of the reference without its pooling (the encoder pools)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int):
        super().__init__()
        self.conv = _rmvpe_res_blocks(c_in, c_out, n_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T, F) -> (B, C_out, T, F)
        for block in self.conv:
            x = block(x)
        return x


class RMVPEEncoder(nn.Module):
    """BatchNorm on the input, then levels of residual blocks + average pooling (channels ×2 per level)."""

    def __init__(self, cfg: RMVPEConfig):
        super().__init__()
        self.pool = cfg.kernel_size
        self.bn = _rmvpe_batch_norm(cfg.in_channels)
        widths = [cfg.in_channels] + [cfg.en_out_channels * 2 ** i for i in range(cfg.en_de_layers)]
        self.layers = nn.ModuleList([RMVPEResStack(widths[i], widths[i + 1], cfg.n_blocks)
                                     for i in range(cfg.en_de_layers)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.bn(x)  # (B, 1, T, 128)
        skips = []
        for level in self.layers:
            x = level(x)
            skips.append(x)  # (B, C, T, F) before pooling, for the decoder
            x = F.avg_pool2d(x, self.pool)  # (B, C, T/2, F/2)
        return x, skips


class RMVPEIntermediate(nn.Module):
    """ResStacks at the bottom of the U: channels ×2 in the first, then unchanged."""

    def __init__(self, cfg: RMVPEConfig):
        super().__init__()
        bottom = cfg.en_out_channels * 2 ** cfg.en_de_layers
        self.layers = nn.ModuleList([RMVPEResStack(bottom // 2 if i == 0 else bottom, bottom, cfg.n_blocks)
                                     for i in range(cfg.inter_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T/32, 4) -> (B, 2C, T/32, 4)
        for layer in self.layers:
            x = layer(x)
        return x


class RMVPEDecoderLevel(nn.Module):
    """Transposed-conv upsampling, concatenation with the encoder skip, then residual blocks."""

    def __init__(self, c_in: int, c_out: int, stride: tuple[int, int], n_blocks: int):
        super().__init__()
        # output_padding = stride - 1 restores exactly the size the encoder pooled away.
        self.conv1 = nn.Sequential(
            nn.ConvTranspose2d(c_in, c_out, 3, stride=stride, padding=1,
                               output_padding=(stride[0] - 1, stride[1] - 1), bias=False),
            _rmvpe_batch_norm(c_out), nn.ReLU(),
        )
        self.conv2 = _rmvpe_res_blocks(2 * c_out, c_out, n_blocks)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.conv1(x), skip], dim=1)  # (B, C_in, T, F) -> (B, 2·C_out, 2T, 2F)
        for block in self.conv2:
            x = block(x)
        return x  # (B, C_out, 2T, 2F)


class RMVPEDecoder(nn.Module):
    """Decoder levels, channels ÷2 per level, each joined to the encoder skip of its size."""

    def __init__(self, cfg: RMVPEConfig):
        super().__init__()
        bottom = cfg.en_out_channels * 2 ** cfg.en_de_layers
        self.layers = nn.ModuleList([RMVPEDecoderLevel(bottom >> i, bottom >> (i + 1), cfg.kernel_size, cfg.n_blocks)
                                     for i in range(cfg.en_de_layers)])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for level, skip in zip(self.layers, reversed(skips)):
            x = level(x, skip)
        return x


class RMVPEUNet(nn.Module):
    def __init__(self, cfg: RMVPEConfig):
        super().__init__()
        self.encoder = RMVPEEncoder(cfg)
        self.intermediate = RMVPEIntermediate(cfg)
        self.decoder = RMVPEDecoder(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T, 128) -> (B, en_out, T, 128)
        x, skips = self.encoder(x)
        return self.decoder(self.intermediate(x), skips)


class RMVPEBiGRU(nn.Module):
    def __init__(self, n_in: int, n_hidden: int, n_layers: int):
        super().__init__()
        self.gru = nn.GRU(n_in, n_hidden, num_layers=n_layers, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, n_in) -> (B, T, 2·n_hidden)
        return self.gru(x)[0]


class RMVPE(nn.Module):
    """RVC's E2E pitch network with its log-mel front-end and decoding (§4.5).

    The mel filterbank is a plain attribute, not a buffer: it is not in rmvpe.pt, and it
    must stay float32 when the network is cast to half precision.
    """

    def __init__(self, cfg: RMVPEConfig = RMVPEConfig()):
        super().__init__()
        self.cfg = cfg
        self.unet = RMVPEUNet(cfg)
        self.cnn = nn.Conv2d(cfg.en_out_channels, 3, 3, padding=1)
        # Dropout(0.25) and Sigmoid follow in the reference Sequential (fc.2, fc.3): neither
        # has weights, dropout is the identity at inference, and forward applies the sigmoid.
        self.fc = nn.Sequential(RMVPEBiGRU(3 * RMVPE_N_MELS, 256, cfg.n_gru), nn.Linear(512, RMVPE_N_BINS))
        self.mel_basis = torch.from_numpy(rmvpe_mel_filterbank())  # (128, 513)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 128, T) log-mel, T a multiple of 32 -> (B, T, 360) salience in (0, 1)."""
        x = self.unet(mel.transpose(1, 2).unsqueeze(1))  # (B, en_out, T, 128)
        x = self.cnn(x).transpose(1, 2).flatten(2)  # (B, 3, T, 128) -> (B, T, 384)
        return torch.sigmoid(self.fc(x))

    @torch.inference_mode()
    def mel(self, audio: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Frames [start, stop) of the log-mel of the whole signal `audio` (N,): (128, stop - start).

        Frame t is the periodic-Hann-windowed STFT of samples t·HOP ± 512, the signal being
        reflected at its ends (torch.stft center=True). Taking only the samples a range of
        frames needs gives exactly those frames of the whole-signal spectrogram.
        """
        n = audio.shape[-1]
        if n < 2:
            raise ValueError("RMVPE needs at least 2 samples")
        stop = 1 + n // HOP if stop is None else stop
        # Sample indices of the frames' support, folded back into [0, n) by reflection
        # about the first and last sample (numpy "reflect": the edge is not repeated).
        idx = torch.arange(start * HOP - RMVPE_N_FFT // 2, (stop - 1) * HOP + RMVPE_N_FFT // 2,
                           device=audio.device).remainder(2 * (n - 1))
        samples = audio.float()[torch.where(idx < n, idx, 2 * (n - 1) - idx)]
        spec = torch.stft(samples, RMVPE_N_FFT, HOP, window=torch.hann_window(RMVPE_N_FFT, device=audio.device),
                          center=False, return_complex=True)  # (513, stop - start)
        magnitude = torch.sqrt(spec.real ** 2 + spec.imag ** 2)
        mel = self.mel_basis.to(audio.device) @ magnitude  # (128, stop - start)
        return torch.log(torch.clamp(mel, min=RMVPE_LOG_FLOOR))

    @torch.inference_mode()
    def salience(self, mel: torch.Tensor) -> torch.Tensor:
        """(128, T) float32 log-mel -> (T, 360) float32 salience.

        The mel is zero-padded on the right to a multiple of 32 frames (the reference pads
        with 0, not with the log floor), run in the network's dtype, and cropped back.
        """
        n_frames = mel.shape[-1]
        padded = F.pad(mel, (0, -n_frames % RMVPE_FRAME_MULTIPLE))  # (128, T')
        salience = self(padded.unsqueeze(0).to(self.cnn.weight.dtype))  # (1, T', 360)
        return salience[0, :n_frames].float()

    def f0(self, audio16k: np.ndarray, threshold: float = RMVPE_THRESHOLD, *,
           chunk_frames: int | None = None, context_frames: int = RMVPE_CONTEXT_FRAMES) -> np.ndarray:
        """Pitch of a 16 kHz signal (N,): (1 + N // 160,) float64 Hz, 0 where unvoiced.

        chunk_frames: process this many frames at a time (a multiple of 32), each chunk
        with `context_frames` (a multiple of 32) of signal on both sides; None = in one
        piece up to RMVPE_MAX_UNCHUNKED_FRAMES, else chunks of RMVPE_CHUNK_FRAMES.
        """
        device = self.cnn.weight.device
        audio = torch.from_numpy(np.ascontiguousarray(audio16k, dtype=np.float32)).to(device)
        n_frames = 1 + audio.shape[0] // HOP
        if chunk_frames is None:
            chunk_frames = n_frames if n_frames <= RMVPE_MAX_UNCHUNKED_FRAMES else RMVPE_CHUNK_FRAMES
        if chunk_frames < n_frames and (chunk_frames <= 0 or context_frames < 0 or chunk_frames % RMVPE_FRAME_MULTIPLE
                                        or context_frames % RMVPE_FRAME_MULTIPLE):
            raise ValueError(f"chunk_frames and context_frames must be multiples of {RMVPE_FRAME_MULTIPLE}")
        f0 = []
        for start in range(0, n_frames, chunk_frames):
            stop = min(start + chunk_frames, n_frames)
            lo, hi = max(0, start - context_frames), min(n_frames, stop + context_frames)
            salience = self.salience(self.mel(audio, lo, hi))[start - lo: stop - lo]  # (stop - start, 360)
            f0.append(decode_salience(salience.cpu().numpy(), threshold))
        return np.concatenate(f0)


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
