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

# A voice model file (§1) is a dict: `weight` (the synthesizer's state dict without the
# training-only posterior encoder enc_q, usually fp16, weight norm as weight_g/weight_v
# pairs), `config` (18 constructor arguments), `info`, `sr`, `f0`, `version`, plus extra
# keys from forks such as Applio. The architecture is read from the tensors themselves
# (phone dim, pitch embedding, speaker table); `version`/`f0` only get a warning when they
# disagree. Training checkpoints (G_*.pth) are refused rather than extracted on the fly:
# they carry no config, and guessing the upsample rates from shapes would be fragile.

PHONE_DIM_VERSIONS = {256: "v1", 768: "v2"}  # content feature size -> model version
SUPPORTED_VOCODER = "HiFi-GAN"  # Applio's name for RVC's own (NSF-)HiFi-GAN decoder
# Tensor-name prefixes of Applio's other decoders, which this file does not implement.
FOREIGN_DECODER_PREFIXES = {
    "MRF HiFi-GAN": ("dec.upsamples.", "dec.mrfs."),
    "RefineGAN": ("dec.downsample_blocks.", "dec.upsample_blocks.", "dec.pre_conv.", "dec.mel_conv."),
}
# Extra keys Applio writes (§1.2); reported as metadata when present.
APPLIO_METADATA_KEYS = ("epoch", "step", "creation_date", "model_hash", "dataset_length", "model_name",
                        "author", "embedder_model", "speakers_id", "vocoder")
CONTENTVEC_EMBEDDERS = (None, "contentvec")  # what hubert_base.pt is


@dataclass
class VoiceModel:
    """A loaded RVC voice model: the synthesizer (fp32, eval mode) and facts about it."""

    path: Path
    net: Synthesizer
    version: str  # "v1" (256-d content features) or "v2" (768-d)
    sample_rate: int  # Hz of the synthesized audio
    has_f0: bool  # pitch model (NSF decoder) or not
    n_speakers: int
    phone_dim: int
    info: str
    metadata: dict = field(default_factory=dict)  # JSON-serialisable facts for --info

    @property
    def hop(self) -> int:
        """Output samples per 10 ms content frame."""
        return self.net.hop


def load_voice_model(path: Path) -> VoiceModel:
    """Load and validate an RVC voice model (.pth); ModelFileError says what is wrong with it."""
    path = Path(path)
    ckpt = _read_voice_checkpoint(path)
    weight = ckpt["weight"]
    _refuse_foreign_decoder(ckpt, weight, path)
    try:
        cfg = SynthConfig.from_list(ckpt.get("config"))
    except ValueError as exc:
        raise ModelFileError(f"bad 'config' in voice model: {exc}", path) from exc

    phone_dim = _matrix(weight, "enc_p.emb_phone.weight", path).shape[1]
    if phone_dim not in PHONE_DIM_VERSIONS:
        raise ModelFileError(f"unsupported content feature size {phone_dim} (enc_p.emb_phone.weight): "
                             "expected 256 (v1) or 768 (v2)", path)
    version = PHONE_DIM_VERSIONS[phone_dim]
    has_f0 = "enc_p.emb_pitch.weight" in weight
    n_speakers = _matrix(weight, "emb_g.weight", path).shape[0]  # config[15] is stale: upstream rule
    _warn_on_disagreement(ckpt, version, has_f0, path)

    try:
        state = fold_weight_norm(weight)
    except KeyError as exc:
        raise ModelFileError(f"missing tensor {exc.args[0]!r} (other half of a weight-norm pair)", path) from exc
    # Build the net uninitialised (meta tensors) and adopt the file's weights as fp32: for a
    # full-size model that is one conversion pass instead of a random init plus a copy.
    with torch.device("meta"):
        net = Synthesizer(cfg, phone_dim, has_f0, n_speakers)
    check_state_dict(net, state, path, ignore=[k for k in state if k.startswith("enc_q.")])
    state = {key: state[key].float() for key in net.state_dict()}
    for key, value in state.items():
        if not _all_finite(value):
            raise ModelFileError(f"tensor {key!r} has non-finite values (NaN or infinity)", path)
    net.load_state_dict(state, assign=True)
    net.eval()

    info = ckpt.get("info")
    info = "" if info is None else str(info)
    metadata = {
        "version": version, "sample_rate": cfg.sample_rate, "sr": _json_safe(ckpt.get("sr")),
        "f0": has_f0, "speakers": n_speakers, "phone_dim": phone_dim, "hop": cfg.hop,
        "upsample_rates": list(cfg.upsample_rates), "info": info,
        "parameters": sum(p.numel() for p in net.parameters()), "tensors": len(weight),
        "weights_dtype": ",".join(sorted({str(v.dtype).removeprefix("torch.") for v in weight.values()})),
    }
    metadata.update({key: _json_safe(ckpt[key]) for key in APPLIO_METADATA_KEYS if key in ckpt})
    return VoiceModel(path, net, version, cfg.sample_rate, has_f0, n_speakers, phone_dim, info, metadata)


def _read_voice_checkpoint(path: Path) -> Mapping[str, Any]:
    """The file's dict, once it is known to hold a voice model's `weight` dict of tensors."""
    try:
        ckpt = load_torch_file(path)
    except ModelFileError as exc:
        if exc.message.startswith("unsafe") and _is_fairseq_checkpoint(path):
            raise ModelFileError("not a voice model: this is a fairseq checkpoint "
                                 "(a HuBERT/ContentVec content encoder such as hubert_base.pt?)", path) from exc
        # torch words a global from a blocked module (os.system is posix.system) differently
        # ("Trying to load unsupported GLOBAL posix.system whose module posix is blocked"),
        # and load_torch_file then reports a mere unreadable file: say what it is.
        if "unsupported global" in str(exc.__cause__).lower():
            raise ModelFileError("unsafe file: it references Python code or objects that are not weights; "
                                 "refusing to load it", path) from exc
        raise
    if not isinstance(ckpt, Mapping):
        raise ModelFileError(f"not a voice model: the file holds a {type(ckpt).__name__}, not a dict", path)
    if "weight" not in ckpt:
        model = ckpt.get("model")
        keys = [str(k) for k in (model if isinstance(model, Mapping) else ckpt)]
        if any(k.startswith("discriminators.") for k in keys):
            raise ModelFileError("discriminator checkpoint (D_*.pth), not a voice model", path)
        if any(k.startswith(("enc_p.", "flow.", "dec.")) for k in keys):
            raise ModelFileError("this is a training checkpoint (G_*.pth), not a voice model; extract a "
                                 "small model first (WebUI: ckpt processing -> extract)", path)
        raise ModelFileError(f"not a voice model: it has no 'weight' state dict{_guess_contents(keys)}", path)
    weight = ckpt["weight"]
    if not isinstance(weight, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weight.items()):
        raise ModelFileError("not a voice model: 'weight' is not a dict of named tensors", path)
    return ckpt


def _is_fairseq_checkpoint(path: Path) -> bool:
    try:
        return any(name.startswith("fairseq.") for name in _pickled_globals(path))
    except ModelFileError:
        return False


def _guess_contents(keys: Sequence[str]) -> str:
    """A hint at what a non-voice-model file is, from its (state-dict) keys."""
    if any(k.startswith(("unet.", "cnn.", "fc.")) for k in keys):
        return " (it looks like an RMVPE pitch model)"
    if any("feature_extractor" in k or "encoder.layers." in k for k in keys):
        return " (it looks like a HuBERT content encoder)"
    shown = ", ".join(repr(k) for k in sorted(keys)[:5])
    return f" (its keys: {shown}{', ...' if len(keys) > 5 else ''})" if keys else " (it is empty)"


def _refuse_foreign_decoder(ckpt: Mapping[str, Any], weight: Mapping[str, torch.Tensor], path: Path) -> None:
    """Applio's MRF HiFi-GAN and RefineGAN decoders: by the `vocoder` key or by their tensors."""
    vocoder = ckpt.get("vocoder")
    if vocoder not in (None, SUPPORTED_VOCODER):
        raise ModelFileError(f"unsupported vocoder {vocoder!r} (an Applio decoder); only RVC's "
                             f"{SUPPORTED_VOCODER}/NSF decoder is implemented", path)
    for name, prefixes in FOREIGN_DECODER_PREFIXES.items():
        if any(key.startswith(prefixes) for key in weight):
            raise ModelFileError(f"unsupported vocoder: its decoder tensors are those of Applio's {name}; "
                                 f"only RVC's {SUPPORTED_VOCODER}/NSF decoder is implemented", path)
    source = weight.get("dec.m_source.l_linear.weight")
    if source is not None and source.shape[-1] != 1:
        raise ModelFileError(f"unsupported vocoder: its sine source has {source.shape[-1]} harmonics "
                             "(Applio's MRF HiFi-GAN?); only RVC's single-sine NSF decoder is implemented", path)


def _matrix(weight: Mapping[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in weight:
        raise ModelFileError(f"missing tensor {key!r}", path)
    if weight[key].dim() != 2:
        raise ModelFileError(f"tensor {key!r} has shape {list(weight[key].shape)}, expected a matrix", path)
    return weight[key]


def _warn_on_disagreement(ckpt: Mapping[str, Any], version: str, has_f0: bool, path: Path) -> None:
    """The weights decide; a contradicting `version`/`f0` key is worth a warning, and so is an
    embedder other than ContentVec (the content encoder must match the one used in training)."""
    declared = ckpt.get("version")
    if declared is not None and declared != version:
        warn(f"{path.name}: the file says version {declared!r}, but its weights take "
             f"{'256' if version == 'v1' else '768'}-d content features; using {version}")
    f0 = ckpt.get("f0")
    if f0 is not None and (str(f0).lower() in ("1", "true")) != has_f0:  # 1/0 (WebUI), True/False (Applio)
        warn(f"{path.name}: the file says f0={f0!r}, but its weights are those of a model "
             f"{'with' if has_f0 else 'without'} pitch; using them as such")
    embedder = ckpt.get("embedder_model")
    if embedder not in CONTENTVEC_EMBEDDERS:
        warn(f"{path.name}: this model was trained with the {embedder!r} content encoder; "
             "it needs that encoder's HuBERT weights, ContentVec (hubert_base.pt) will sound poor")


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity. A finite sum proves it without a temporary the size of the tensor;
    a non-finite sum is confirmed element-wise (it could also be an overflow)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


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

# The synthesizer is VITS's inference half as RVC uses it: a text encoder turns content
# features (+ coarse pitch) into a Gaussian prior over a latent z; a normalising flow run
# backwards maps a sample of that prior to the decoder's latent; an NSF-HiFiGAN decoder,
# driven by a sine excitation at the target pitch, turns the latent into a waveform.
# Module and attribute names reproduce the WebUI's, so its state-dict keys load as they are
# (after fold_weight_norm has turned every weight_g/weight_v pair into a plain `weight`).
#
# Masks: upstream multiplies by a sequence mask x_mask everywhere. We run batch 1 with the
# whole sequence valid, so x_mask is all ones: multiplying by it is the identity and the
# attention's masked_fill touches no element. Dropping the masks is therefore exact.

LRELU_SLOPE = 0.1  # leaky ReLU slope everywhere except before the decoder's last conv
FINAL_LRELU_SLOPE = 0.01  # upstream calls leaky_relu() with torch's default slope there
ATTENTION_WINDOW = 10  # relative-position window of the text encoder's attention
LAYER_NORM_EPS = 1e-5
PRIOR_NOISE_SCALE = 0.66666  # scale of the prior sample's noise; upstream's literal constant
FLOW_COUPLINGS = 4  # coupling layers in the flow (each followed by a channel flip)
FLOW_KERNEL_SIZE = 5  # WaveNet kernel inside each coupling layer
FLOW_DILATION_RATE = 1  # WaveNet layer i uses dilation FLOW_DILATION_RATE**i
FLOW_WN_LAYERS = 3  # WaveNet layers inside each coupling layer
DECODER_CONV_KERNEL = 7  # kernel of the decoder's conv_pre and conv_post
SINE_AMP = 0.1  # amplitude of the NSF sine excitation
NOISE_STD = 0.003  # std of the excitation's additive noise in voiced samples
UNVOICED_NOISE_STD = SINE_AMP / 3  # std of the excitation noise in unvoiced samples
SAMPLE_RATE_NAMES = {"32k": 32000, "40k": 40000, "48k": 48000}
FRAMES_PER_SECOND = 100  # synthesizer frames: 10 ms, so hop = sample_rate / 100


@dataclass(frozen=True)
class SynthConfig:
    """The hyper-parameters of the 18-element `config` list that matter at inference (§1.3)."""

    inter_channels: int  # latent z channels
    hidden_channels: int  # text encoder width, flow WaveNet width
    filter_channels: int  # text encoder FFN inner width
    n_heads: int
    n_layers: int  # text encoder layers
    kernel_size: int  # text encoder FFN kernel
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    upsample_rates: tuple[int, ...]
    upsample_initial_channel: int
    upsample_kernel_sizes: tuple[int, ...]
    gin_channels: int  # speaker embedding size
    sample_rate: int  # Hz

    @property
    def hop(self) -> int:
        """Output samples per content frame."""
        return math.prod(self.upsample_rates)

    @classmethod
    def from_list(cls, config: Any) -> "SynthConfig":
        """Validate the WebUI config list; ValueError says what is wrong."""
        if not isinstance(config, (list, tuple)) or len(config) != 18:
            raise ValueError(f"expected a list of 18 hyper-parameters, got {_short_repr(config)}")
        (_spec_channels, _segment_size, inter, hidden, filt, heads, layers, kernel, _p_dropout,
         resblock, rb_kernels, rb_dilations, rates, initial, up_kernels, _spk_embed_dim, gin,
         sample_rate) = config
        if str(resblock) != "1":
            raise ValueError(f"resblock type {resblock!r} is not supported (only \"1\")")
        if isinstance(sample_rate, str):
            if sample_rate not in SAMPLE_RATE_NAMES:
                raise ValueError(f"unknown sample rate {sample_rate!r}")
            sample_rate = SAMPLE_RATE_NAMES[sample_rate]
        rb_kernels, rates, up_kernels = (_int_list(v, name) for v, name in (
            (rb_kernels, "resblock_kernel_sizes"), (rates, "upsample_rates"),
            (up_kernels, "upsample_kernel_sizes")))
        if not isinstance(rb_dilations, (list, tuple)):
            raise ValueError(f"resblock_dilation_sizes must be a list of lists, got {_short_repr(rb_dilations)}")
        rb_dilations = tuple(_int_list(d, "resblock_dilation_sizes") for d in rb_dilations)
        cfg = cls(_positive_int(inter, "inter_channels"), _positive_int(hidden, "hidden_channels"),
                  _positive_int(filt, "filter_channels"), _positive_int(heads, "n_heads"),
                  _positive_int(layers, "n_layers"), _positive_int(kernel, "kernel_size"),
                  rb_kernels, rb_dilations, rates, _positive_int(initial, "upsample_initial_channel"),
                  up_kernels, _positive_int(gin, "gin_channels"), _positive_int(sample_rate, "sample_rate"))
        cfg._check_consistent()
        return cfg

    def _check_consistent(self) -> None:
        if self.inter_channels % 2:
            raise ValueError(f"inter_channels must be even (the flow splits it in halves), got {self.inter_channels}")
        if self.hidden_channels % self.n_heads:
            raise ValueError(f"hidden_channels {self.hidden_channels} is not divisible by n_heads {self.n_heads}")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if self.upsample_initial_channel >> len(self.upsample_rates) < 1:
            raise ValueError(f"upsample_initial_channel {self.upsample_initial_channel} is too small "
                             f"to halve {len(self.upsample_rates)} times")
        for i, (rate, kernel) in enumerate(zip(self.upsample_rates, self.upsample_kernel_sizes)):
            padding, output_padding = upsample_padding(rate, kernel)
            exact = kernel - 2 * padding + output_padding == rate and output_padding < rate
            if not exact:
                raise ValueError(f"upsample stage {i} (rate {rate}, kernel {kernel}) does not upsample "
                                 f"exactly x{rate}; unsupported geometry")
        if self.hop * FRAMES_PER_SECOND != self.sample_rate:
            raise ValueError(f"upsample rates {list(self.upsample_rates)} give {self.hop} samples per "
                             f"10 ms frame, but the sample rate is {self.sample_rate} Hz")


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {_short_repr(value)}")
    return value


def _int_list(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {_short_repr(value)}")
    return tuple(_positive_int(v, name) for v in value)


def upsample_padding(rate: int, kernel: int) -> tuple[int, int]:
    """(padding, output_padding) of a decoder ConvTranspose1d stage.

    Even rates use the WebUI rule (k - u) // 2. Odd rates use the rule of Applio's NSF
    decoder (padding u // 2 + 1, output_padding 1), exact when k = 2u, where the WebUI rule
    gives one sample too many (Applio's no-pitch decoder keeps that; we use the exact rule
    for both). SynthConfig refuses any stage that is not exactly xu.
    """
    if rate % 2 == 0:
        return (kernel - rate) // 2, 0
    return rate // 2 + 1, 1


def noise_conv_geometry(stride: int) -> tuple[int, int]:
    """(kernel, padding) of the conv that brings the excitation down to a stage's rate.

    The WebUI uses kernel 2s, padding s//2 (exact for even s); Applio's 2s - s%2 and
    (kernel - s)//2 is the same for even s and also exact for odd s.
    """
    if stride == 1:
        return 1, 0
    kernel = 2 * stride - stride % 2
    return kernel, (kernel - stride) // 2


def zero_embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table that starts at zero.

    Weights always come from a file, so initial values are placeholders; zeros (unlike
    nn.Embedding's random normal init) are also free to create on the meta device, where
    the loader builds the net (a meta normal_() would import torch._dynamo: seconds).
    """
    return nn.Embedding.from_pretrained(torch.zeros(num, dim), freeze=False)


# --- text encoder (§2.2) ------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, T) tensor (parameters gamma/beta)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        x = F.layer_norm(x.transpose(1, -1), self.gamma.shape, self.gamma, self.beta, LAYER_NORM_EPS)
        return x.transpose(1, -1)


def relative_to_absolute(rel: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, T, 2W+1) values indexed by distance j - i + W  ->  (B, H, T, T) indexed by j.

    out[..., i, j] = rel[..., i, j - i + W] when |j - i| <= W, else 0. Row i has to move i
    places right: lay the rows out with stride T + 2W + 1 and read them back with a stride
    one shorter (every row then starts one element earlier than the previous one did).
    """
    b, h, t, r = rel.shape
    stride = t + r
    flat = F.pad(rel, (0, stride - r)).reshape(b, h, t * stride)
    skewed = flat[..., : t * (stride - 1)].reshape(b, h, t, stride - 1)
    return skewed[..., window: window + t]


def absolute_to_relative(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, T, T) indexed by j  ->  (B, H, T, 2W+1) indexed by j - i + W (inverse skew).

    out[..., i, r] = x[..., i, i + r - W], zero where that column does not exist.
    """
    b, h, t, _ = x.shape
    stride = t + 2 * window
    flat = F.pad(x, (window, window)).reshape(b, h, t * stride)
    skewed = F.pad(flat, (0, t)).reshape(b, h, t, stride + 1)
    return skewed[..., : 2 * window + 1]


class MultiHeadAttention(nn.Module):
    """Self-attention with learned relative-position keys and values (window ±W, shared by heads)."""

    def __init__(self, channels: int, n_heads: int, window: int = ATTENTION_WINDOW):
        super().__init__()
        self.n_heads, self.head_dim, self.window = n_heads, channels // n_heads, window
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        # (1, 2W+1, D) embeddings of the relative distances -W..W
        self.emb_rel_k = nn.Parameter(torch.zeros(1, 2 * window + 1, self.head_dim))
        self.emb_rel_v = nn.Parameter(torch.zeros(1, 2 * window + 1, self.head_dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, H, T, D)
        b, _, t = x.shape
        return x.view(b, self.n_heads, self.head_dim, t).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        b, c, t = x.shape
        q = self._heads(self.conv_q(x)) / math.sqrt(self.head_dim)  # (B, H, T, D), pre-scaled
        k, v = self._heads(self.conv_k(x)), self._heads(self.conv_v(x))
        scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
        scores = scores + relative_to_absolute(q @ self.emb_rel_k.transpose(-2, -1), self.window)
        p = F.softmax(scores, dim=-1)  # (B, H, T, T)
        out = p @ v + absolute_to_relative(p, self.window) @ self.emb_rel_v  # (B, H, T, D)
        return self.conv_o(out.transpose(2, 3).reshape(b, c, t))


class FFN(nn.Module):
    """Two 'same'-padded convolutions with a ReLU between them."""

    def __init__(self, channels: int, filter_channels: int, kernel_size: int):
        super().__init__()
        self.pad = ((kernel_size - 1) // 2, kernel_size // 2)
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        x = torch.relu(self.conv_1(F.pad(x, self.pad)))  # (B, filter, T)
        return self.conv_2(F.pad(x, self.pad))


class Encoder(nn.Module):
    """Post-LN transformer: x = LN(x + attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, channels: int, filter_channels: int, n_heads: int, n_layers: int, kernel_size: int):
        super().__init__()
        self.attn_layers = nn.ModuleList(MultiHeadAttention(channels, n_heads) for _ in range(n_layers))
        self.norm_layers_1 = nn.ModuleList(LayerNorm(channels) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(FFN(channels, filter_channels, kernel_size) for _ in range(n_layers))
        self.norm_layers_2 = nn.ModuleList(LayerNorm(channels) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        for attn, norm_1, ffn, norm_2 in zip(self.attn_layers, self.norm_layers_1,
                                             self.ffn_layers, self.norm_layers_2):
            x = norm_1(x + attn(x))
            x = norm_2(x + ffn(x))
        return x


class TextEncoder(nn.Module):
    """Content features (+ coarse pitch) -> prior mean m_p and log-std logs_p of z."""

    def __init__(self, cfg: SynthConfig, phone_dim: int, has_f0: bool):
        super().__init__()
        self.hidden = cfg.hidden_channels
        self.emb_phone = nn.Linear(phone_dim, cfg.hidden_channels)
        self.emb_pitch = zero_embedding(F0_COARSE_BINS, cfg.hidden_channels) if has_f0 else None
        self.encoder = Encoder(cfg.hidden_channels, cfg.filter_channels, cfg.n_heads, cfg.n_layers,
                               cfg.kernel_size)
        self.proj = nn.Conv1d(cfg.hidden_channels, 2 * cfg.inter_channels, 1)

    def forward(self, phone: torch.Tensor, pitch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.emb_phone(phone)  # (B, T, hidden)
        if self.emb_pitch is not None:
            x = x + self.emb_pitch(pitch)
        x = F.leaky_relu(x * math.sqrt(self.hidden), LRELU_SLOPE)
        x = self.encoder(x.transpose(1, 2))  # (B, hidden, T)
        m_p, logs_p = self.proj(x).chunk(2, dim=1)  # (B, inter, T) each
        return m_p, logs_p


# --- flow (§2.3) ---------------------------------------------------------------


class WN(nn.Module):
    """WaveNet stack: gated dilated convs conditioned on the speaker, summed skip outputs."""

    def __init__(self, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int):
        super().__init__()
        self.hidden = hidden
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = dilation_rate ** i
            self.in_layers.append(nn.Conv1d(hidden, 2 * hidden, kernel_size, dilation=dilation,
                                            padding=dilation * (kernel_size - 1) // 2))
            last = i == n_layers - 1  # the last layer has no residual output, only a skip
            self.res_skip_layers.append(nn.Conv1d(hidden, hidden if last else 2 * hidden, 1))
        self.cond_layer = nn.Conv1d(gin_channels, 2 * hidden * n_layers, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # x (B, H, T), g (B, gin, 1)
        h = self.hidden
        cond = self.cond_layer(g)  # (B, 2H*layers, 1), broadcast over time
        out = torch.zeros_like(x)
        for i, (in_layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = in_layer(x) + cond[:, 2 * h * i: 2 * h * (i + 1)]  # (B, 2H, T)
            acts = torch.tanh(a[:, :h]) * torch.sigmoid(a[:, h:])
            rs = res_skip(acts)
            if i < len(self.in_layers) - 1:
                x = x + rs[:, :h]
                out = out + rs[:, h:]
            else:
                out = out + rs
        return out  # (B, H, T)


class ResidualCouplingLayer(nn.Module):
    """Mean-only affine coupling: the second half of the channels is shifted by a function of the first."""

    def __init__(self, channels: int, hidden: int, gin_channels: int):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WN(hidden, FLOW_KERNEL_SIZE, FLOW_DILATION_RATE, FLOW_WN_LAYERS, gin_channels)
        self.post = nn.Conv1d(hidden, self.half, 1)

    def reverse(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        x0, x1 = x.split(self.half, dim=1)  # (B, C/2, T) each
        shift = self.post(self.enc(self.pre(x0), g))  # mean only: the log-scale is 0
        return torch.cat([x0, x1 - shift], dim=1)


class Flip(nn.Module):
    """Reverse the channel order (its own inverse)."""

    def reverse(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, [1])


class ResidualCouplingBlock(nn.Module):
    """[coupling, flip] x FLOW_COUPLINGS; only the reverse (sampling) direction is needed."""

    def __init__(self, cfg: SynthConfig):
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(FLOW_COUPLINGS):
            self.flows.append(ResidualCouplingLayer(cfg.inter_channels, cfg.hidden_channels, cfg.gin_channels))
            self.flows.append(Flip())

    def reverse(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # (B, inter, T)
        for flow in reversed(self.flows):
            x = flow.reverse(x, g)
        return x


# --- NSF-HiFiGAN decoder (§2.4, §2.5) ---------------------------------------------


class ResBlock1(nn.Module):
    """HiFi-GAN residual block: per dilation d, x += conv(lrelu(conv_d(lrelu(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                              padding=d * (kernel_size - 1) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L)
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class SineGen(nn.Module):
    """Sine excitation at F0 (harmonic_num 0), the 2026 WebUI algorithm (§2.5).

    The phase is integrated per frame, interpolated to samples, and its wrap-arounds are
    transferred onto the per-sample increments before the final cumulative sum. Always
    float32: half precision cannot accumulate a phase over thousands of samples.
    (Upstream also adds a random initial phase to every harmonic but the fundamental;
    with harmonic_num 0 there is none, so it is omitted.)
    """

    def __init__(self, sample_rate: int):
        super().__init__()
        self.sample_rate = sample_rate

    def forward(self, f0: torch.Tensor, upp: int, noise: torch.Tensor | None) -> torch.Tensor:
        # f0: (B, T) Hz, 0 = unvoiced; noise: (B, T*upp, 1) standard normal or None
        f0 = f0.float().unsqueeze(-1)  # (B, T, 1)
        rad = (f0 / self.sample_rate) % 1  # phase increment per sample, in cycles
        frame_phase = torch.cumsum(rad, dim=1) * upp  # (B, T, 1) phase at each frame's end
        phase = F.interpolate(frame_phase.transpose(1, 2), scale_factor=float(upp), mode="linear",
                              align_corners=True).transpose(1, 2) % 1  # (B, T*upp, 1)
        rad = torch.repeat_interleave(rad, upp, dim=1)  # (B, T*upp, 1)
        wrapped = (phase[:, 1:] - phase[:, :-1]) < 0  # the interpolated phase wrapped here
        shift = F.pad(-wrapped.to(rad.dtype), (0, 0, 1, 0))  # (B, T*upp, 1)
        sine = torch.sin(torch.cumsum(rad + shift, dim=1) * 2 * math.pi) * SINE_AMP
        uv = torch.repeat_interleave((f0 > 0).to(sine.dtype), upp, dim=1)  # voiced flag per sample
        excitation = sine * uv
        if noise is not None:
            excitation = excitation + (uv * NOISE_STD + (1 - uv) * UNVOICED_NOISE_STD) * noise
        return excitation  # (B, T*upp, 1)


class SourceModuleHnNSF(nn.Module):
    """The sine excitation merged through a 1->1 linear layer and tanh."""

    def __init__(self, sample_rate: int):
        super().__init__()
        self.l_sin_gen = SineGen(sample_rate)
        self.l_linear = nn.Linear(1, 1)

    def forward(self, f0: torch.Tensor, upp: int, noise: torch.Tensor | None) -> torch.Tensor:
        sine = self.l_sin_gen(f0, upp, noise).to(self.l_linear.weight.dtype)  # (B, T*upp, 1)
        return torch.tanh(self.l_linear(sine)).transpose(1, 2)  # (B, 1, T*upp)


class Generator(nn.Module):
    """HiFi-GAN decoder; with `nsf` it is GeneratorNSF, adding a pitch excitation at every stage."""

    def __init__(self, cfg: SynthConfig, nsf: bool):
        super().__init__()
        rates, n_kernels = cfg.upsample_rates, len(cfg.resblock_kernel_sizes)
        channels = [cfg.upsample_initial_channel >> i for i in range(len(rates) + 1)]  # halved per stage
        self.hop, self.n_kernels = cfg.hop, n_kernels
        # (registration order = the WebUI's, so state_dict() lists keys in the same order)
        self.m_source = SourceModuleHnNSF(cfg.sample_rate) if nsf else None
        self.noise_convs = nn.ModuleList() if nsf else None
        for i in range(len(rates) if nsf else 0):
            stride = math.prod(rates[i + 1:])  # excitation samples per sample of stage i
            kernel, padding = noise_conv_geometry(stride)
            self.noise_convs.append(nn.Conv1d(1, channels[i + 1], kernel, stride, padding=padding))
        self.conv_pre = nn.Conv1d(cfg.inter_channels, channels[0], DECODER_CONV_KERNEL,
                                  padding=DECODER_CONV_KERNEL // 2)
        self.ups = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(rates, cfg.upsample_kernel_sizes)):
            padding, output_padding = upsample_padding(rate, kernel)
            self.ups.append(nn.ConvTranspose1d(channels[i], channels[i + 1], kernel, rate,
                                               padding=padding, output_padding=output_padding))
        self.resblocks = nn.ModuleList(
            ResBlock1(channels[i + 1], k, d) for i in range(len(rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(channels[-1], 1, DECODER_CONV_KERNEL, padding=DECODER_CONV_KERNEL // 2,
                                   bias=False)
        self.cond = nn.Conv1d(cfg.gin_channels, channels[0], 1)

    def forward(self, z: torch.Tensor, g: torch.Tensor, f0: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        # z (B, inter, T), g (B, gin, 1), f0 (B, T) Hz for NSF, noise (B, T*hop, 1) or None
        source = self.m_source(f0, self.hop, noise) if self.m_source is not None else None  # (B, 1, T*hop)
        x = self.conv_pre(z) + self.cond(g)  # (B, C0, T)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))  # (B, C_i, T * prod(rates[:i+1]))
            if source is not None:
                x = x + self.noise_convs[i](source)
            blocks = self.resblocks[i * self.n_kernels: (i + 1) * self.n_kernels]
            x = sum(block(x) for block in blocks) / self.n_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x, FINAL_LRELU_SLOPE)))  # (B, 1, T*hop)


# --- the synthesizer (§2.1) --------------------------------------------------------


def standard_normal(shape: Sequence[int], like: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) noise drawn in float32 (on the generator's device), then moved to `like`."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return noise.to(like.device, like.dtype)


class Synthesizer(nn.Module):
    """RVC's SynthesizerTrnMs{256,768}NSFsid[_nono], inference only (no posterior encoder enc_q)."""

    def __init__(self, cfg: SynthConfig, phone_dim: int, has_f0: bool, n_speakers: int):
        super().__init__()
        self.cfg, self.phone_dim, self.has_f0, self.n_speakers = cfg, phone_dim, has_f0, n_speakers
        self.enc_p = TextEncoder(cfg, phone_dim, has_f0)
        self.dec = Generator(cfg, nsf=has_f0)
        self.flow = ResidualCouplingBlock(cfg)
        self.emb_g = zero_embedding(n_speakers, cfg.gin_channels)

    @property
    def hop(self) -> int:
        return self.cfg.hop

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    def _check_inputs(self, phone: torch.Tensor, pitch: torch.Tensor | None, nsff0: torch.Tensor | None,
                      sid: torch.Tensor) -> None:
        if phone.dim() != 3 or phone.shape[0] != 1 or phone.shape[2] != self.phone_dim:
            raise ValueError(f"phone must be (1, T, {self.phone_dim}), got {tuple(phone.shape)}")
        frames = (1, phone.shape[1])
        if self.has_f0:
            if pitch is None or nsff0 is None or tuple(pitch.shape) != frames or tuple(nsff0.shape) != frames:
                raise ValueError(f"a pitch model needs pitch and nsff0 of shape {frames}")
            if pitch.numel() and not 0 <= int(pitch.min()) <= int(pitch.max()) < F0_COARSE_BINS:
                raise ValueError(f"coarse pitch must lie in 0..{F0_COARSE_BINS - 1}")
        if sid.numel() != 1:
            raise ValueError(f"sid must hold one speaker id, got shape {tuple(sid.shape)}")
        speaker = int(sid.reshape(-1)[0])
        if not 0 <= speaker < self.n_speakers:
            raise UsageError(f"speaker id {speaker} out of range: the model has speakers 0..{self.n_speakers - 1}")

    @torch.no_grad()  # (not inference_mode: callers may still modify the returned tensors in place)
    def infer_stages(self, phone: torch.Tensor, pitch: torch.Tensor | None, nsff0: torch.Tensor | None,
                     sid: torch.Tensor, *, noise: bool = True,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """infer(), also returning the intermediate stages m_p, logs_p and z (the decoder input).

        noise=False drops the two random terms (prior noise, excitation noise): deterministic.
        With noise, every random number comes from `generator` when one is given.
        """
        self._check_inputs(phone, pitch, nsff0, sid)
        weight = self.emb_g.weight
        g = self.emb_g(sid.reshape(1).to(weight.device)).unsqueeze(-1)  # (1, gin, 1)
        m_p, logs_p = self.enc_p(phone.to(weight.device, weight.dtype),
                                 pitch.to(weight.device) if self.has_f0 else None)  # (1, inter, T) each
        z_p = m_p  # the prior's mean, or a sample from it:
        if noise:
            z_p = m_p + torch.exp(logs_p) * standard_normal(m_p.shape, m_p, generator) * PRIOR_NOISE_SCALE
        z = self.flow.reverse(z_p, g)  # (1, inter, T)
        if self.has_f0:
            f0 = nsff0.to(weight.device, torch.float32)  # (1, T) Hz
            excitation_noise = None
            if noise:
                excitation_noise = standard_normal((1, f0.shape[1] * self.hop, 1), f0, generator)
            out = self.dec(z, g, f0, excitation_noise)
        else:
            out = self.dec(z, g)
        return {"m_p": m_p, "logs_p": logs_p, "z": z, "out": out[:, 0].float()}  # out (1, T*hop)

    def infer(self, phone: torch.Tensor, pitch: torch.Tensor | None, nsff0: torch.Tensor | None,
              sid: torch.Tensor, *, noise: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Content features (1, T, D), coarse pitch (1, T), F0 in Hz (1, T), speaker (1,) -> audio (1, T*hop)."""
        return self.infer_stages(phone, pitch, nsff0, sid, noise=noise, generator=generator)["out"]


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
