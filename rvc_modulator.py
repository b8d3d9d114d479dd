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

# Two layouts hold the same weights (§3.4, §3.5): a fairseq checkpoint file
# (hubert_base.pt: pickled dict with `cfg` and an fp16 `model`) and a transformers folder
# (config.json + model.safetensors or pytorch_model.bin). HubertEncoder uses transformers'
# tensor names; fairseq names are renamed on load, and errors name keys as the file does.

# (fairseq prefix, our prefix); "{}" stands for a layer index.
HUBERT_FAIRSEQ_NAMES = (
    ("feature_extractor.conv_layers.{}.0.", "feature_extractor.conv_layers.{}.conv."),
    ("feature_extractor.conv_layers.0.2.", "feature_extractor.conv_layers.0.layer_norm."),
    ("layer_norm.", "feature_projection.layer_norm."),
    ("post_extract_proj.", "feature_projection.projection."),
    ("encoder.pos_conv.0.", "encoder.pos_conv_embed.conv."),
    ("encoder.layers.{}.self_attn.", "encoder.layers.{}.attention."),
    ("encoder.layers.{}.self_attn_layer_norm.", "encoder.layers.{}.layer_norm."),
    ("encoder.layers.{}.fc1.", "encoder.layers.{}.feed_forward.intermediate_dense."),
    ("encoder.layers.{}.fc2.", "encoder.layers.{}.feed_forward.output_dense."),
)
# Tensors only pre-training uses: fairseq's mask embedding, label embeddings and target
# GLU, transformers' SpecAugment embedding.
HUBERT_UNUSED_KEYS = re.compile(r"mask_emb|label_embs_concat|masked_spec_embed|target_glu\..*")
HUBERT_POS_CONV = "encoder.pos_conv_embed.conv"
HUBERT_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
MAX_CONV_LAYERS = 64  # hubert_base has 7; the bound keeps "[(1, 1, 1)] * 10**9" harmless
MAX_CONV_SPEC_CHARS = 1000

# Configuration values other than these select architectures not implemented here:
# (key, value when absent, the supported value, what another value means).
HUBERT_FAIRSEQ_REQUIRED = (
    ("extractor_mode", "default", "default", "a layer-norm feature extractor"),
    ("layer_norm_first", False, False, "a pre-LN transformer"),
    ("conv_bias", False, False, "convolution biases in the feature extractor"),
    ("activation_fn", "gelu", "gelu", "another activation"),
    ("layer_type", "transformer", "transformer", "conformer layers"),
    ("pos_conv_depth", 1, 1, "a multi-layer positional convolution"),
)
HUBERT_TRANSFORMERS_REQUIRED = (
    ("model_type", "hubert", "hubert", "not a HuBERT model"),
    ("feat_extract_norm", "group", "group", "a layer-norm feature extractor"),
    ("do_stable_layer_norm", False, False, "a pre-LN transformer"),
    ("conv_bias", False, False, "convolution biases in the feature extractor"),
    ("feat_extract_activation", "gelu", "gelu", "another activation"),
    ("hidden_act", "gelu", "gelu", "another activation"),
    ("feat_proj_layer_norm", True, True, "no layer norm before the feature projection"),
    ("conv_pos_batch_norm", False, False, "a batch-normed positional convolution"),
)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_SAFETENSORS_HEADER = 100 * 2**20  # bytes; the format's own limit


def load_hubert(path: Path) -> HubertEncoder:
    """The HuBERT encoder in a fairseq checkpoint file or a transformers folder (fp32, eval)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError("HuBERT model not found", path)
    fairseq = not path.is_dir()
    if fairseq:
        config, state = _read_hubert_fairseq(path)
        state = {_rename_prefix(key, HUBERT_FAIRSEQ_NAMES, to_ours=True): value for key, value in state.items()}
        weights_path = path
    else:
        config, state, weights_path = _read_hubert_folder(path)

    def file_name(key: str) -> str:  # our tensor name as the file spells it
        return _rename_prefix(key, HUBERT_FAIRSEQ_NAMES, to_ours=False) if fairseq else key

    state = _fold_pos_conv(state, config, weights_path, file_name)
    # Built without storage and then handed the file's tensors: random initialisation of
    # hubert_base would cost about a second, and every tensor is replaced anyway.
    with torch.device("meta"):
        model = HubertEncoder(config)
    try:
        check_state_dict(model, state, weights_path, ignore=[k for k in state if HUBERT_UNUSED_KEYS.fullmatch(k)])
    except ModelFileError as exc:  # check_state_dict quotes our key names; quote the file's
        message = re.sub(r"'([^']+)'", lambda m: repr(file_name(m[1])), exc.message)
        raise ModelFileError(message, weights_path) from None
    own = model.state_dict()
    model.load_state_dict({k: v.float() for k, v in state.items() if k in own}, strict=True, assign=True)
    return model.eval()


def _rename_prefix(key: str, names: Sequence[tuple[str, str]], to_ours: bool) -> str:
    for theirs, ours in names:
        old, new = (theirs, ours) if to_ours else (ours, theirs)
        pattern = "^" + r"(\d+)".join(re.escape(part) for part in old.split("{}"))
        renamed, count = re.subn(pattern, new.replace("{}", r"\1"), key, count=1)
        if count:
            return renamed
    return key


def _fold_pos_conv(state: dict[str, torch.Tensor], config: HubertConfig, path: Path,
                   file_name: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Fold the positional conv's weight norm (over dim 2: one g per kernel tap) into its
    weight, after checking g and v: a g of another shape would broadcast silently."""
    shapes = (1, 1, config.pos_kernel), (config.hidden, config.hidden // config.pos_groups, config.pos_kernel)
    for suffixes in _WEIGHT_NORM_SUFFIXES:
        for suffix, shape in zip(suffixes, shapes):
            tensor = state.get(HUBERT_POS_CONV + suffix)
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != shape:
                raise ModelFileError(f"tensor {file_name(HUBERT_POS_CONV + suffix)!r} has shape "
                                     f"{list(tensor.shape)}, expected {list(shape)}", path)
    try:
        return fold_weight_norm(state, dim=2)
    except KeyError as exc:  # a g without its v
        raise ModelFileError(f"missing tensor {file_name(exc.args[0])!r}", path) from None
    except (AttributeError, TypeError):  # g or v is not a tensor
        raise ModelFileError(f"{file_name(HUBERT_POS_CONV)!r} weight norm is not made of tensors", path) from None


# --- fairseq checkpoint ------------------------------------------------------

def _read_hubert_fairseq(path: Path) -> tuple[HubertConfig, Mapping[str, torch.Tensor]]:
    """Only `cfg["model"]` (or the old `args`) and `model` are read; fairseq's Dictionary
    and the training state become inert stand-ins that nothing touches."""
    checkpoint = load_torch_file(path, allow_standins=True)
    if not isinstance(checkpoint, Mapping) or not _is_state_dict(checkpoint.get("model")):
        raise ModelFileError("not a fairseq HuBERT checkpoint (no 'model' state dict)", path)
    cfg = checkpoint.get("cfg")
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
        model_cfg = cfg["model"]
    else:  # pre-hydra fairseq: an argparse.Namespace, here a stand-in holding its __dict__
        model_cfg = getattr(checkpoint.get("args"), "_state", None)
        if not isinstance(model_cfg, Mapping):
            raise ModelFileError("fairseq checkpoint without a model configuration (no cfg['model'] or args)", path)
    return hubert_config_from_fairseq(model_cfg, path), checkpoint["model"]


def hubert_config_from_fairseq(cfg: Mapping[str, Any], path: Path) -> HubertConfig:
    """HubertConfig from fairseq's cfg["model"]; absent keys take fairseq's defaults."""
    _require_supported(cfg, HUBERT_FAIRSEQ_REQUIRED, path)
    spec = cfg.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")
    try:
        conv_layers = parse_conv_feature_layers(spec)
    except ValueError as exc:
        raise ModelFileError(f"cannot read conv_feature_layers {str(spec)[:80]!r}: {exc}", path) from None
    hidden = _config_int(cfg, "encoder_embed_dim", 768, path)
    final_dim = _config_int(cfg, "final_dim", 0, path, minimum=0) or hidden  # fairseq: 0 = hidden
    return _checked_config(HubertConfig(
        hidden=hidden,
        layers=_config_int(cfg, "encoder_layers", 12, path),
        heads=_config_int(cfg, "encoder_attention_heads", 12, path),
        ffn=_config_int(cfg, "encoder_ffn_embed_dim", 3072, path),
        conv_layers=conv_layers,
        pos_kernel=_config_int(cfg, "conv_pos", 128, path),
        pos_groups=_config_int(cfg, "conv_pos_groups", 16, path),
        final_dim=final_dim,
    ), path)


def parse_conv_feature_layers(spec: str) -> tuple[tuple[int, int, int], ...]:
    """fairseq's conv_feature_layers, e.g. "[(512,10,5)] + [(512,3,2)] * 4", read without
    eval: list displays of (channels, kernel, stride) int tuples joined by + and * int."""
    if not isinstance(spec, str) or len(spec) > MAX_CONV_SPEC_CHARS:
        raise ValueError("not a short string")
    try:
        tree = ast.parse(spec, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError("not a Python list expression") from None

    def count(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value > 0:
            return node.value
        raise ValueError(f"expected a positive integer, found {ast.unparse(node)[:40]!r}")

    def conv_layer(node: ast.AST) -> tuple[int, int, int]:
        if not isinstance(node, ast.Tuple) or len(node.elts) != 3:
            raise ValueError(f"expected a (channels, kernel, stride) tuple, found {ast.unparse(node)[:40]!r}")
        return tuple(count(element) for element in node.elts)

    def layers(node: ast.AST) -> list[tuple[int, int, int]]:
        if isinstance(node, ast.List):
            result = [conv_layer(element) for element in node.elts]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            result = layers(node.left) + layers(node.right)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            items, times = (node.left, node.right) if isinstance(node.right, ast.Constant) else (node.right, node.left)
            result, times = layers(items), count(times)
            if len(result) * times > MAX_CONV_LAYERS:
                raise ValueError(f"more than {MAX_CONV_LAYERS} conv layers")
            result = result * times
        else:
            raise ValueError(f"unexpected {ast.unparse(node)[:40]!r}")
        if len(result) > MAX_CONV_LAYERS:
            raise ValueError(f"more than {MAX_CONV_LAYERS} conv layers")
        return result

    result = layers(tree)
    if not result:
        raise ValueError("no conv layers")
    return tuple(result)


# --- transformers folder -----------------------------------------------------

def _read_hubert_folder(path: Path) -> tuple[HubertConfig, Mapping[str, torch.Tensor], Path]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelFileError("HuBERT folder has no config.json", path)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"unreadable config.json ({exc})", config_path) from None
    if not isinstance(config, dict):
        raise ModelFileError("config.json is not a JSON object", config_path)
    weights = next((path / name for name in HUBERT_WEIGHTS_FILES if (path / name).is_file()), None)
    if weights is None:
        raise ModelFileError(f"HuBERT folder has no weights ({' or '.join(HUBERT_WEIGHTS_FILES)})", path)
    hubert_config = hubert_config_from_transformers(config, config_path)
    state = read_safetensors(weights) if weights.suffix == ".safetensors" else load_torch_file(weights)
    if not _is_state_dict(state):
        raise ModelFileError("not a state dict (a mapping of tensor names)", weights)
    return hubert_config, state, weights


def hubert_config_from_transformers(cfg: Mapping[str, Any], path: Path) -> HubertConfig:
    """HubertConfig from a transformers config.json; absent keys take HubertConfig's defaults."""
    _require_supported(cfg, HUBERT_TRANSFORMERS_REQUIRED, path)
    default = HubertConfig()
    columns = [cfg.get(key, [layer[i] for layer in default.conv_layers])
               for i, key in enumerate(("conv_dim", "conv_kernel", "conv_stride"))]
    if not all(isinstance(c, list) and 0 < len(c) <= MAX_CONV_LAYERS for c in columns) \
            or len({len(c) for c in columns}) != 1:
        raise ModelFileError("conv_dim, conv_kernel and conv_stride must be lists of equal length", path)
    conv_layers = tuple(zip(*columns))
    if not all(type(v) is int and v > 0 for layer in conv_layers for v in layer):
        raise ModelFileError("conv_dim, conv_kernel and conv_stride must hold positive integers", path)
    eps = cfg.get("layer_norm_eps", default.eps)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise ModelFileError(f"invalid layer_norm_eps {eps!r}", path)
    return _checked_config(HubertConfig(
        hidden=_config_int(cfg, "hidden_size", default.hidden, path),
        layers=_config_int(cfg, "num_hidden_layers", default.layers, path),
        heads=_config_int(cfg, "num_attention_heads", default.heads, path),
        ffn=_config_int(cfg, "intermediate_size", default.ffn, path),
        conv_layers=conv_layers,
        pos_kernel=_config_int(cfg, "num_conv_pos_embeddings", default.pos_kernel, path),
        pos_groups=_config_int(cfg, "num_conv_pos_embedding_groups", default.pos_groups, path),
        final_dim=_config_int(cfg, "classifier_proj_size", default.final_dim, path),
        eps=float(eps),
    ), path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file: an 8-byte little-endian header length, a JSON header giving
    each tensor's dtype, shape and byte range, then the raw little-endian data. The file
    is memory-mapped copy-on-write, so tensors are views and nothing is read twice."""
    import mmap  # only this reader maps files

    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ModelFileError("corrupt or truncated safetensors file (no header)", path)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ModelFileError("corrupt or truncated safetensors file (header length past the end)", path)
        try:
            header = json.loads(file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFileError("corrupt safetensors file (header is not JSON)", path) from None
        data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise ModelFileError("corrupt safetensors file (header is not a JSON object)", path)
    start, data_size = 8 + header_len, size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape, (begin, end) = entry["shape"], entry["data_offsets"]
            if not all(type(n) is int and n >= 0 for n in [*shape, begin, end]):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"corrupt safetensors header entry for {name!r} "
                                 f"(dtypes supported: {', '.join(SAFETENSORS_DTYPES)})", path) from None
        numel = math.prod(shape)
        if not (0 <= begin <= end <= data_size and end - begin == numel * dtype.itemsize):
            raise ModelFileError(f"tensor {name!r}: byte range [{begin}, {end}) does not fit its shape "
                                 f"{shape} or the file (truncated?)", path)
        if not numel:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        tensor = torch.frombuffer(data, dtype=dtype, count=numel, offset=start + begin).view(shape)
        # The format does not promise aligned data; kernels may assume it, so copy those.
        tensors[name] = tensor.clone() if (start + begin) % dtype.itemsize else tensor
    return tensors


# --- configuration checks ----------------------------------------------------

def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(key, str) for key in obj)


def _require_supported(cfg: Mapping[str, Any], required: Sequence[tuple[str, Any, Any, str]], path: Path) -> None:
    for key, absent, supported, meaning in required:
        value = cfg.get(key, absent)
        if value != supported:
            raise ModelFileError(f"unsupported HuBERT configuration {key} = {value!r} ({meaning}); "
                                 f"only {supported!r} is implemented", path)


def _config_int(cfg: Mapping[str, Any], key: str, default: int, path: Path, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if type(value) is not int or value < minimum:
        raise ModelFileError(f"invalid HuBERT configuration {key} = {value!r}", path)
    return value


def _checked_config(config: HubertConfig, path: Path) -> HubertConfig:
    if config.hidden % config.heads or config.hidden % config.pos_groups:
        raise ModelFileError(f"HuBERT width {config.hidden} is not divisible by its {config.heads} heads "
                             f"and {config.pos_groups} positional conv groups", path)
    return config

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

# HuBERT-base turns 16 kHz audio into one content vector per 20 ms: a strided conv stack
# (the "feature extractor"), a projection to the model width, a convolutional positional
# embedding, then a post-LN transformer. RVC's hubert_base.pt is this architecture with
# ContentVec weights (§3.1). Module and tensor names follow transformers' HubertModel
# (plus RVC's final_proj); fairseq checkpoints are renamed on load (section 5b).

HUBERT_V1_LAYER = 9  # v1 voice models read final_proj(output of transformer layer 9) (§3.3)


@dataclass(frozen=True)
class HubertConfig:
    """Sizes of a HuBERT encoder; the defaults are hubert_base (= RVC's ContentVec)."""

    hidden: int = 768  # transformer width
    layers: int = 12
    heads: int = 12
    ffn: int = 3072  # feed-forward inner width
    conv_layers: tuple[tuple[int, int, int], ...] = (  # feature extractor (channels, kernel, stride)
        ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2)
    pos_kernel: int = 128  # positional conv kernel (frames)
    pos_groups: int = 16
    final_dim: int = 256  # final_proj output (v1 features)
    eps: float = 1e-5  # layer norm epsilon


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the module dtype: its statistics run over a
    whole segment of audio, too long a sum for fp16 (fairseq's Fp32GroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, so a half-precision model normalises exactly as fp32 does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class HubertConvLayer(nn.Module):
    """One step of the feature extractor: strided Conv1d without bias, GELU. The first
    layer also normalises each channel over time (GroupNorm with one group per channel)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, group_norm: bool):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, bias=False)
        self.layer_norm = Fp32GroupNorm(c_out, c_out) if group_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, N) -> (B, C_out, N')
        x = self.conv(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return F.gelu(x)


class HubertFeatureExtractor(nn.Module):
    """Waveform to frames: hubert_base's stack has total stride 320 (20 ms) and a
    receptive field of 400 samples, so N samples give floor((N - 400) / 320) + 1 frames."""

    def __init__(self, conv_layers: Sequence[tuple[int, int, int]]):
        super().__init__()
        c_in = [1] + [c for c, _, _ in conv_layers[:-1]]
        self.conv_layers = nn.ModuleList(
            HubertConvLayer(c_in[i], c, kernel, stride, group_norm=i == 0)
            for i, (c, kernel, stride) in enumerate(conv_layers))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, C, T)
        x = wave[:, None, :]
        for layer in self.conv_layers:
            x = layer(x)
        return x


class HubertFeatureProjection(nn.Module):
    """LayerNorm over the conv channels, then a linear map to the transformer width."""

    def __init__(self, channels: int, hidden: int, eps: float):
        super().__init__()
        self.layer_norm = Fp32LayerNorm(channels, eps=eps)
        self.projection = nn.Linear(channels, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, H)
        return self.projection(self.layer_norm(x))


class HubertPositionalConv(nn.Module):
    """Relative position enters through a wide grouped convolution over time (no
    positional embeddings, no attention bias). Its weight was trained with weight norm;
    the loader folds g and v into a plain weight."""

    def __init__(self, hidden: int, kernel: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=groups)
        # Padding kernel//2 on both sides yields one extra frame for an even kernel: drop the last.
        self.trim = 1 - kernel % 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        y = self.conv(x.transpose(1, 2))  # (B, H, T + trim)
        y = y[:, :, : y.shape[-1] - self.trim]
        return F.gelu(y).transpose(1, 2)


class HubertAttention(nn.Module):
    """Multi-head self-attention over all frames (RVC's padding mask is all False)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        B, T, H = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, H // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        # Fused attention scales by hs^-0.5 and never holds the (T, T) score matrix when a
        # memory-efficient kernel is available: a 45 s segment has ~2200 frames.
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H))


class HubertFeedForward(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.intermediate_dense = nn.Linear(hidden, ffn)
        self.output_dense = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class HubertLayer(nn.Module):
    """Post-LN transformer layer (BERT order): normalise after each residual add."""

    def __init__(self, config: HubertConfig):
        super().__init__()
        self.attention = HubertAttention(config.hidden, config.heads)
        self.layer_norm = Fp32LayerNorm(config.hidden, eps=config.eps)
        self.feed_forward = HubertFeedForward(config.hidden, config.ffn)
        self.final_layer_norm = Fp32LayerNorm(config.hidden, eps=config.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        x = self.layer_norm(x + self.attention(x))
        return self.final_layer_norm(x + self.feed_forward(x))


class HubertTransformer(nn.Module):
    """Positional conv added to the input, LayerNorm, then the layers. In a post-LN model
    this LayerNorm comes before the first layer and there is none after the last."""

    def __init__(self, config: HubertConfig):
        super().__init__()
        self.pos_conv_embed = HubertPositionalConv(config.hidden, config.pos_kernel, config.pos_groups)
        self.layer_norm = Fp32LayerNorm(config.hidden, eps=config.eps)
        self.layers = nn.ModuleList(HubertLayer(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor, num_layers: int) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        x = self.layer_norm(x + self.pos_conv_embed(x))
        for layer in self.layers[:num_layers]:  # layers past the one we read are never run
            x = layer(x)
        return x


class HubertEncoder(nn.Module):
    """HuBERT content encoder with RVC's final_proj: 16 kHz audio to content features."""

    def __init__(self, config: HubertConfig):
        super().__init__()
        self.config = config
        self.feature_extractor = HubertFeatureExtractor(config.conv_layers)
        self.feature_projection = HubertFeatureProjection(config.conv_layers[-1][0], config.hidden, config.eps)
        self.encoder = HubertTransformer(config)
        self.final_proj = nn.Linear(config.hidden, config.final_dim)

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv stack makes of num_samples samples (0 if too short)."""
        for _, kernel, stride in self.config.conv_layers:
            num_samples = max(0, (num_samples - kernel) // stride + 1)
        return num_samples

    def forward(self, wave: torch.Tensor, num_layers: int) -> torch.Tensor:  # (B, N) -> (B, T, H)
        """The output of transformer layer `num_layers` (1-based; 0 = the input to layer 1),
        i.e. transformers' hidden_states[num_layers], fairseq's output_layer=num_layers."""
        x = self.feature_extractor(wave.to(self.final_proj.weight.dtype))  # (B, C, T)
        x = self.feature_projection(x.transpose(1, 2))  # (B, T, H)
        return self.encoder(x, num_layers)

    @torch.no_grad()
    def extract(self, wave: torch.Tensor, version: str) -> torch.Tensor:
        """RVC's content features of a (1, N) 16 kHz waveform (not normalised, §3.3):
        v1 -> final_proj(layer 9) (1, T, 256); v2 -> the last layer (1, T, 768)."""
        if self.num_frames(wave.shape[-1]) < 1:
            raise InputAudioError(f"audio segment of {wave.shape[-1]} samples is too short for HuBERT")
        if version == "v1":
            if self.config.layers < HUBERT_V1_LAYER:
                raise ModelFileError(f"v1 voice models need HuBERT layer {HUBERT_V1_LAYER}, "
                                     f"but this HuBERT has only {self.config.layers} layers")
            return self.final_proj(self(wave, HUBERT_V1_LAYER))
        if version == "v2":
            return self(wave, self.config.layers)
        raise ValueError(f"unknown RVC model version {version!r} (expected 'v1' or 'v2')")

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
