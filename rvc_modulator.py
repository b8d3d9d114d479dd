#!/usr/bin/env python3
"""rvc_modulator: Retrieval-based Voice Conversion (RVC) from the command line.

    python rvc_modulator.py in.wav out.wav MODEL [--index_name INDEX] [options]

Changes the timbre of the voice in a recording to the voice of an RVC model and keeps
the words and the intonation. Everything neural is implemented here in plain PyTorch and
loads the files users already have: WebUI voice models (`.pth`, v1/v2, 32k/40k/48k, with
or without pitch), `hubert_base.pt` (fairseq format, read without fairseq) or a
transformers-format HuBERT folder, `rmvpe.pt`, and faiss `.index` files.

Sources read for facts (key names, shapes, constants, the order of operations):
  - RVC WebUI, RVC-Project/Retrieval-based-Voice-Conversion-WebUI (main @ 4338f12, and
    the classic 20240604 branch): synthesizer, pipeline, RMVPE, index building.
  - fairseq (facebookresearch/fairseq): HuBERT / wav2vec 2.0 encoder and checkpoint layout.
  - transformers (huggingface/transformers): modeling_hubert.py and its fairseq converter.
  - Applio (IAHispano/Applio): the extra keys and vocoders forks write into `.pth` files.
No code was copied from them. "The reference" below means the WebUI's inference code.

Map of this file, in the order the data flows. Each section uses only what stands above
it (tests/test_structure.py checks that), so it can be read from the top down.
   1. Constants       the 16 kHz sample rate and 10 ms frame grid every stage shares.
   2. Errors          exit codes, the exceptions that carry them, warnings.
   3. Options         the command-line options: names, defaults, ranges, where files are.
                      (They need no torch: --help and --version answer before it loads.)
   4. Audio I/O       decoding any input to 16 kHz mono, scratch files (long inputs go
                      disk to disk), atomic writing of the output.
   5. Weight loading  safe unpickling, safetensors, weight-norm folding, key/shape checks.
   6. HuBERT          the content encoder, then its loader (fairseq file or transformers folder).
   7. RMVPE           the pitch network with its mel front-end and decoding, then its loader.
   8. Synthesizer     text encoder, flow and NSF-HiFiGAN decoder, then the voice model loader.
   9. Pitch           the F0 estimators (rmvpe, harvest, dio, crepe, pm) and coarse pitch.
  10. Retrieval       faiss index loading (and reading an index's header) and feature blending.
  11. Pipeline        conditioning, segmentation, per-segment conversion, post-processing.
  12. Modes           a run and what it owns; convert, check, list models, model info;
                      12b folder batches; 12c the service worker (--serve); 12d the
                      training tools (dataset, index, extraction, merging); 12e the
                      training step; 12f the trainer (--train); 12g the choice of mode.
  13. Command line    the entry point: one run, its exit code and its --json report.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import itertools
import json
import math
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

__version__ = "0.1.0"


# =============================================================================
# 1. Constants
# =============================================================================

SAMPLE_RATE = 16000  # Hz: HuBERT, the F0 estimators and the pipeline all work at 16 kHz
HOP = 160  # samples per frame at 16 kHz (10 ms): pitch, content features and synthesis
FRAMES_PER_SECOND = SAMPLE_RATE // HOP  # 100; the synthesizer makes sample_rate / 100 samples a frame
HUBERT_HOP = 320  # samples per HuBERT frame (20 ms): each feature covers HUBERT_HOP // HOP frames

F0_MIN, F0_MAX = 50.0, 1100.0  # Hz: the pitch range every estimator searches
F0_COARSE_BINS = 256  # the text encoder embeds pitch as one of 256 bins (Pitch section)

# progress(stage, done, total) for long inputs: stage "pitch", "features" or "segment", called with
# done = 0 when the stage starts and after each of its `total` pieces.
Progress = Callable[[str, int, int], None]


# =============================================================================
# 2. Errors and warnings
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
EXIT_PARTIAL = 8  # a folder batch converted some files but not all (each failure is in its report)
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


class UnstableOutput(InferenceError):
    """The network gave non-finite audio, or silence for an input that is not silent: in
    reduced precision worth one more try in fp32, never written as a success."""


class OutputError(RVCError):
    exit_code, kind = EXIT_OUTPUT, "output"


class Interrupted(RVCError):
    exit_code, kind = EXIT_INTERRUPTED, "interrupted"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Code that may warn (the input was clipped, a model file contradicts itself, ...) takes a
# `warn` callable: a run passes its own (Modes section), which also keeps the warning for
# --json; used on its own, the warning goes to stderr only.
Warn = Callable[[str], None]


def print_warning(message: str) -> None:
    """A one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Libraries' own Python warnings (deprecations, ...) stay off stderr, which is an API."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# =============================================================================
# 3. Options
# =============================================================================

F0_METHODS = ("rmvpe", "harvest", "dio", "crepe", "pm")
# Optional estimators: import name and the package a user installs for it.
F0_OPTIONAL_PACKAGES = {"crepe": ("torchcrepe", "torchcrepe"), "pm": ("parselmouth", "praat-parselmouth")}


@dataclass
class ConversionParams:
    """What the user chose; defaults are the WebUI's single-file conversion tab."""

    f0_up_key: int = 0
    f0_method: str = "rmvpe"
    index_rate: float = 0.75
    filter_radius: int = 3
    rms_mix_rate: float = 0.25
    protect: float = 0.33
    resample_sr: int = 0
    speaker_id: int = 0
    noise: bool = True  # False: the synthesizer's random terms are off (as in the fixtures)
    seed: int | None = None
    interp_unvoiced: bool = False
    index_k: int = 8  # stored features blended per feature
    nprobe: int | None = None  # inverted lists searched (None: the index file's own, as the WebUI)


MODELS_DIR_ENV, HUBERT_ENV, RMVPE_ENV = "RVC_MODELS_DIR", "RVC_HUBERT", "RVC_RMVPE"
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent / "models"
VOICE_SUBDIR = "rvc"  # <models_dir>/rvc/MODEL.pth and NAME.index
AUTO_INDEX = "auto"  # --index_name auto: the model's one matching index
HUBERT_FILE, HUBERT_FOLDER, RMVPE_FILE = "hubert_base.pt", "hubert_base", "rmvpe.pt"
# Where users get those two: the RVC WebUI's published assets.
BASE_FILES_URL = "https://huggingface.co/lj1995/VoiceConversionWebUI/resolve/main/"
# Their published releases, size in bytes -> SHA-256, for --check to verify a file of that
# size. Stated by the RVC WebUI's sha256.env (RVC-Project/Retrieval-based-Voice-Conversion-
# WebUI, commit 3856ad5, "sync checksum": hubert_base.pt, rmvpe.pt) and by the Git LFS
# pointers of lj1995/VoiceConversionWebUI (sizes; commit 1c75048 hubert_base.pt, 6368ea1 the
# first rmvpe.pt, replaced on 2023-10-06 by the one sha256.env names).
PUBLISHED_FILES: dict[str, dict[int, str]] = {
    HUBERT_FILE: {189507909: "f54b40fd2802423a5643779c4861af1e9ee9c1564dc9d32f54f20b5ffba7db96"},
    RMVPE_FILE: {181184272: "6d62215f4306e3ca278246188607209f09af3dc77ed4232efdd069798c4ec193",
                 181189687: "a5ed4719f59085d1affc5d81354c70828c740584f2d24e782523345a6a278962"},
}
DEVICES_HELP = "auto|cpu|cuda|cuda:N"
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --precision: torch dtype names
# Output formats, by name (also their file extension): soundfile's format and its subtype
# for each --bit_depth (None: a lossy format, which has none). At 16 bits, WAV and FLAC
# hold the WebUI's int16 samples exactly; 24-bit and float outputs keep the samples before
# that rounding. OGG is Vorbis; MP3 needs libsndfile 1.1.0 or later (checked when used).
OUTPUT_FORMATS: dict[str, tuple[str, dict[str | None, str]]] = {
    "wav": ("WAV", {"16": "PCM_16", "24": "PCM_24", "32f": "FLOAT"}),
    "flac": ("FLAC", {"16": "PCM_16", "24": "PCM_24"}),
    "ogg": ("OGG", {None: "VORBIS"}),
    "mp3": ("MP3", {None: "MPEG_LAYER_III"}),
}
BIT_DEPTHS = ("16", "24", "32f")
DEFAULT_OUTPUT_FORMAT, DEFAULT_BIT_DEPTH = "wav", "16"
# The only sample rates MPEG audio has (MPEG-1, 2 and 2.5; libsndfile's refusal lists the
# same): an MP3 of a 40 kHz model is resampled to the next of them up.
MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
# What a folder batch converts: the extensions of audio files a decoder here reads.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff", ".wma",
                    ".webm", ".caf")

# Option ranges: name -> (type, low, high). Checked with a usage error naming the option.
RANGES: dict[str, tuple[type, float, float]] = {
    "f0_up_key": (int, -48, 48),  # semitones; four octaves either way
    "index_rate": (float, 0.0, 1.0),
    "filter_radius": (int, 0, 7),
    "rms_mix_rate": (float, 0.0, 1.0),
    "protect": (float, 0.0, 0.5),
    "resample_sr": (int, 8000, 192000),  # or 0: keep the model's rate
    "speaker_id": (int, 0, 2**31 - 1),
    "seed": (int, 0, 2**63 - 1),
    "threads": (int, 1, 1024),
    "cache_models": (int, 1, 1024),
    "start": (float, 0.0, 1e7),  # seconds into the input
    "duration": (float, 1e-3, 1e7),  # seconds
    "index_k": (int, 1, 1024),
    "nprobe": (int, 1, 1 << 20),
    "alpha": (float, 0.0, 1.0),
    "epochs": (int, 1, 100_000),
    "batch_size": (int, 1, 1024),
    "save_every": (int, 1, 100_000),
    "log_every": (int, 1, 10**9),
    "keep_checkpoints": (int, 0, 10_000),
}
# The training tools' --sample_rate (the rates of the WebUI's pretrained models) and --model_version.
DATASET_RATES, DEFAULT_DATASET_RATE = (32000, 40000, 48000), 40000
MODEL_VERSIONS = ("v1", "v2")  # 256-d and 768-d content features
DEFAULT_CACHE_MODELS = 4  # --serve: voice models (and as many indexes) kept loaded


def where_to_get(name: str) -> str:
    """A not-found error's hint: the public source of a base file (PUBLISHED_FILES), and its size."""
    size = max(PUBLISHED_FILES[name])
    return f"download {name} ({size / 1e6:.0f} MB) from {BASE_FILES_URL}{name}"


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as a UsageError (one line, our exit code)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _ranged(name: str) -> Callable[[str], Any]:
    kind, low, high = RANGES[name]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if name == "resample_sr" and value == 0:
            return value
        if not (low <= value <= high) or (kind is float and not math.isfinite(value)):
            allowed = f"0 or {low}..{high}" if name == "resample_sr" else f"{low}..{high}"
            raise argparse.ArgumentTypeError(f"must be in {allowed}, got {text}")
        return value

    return parse


def _dataset_rate(text: str) -> int:
    """--sample_rate: 32000, 40000 or 48000, also written 32k, 40k, 48k."""
    rate = text.lower().removesuffix("k") + ("000" if text.lower().endswith("k") else "")
    if not rate.isdigit() or int(rate) not in DATASET_RATES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, DATASET_RATES))}, got {text}")
    return int(rate)


HELP_EXAMPLES = """examples:
  python rvc_modulator.py in.wav out.wav MyVoice --index_name auto --f0_up_key 12
  python rvc_modulator.py in.wav out.wav MyVoice --check      what it would use, and whether all is there
  python rvc_modulator.py --list_models                       the voice models and indexes
  python rvc_modulator.py recordings/ converted/ MyVoice --output_format flac
  python rvc_modulator.py --prepare_dataset recordings/ work/     a training set in the WebUI's layout
  python rvc_modulator.py --build_index work/ MyVoice             models/rvc/MyVoice.index
  python rvc_modulator.py --extract_model logs/me/G_2333.pth MyVoice   a small model from a checkpoint"""


def _range_text(name: str) -> str:
    kind, low, high = RANGES[name]
    return f"{low:g}..{high:g}" if kind is float else f"{low}..{high}"


def build_parser() -> argparse.ArgumentParser:
    exit_codes = ("exit codes: 0 ok, 1 internal error, 2 usage, 3 file not found, 4 invalid model/index file,\n"
                  "  5 invalid input audio, 6 inference failed, 7 output not writable, 8 some files of a folder\n"
                  "  failed, 130 interrupted")
    parser = _Parser(prog="rvc_modulator.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                     usage="%(prog)s INPUT OUTPUT MODEL [options]\n"
                           "       %(prog)s --list_models | --info MODEL | --serve [options]\n"
                           "       %(prog)s --prepare_dataset DATASET_DIR WORK_DIR | --build_index DIR NAME |\n"
                           "           --extract_model CHECKPOINT NAME | --merge_models MODEL_A MODEL_B NAME [options]",
                     description="Convert the voice in a recording to the voice of an RVC model.",
                     epilog=f"{exit_codes}\n\n{HELP_EXAMPLES}")
    defaults = ConversionParams()  # the WebUI's defaults, stated once (above)
    group: Any = parser

    def section(title: str) -> None:  # the options that follow go under this heading
        nonlocal group
        group = parser.add_argument_group(title)

    def option(name: str, **kwargs: Any) -> None:  # --name_with_underscores and --name-with-dashes
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        group.add_argument(*spellings, *kwargs.pop("aliases", ()), dest=name, **kwargs)

    parser.add_argument("input", nargs="?", help="input audio (wav, flac, ogg; mp3/m4a where a decoder is present), "
                                                 "a folder of them, or - for stdin")
    parser.add_argument("output", nargs="?", help="output audio: .wav, .flac, .ogg or .mp3 (see --output_format); "
                                                  "a folder when INPUT is one; - for stdout")
    parser.add_argument("model", nargs="?", help="voice model name: <models_dir>/rvc/MODEL.pth")

    section("conversion")
    option("speaker_id", aliases=["--sid"], type=_ranged("speaker_id"), default=defaults.speaker_id, metavar="N",
           help="speaker of a multi-speaker model (default %(default)s)")
    option("rms_mix_rate", type=_ranged("rms_mix_rate"), default=defaults.rms_mix_rate, metavar="R",
           help=f"{_range_text('rms_mix_rate')}; 0: output loudness follows the input, 1: the model's own "
                f"(default %(default)s)")
    option("protect", type=_ranged("protect"), default=defaults.protect, metavar="P",
           help=f"protect consonants and breaths from retrieval, {_range_text('protect')}; 0.5 turns it off "
                f"(default %(default)s)")
    option("start", type=_ranged("start"), default=0.0, metavar="SECONDS",
           help="convert from this point of the input on (default 0)")
    option("duration", type=_ranged("duration"), default=None, metavar="SECONDS",
           help="convert only this much of the input (default: to its end)")
    option("seed", type=_ranged("seed"), default=None, metavar="N",
           help="seed the synthesizer's noise (and --build_index's shuffle)")
    option("no_noise", action="store_true", help="switch the synthesizer's random terms off (deterministic)")

    section("pitch")
    option("f0_up_key", aliases=["--pitch"], type=_ranged("f0_up_key"), default=defaults.f0_up_key, metavar="N",
           help=f"transpose by N semitones, {_range_text('f0_up_key')} (default %(default)s)")
    option("f0_method", choices=F0_METHODS, default=None,
           help="pitch estimator (default rmvpe when rmvpe.pt is there, else harvest; crepe is for a GPU: "
                "on a CPU it takes about ten times the rest of the conversion)")
    option("filter_radius", type=_ranged("filter_radius"), default=defaults.filter_radius, metavar="N",
           help=f"harvest: median-filter the pitch when >= 3, {_range_text('filter_radius')} (default %(default)s)")
    option("interp_unvoiced", action="store_true",
           help="fill unvoiced pitch from its neighbours (2026 WebUI; protect then has no effect)")

    section("retrieval")
    option("index_name", metavar="NAME",
           help=f"feature index: <models_dir>/rvc/NAME.index; {AUTO_INDEX}: the model's own, when it has one")
    option("index_rate", type=_ranged("index_rate"), default=None, metavar="R",
           help=f"share of retrieved features, {_range_text('index_rate')} (default {defaults.index_rate}; "
                f"needs --index_name)")
    option("index_k", type=_ranged("index_k"), default=defaults.index_k, metavar="K",
           help=f"stored features blended per feature, {_range_text('index_k')} (default %(default)s)")
    option("nprobe", type=_ranged("nprobe"), default=None, metavar="N",
           help=f"inverted lists searched, {_range_text('nprobe')}; more finds closer features, slower "
                f"(default: the index's own, 1 in WebUI indexes)")

    section("output")
    option("resample_sr", type=_ranged("resample_sr"), default=defaults.resample_sr, metavar="HZ",
           help=f"output sample rate, {_range_text('resample_sr')}; 0 keeps the model's (default %(default)s)")
    option("output_format", choices=list(OUTPUT_FORMATS), default=None,
           help=f"the format of an OUTPUT without a known extension, of - and of a folder's outputs "
                f"(default {DEFAULT_OUTPUT_FORMAT}); a known extension wins")
    option("bit_depth", choices=BIT_DEPTHS, default=None,
           help=f"WAV and FLAC samples: 16-bit (the WebUI's), 24-bit or 32-bit float (WAV only) "
                f"(default {DEFAULT_BIT_DEPTH})")
    option("json", action="store_true", help="print exactly one JSON object on stdout")
    option("quiet", action="store_true", help="no progress or summary on stderr (warnings and errors remain)")
    option("verbose", action="store_true", help="more detail on stderr, and the traceback of an error")

    section("files and device")
    option("models_dir", metavar="DIR", help=f"models folder (default ${MODELS_DIR_ENV} or models/ beside this script)")
    option("hubert", metavar="PATH", help=f"HuBERT: hubert_base.pt or a transformers folder (default ${HUBERT_ENV} "
                                          f"or <models_dir>/{HUBERT_FILE} or <models_dir>/{HUBERT_FOLDER}/)")
    option("rmvpe", metavar="PATH", help=f"RMVPE weights (default ${RMVPE_ENV} or <models_dir>/{RMVPE_FILE})")
    option("device", default="auto", metavar="DEV", help=f"{DEVICES_HELP} (default auto: the GPU when torch sees one)")
    option("precision", choices=["auto", *PRECISIONS], default="auto",
           help="default auto: fp16 on CUDA, fp32 on the CPU")
    option("threads", type=_ranged("threads"), default=None, metavar="N",
           help=f"CPU threads for the networks and the pitch blocks, {_range_text('threads')} "
                f"(default: torch's, one per core)")

    section("modes")
    option("check", action="store_true",
           help="say what a conversion would use and check that all of it is usable; convert nothing")
    option("list_models", action="store_true", help="list the voice models and indexes in the models folder")
    option("info", metavar="MODEL", help="describe one voice model")
    parser.add_argument("--version", action="version", version=f"rvc_modulator {__version__}")

    section("training tools")
    option("prepare_dataset", nargs=2, metavar=("DATASET_DIR", "WORK_DIR"),
           help="slice a folder of recordings and compute their HuBERT features and pitch, in the WebUI's "
                "layout (resumable)")
    option("build_index", nargs=2, metavar=("DIR", "NAME"),
           help="<models_dir>/rvc/NAME.index from a prepared WORK_DIR or from a folder of recordings")
    option("extract_model", nargs=2, metavar=("CHECKPOINT", "NAME"),
           help="<models_dir>/rvc/NAME.pth, the small voice model of a training checkpoint (G_*.pth)")
    option("merge_models", nargs=3, metavar=("MODEL_A", "MODEL_B", "NAME"),
           help="<models_dir>/rvc/NAME.pth with the weights A * MODEL_A + (1 - A) * MODEL_B (--alpha)")
    option("alpha", type=_ranged("alpha"), default=0.5, metavar="A",
           help=f"--merge_models: MODEL_A's share, {_range_text('alpha')} (default %(default)s)")
    option("sample_rate", type=_dataset_rate, default=None, metavar="HZ",
           help=f"the model's rate, {'|'.join(map(str, DATASET_RATES))} (default {DEFAULT_DATASET_RATE}; "
                f"--extract_model: read from the checkpoint)")
    option("model_version", choices=MODEL_VERSIONS, default=None,
           help="v1 (256-d features) or v2 (768-d) (default v2; --build_index: the features DIR holds)")
    option("comment", metavar="TEXT", help="the info text of an extracted or merged model")
    option("train", nargs=2, metavar=("DATASET_DIR", "NAME"),
           help="prepare DATASET_DIR and train <models_dir>/rvc/NAME.pth (and NAME.index) with the WebUI's recipe; "
                "the same command again resumes")
    option("pretrained_g", metavar="PATH", help="--train: the generator to start from (e.g. pretrained_v2/f0G40k.pth)")
    option("pretrained_d", metavar="PATH", help="--train: the discriminator to start from (e.g. f0D40k.pth)")
    option("epochs", type=_ranged("epochs"), default=None, metavar="N",
           help=f"--train: epochs, {_range_text('epochs')} (default 200)")
    option("batch_size", type=_ranged("batch_size"), default=None, metavar="N",
           help=f"--train: chunks per step, {_range_text('batch_size')} (default 4, the WebUI's config)")
    option("save_every", type=_ranged("save_every"), default=None, metavar="N",
           help=f"--train: a checkpoint every N epochs, {_range_text('save_every')} (default 10)")
    option("keep_checkpoints", type=_ranged("keep_checkpoints"), default=None, metavar="N",
           help=f"--train: checkpoints kept, {_range_text('keep_checkpoints')}; 0 keeps all (default 2)")
    option("log_every", type=_ranged("log_every"), default=None, metavar="N",
           help=f"--train --json: a step event every N steps, {_range_text('log_every')} "
                f"(default: about 4 an epoch, every step of small runs)")
    option("save_models", action="store_true",
           help="--train: with every checkpoint also the voice model of that epoch, NAME_e<epoch>_s<step>.pth")
    option("work_dir", metavar="DIR", help="--train: the prepared dataset and checkpoints "
                                            "(default <models_dir>/training/NAME)")

    section("service")
    option("serve", action="store_true",
           help="run as a worker for a service: one JSON request per line on stdin, one JSON response per "
                "line on stdout (see the README); --models_dir, --hubert, --rmvpe, --device, --precision, "
                "--threads, --quiet and --verbose given with it apply to every request")
    option("cache_models", type=_ranged("cache_models"), default=DEFAULT_CACHE_MODELS, metavar="N",
           help=f"--serve: voice models and indexes kept loaded, {_range_text('cache_models')} (default %(default)s)")
    return parser


def answer_without_loading(argv: Sequence[str]) -> None:
    """--help and --version need none of the libraries imported below (torch alone takes
    over a second to import): answer them here and exit. Anything else, including a
    command line with errors, is left to main()."""
    if not any(arg in ("-h", "--help", "--version") for arg in argv):
        return
    try:
        build_parser().parse_args(argv)  # prints the help or the version and exits 0
    except UsageError:
        pass


if __name__ == "__main__":
    answer_without_loading(sys.argv[1:])

# The libraries everything below needs.
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# =============================================================================
# 4. Audio I/O
# =============================================================================

INPUT_PEAK = 0.95  # louder inputs are attenuated to this peak before conversion (never amplified)
OUTPUT_PEAK = 0.99  # louder outputs are normalised to this peak before int16
INT16_SCALE = 32768.0
CLIP_LEVEL = 32767 / 32768  # |sample| at full scale (the int16 maximum) or beyond
CLIPPED_SAMPLES_TO_WARN = 3  # a lone full-scale peak is legitimate; several suggest clipping
STEREO_TO_MONO_GAIN = 1 / math.sqrt(2)  # ffmpeg's stereo-to-mono downmix, which the WebUI uses


# Long inputs are converted disk to disk: the input at 16 kHz, its filtered copy and the
# network's raw output live in scratch files, and every stage reads the window it needs, so
# memory does not grow with the input (an hour at 16 kHz in float64 alone is 460 MB).
# A Signal is anything with a length that gives a contiguous range of samples by slice:
# an ndarray, or a SampleFile.
Signal = Any
READ_BLOCK = 1 << 18  # frames decoded per read (5.5 s at 48 kHz)
BLOCK = 1 << 18  # samples per pass of the streaming stages (16 s at 16 kHz)


class SlicedSignal:
    """A Signal that is not an array: np.asarray() of it reads the whole."""

    def __getitem__(self, index: slice) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


class SampleFile(SlicedSignal):
    """A growing sequence of samples in an unnamed temporary file, read back by slice.

    Reads copy (seek and readinto, under a lock: the pitch blocks read from threads), so
    nothing stays mapped: resident memory does not grow with the file. The file has no name
    where the system allows (else it is removed at once) and vanishes when closed or when the
    process dies. Failures (a full disk) are an OutputError: the scratch space is part of
    writing the output.
    """

    def __init__(self, dtype: Any = np.float32, directory: Path | None = None):
        self.dtype = np.dtype(dtype)
        self._where = directory or Path(tempfile.gettempdir())  # named in errors
        try:
            self._file = tempfile.TemporaryFile(dir=directory, prefix=".rvc-", suffix=".samples", buffering=0)
        except OSError as exc:
            raise OutputError(f"cannot create scratch audio ({exc.strerror})", self._where) from exc
        self._length = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def append(self, samples: np.ndarray) -> None:
        self.write_at(self._length, samples)

    def write_at(self, start: int, samples: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(samples, dtype=self.dtype)).cast("B")
        try:
            with self._lock:
                self._file.seek(start * self.dtype.itemsize)
                while data:
                    data = data[self._file.write(data):]
        except OSError as exc:
            raise OutputError(f"cannot write scratch audio ({exc.strerror})", self._where) from exc
        self._length = max(self._length, start + len(samples))

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self._length)
        if step != 1:
            raise ValueError("SampleFile reads contiguous ranges only")
        out = np.empty(max(0, stop - start), self.dtype)
        view = memoryview(out).cast("B")
        with self._lock:
            self._file.seek(start * self.dtype.itemsize)
            while view:
                got = self._file.readinto(view)
                if not got:
                    raise OutputError("scratch audio ended early", self._where)
                view = view[got:]
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SampleFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def reflect_read(signal: Signal, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of `signal` extended beyond its ends by reflection about its
    first and last sample, as numpy's pad mode "reflect" (periodic for long pads); only the
    samples the range touches are read."""
    n = len(signal)
    if 0 <= start and stop <= n:
        return np.asarray(signal[start:stop])
    if n == 1:
        return np.repeat(np.asarray(signal[0:1]), stop - start)
    idx = np.arange(start, stop) % (2 * (n - 1))
    idx = np.where(idx < n, idx, 2 * (n - 1) - idx)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    return np.asarray(signal[lo:hi])[idx - lo]


class ReflectPadded(SlicedSignal):
    """`signal` reflect-padded by `pad` samples on both sides, read by slice: the slices of
    np.pad(signal, pad, mode="reflect") without making it."""

    def __init__(self, signal: Signal, pad: int):
        self.signal, self.pad = signal, pad

    def __len__(self) -> int:
        return len(self.signal) + 2 * self.pad

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self))
        return reflect_read(self.signal, start - self.pad, max(start, stop) - self.pad)


def signal_peak(signal: Signal, block: int) -> float:
    """max |sample| of a signal, read `block` samples at a time."""
    return max((float(np.abs(signal[i:i + block]).max()) for i in range(0, len(signal), block)), default=0.0)


def output_length(n: int, orig_sr: int, target_sr: int) -> int:
    """Samples that n samples at orig_sr last at target_sr, rounded up (as the resamplers'
    lengths, here in exact integer arithmetic)."""
    return -(-n * target_sr // orig_sr)


@dataclass
class InputAudio:
    """The input as the pipeline sees it: mono float32 at 16 kHz, plus what it was."""

    samples: Signal  # (N,) float32, 16 kHz: a SampleFile when read from a file
    source_rate: int
    source_channels: int
    duration: float  # seconds, of the original file
    peak: float  # max |sample| at 16 kHz
    source_frames: int = 0  # samples per channel in the original file

    def length_at(self, rate: int) -> int:
        """Samples of this input's duration at `rate`: what an output at that rate holds."""
        return output_length(self.source_frames, self.source_rate, rate)


def region_frames(total: int, rate: int, start: float = 0.0, duration: float | None = None) -> tuple[int, int]:
    """--start and --duration (seconds) as (first frame, frames) of a file of `total` frames
    at `rate`; a duration past the file's end is cut there."""
    first = round(start * rate)
    if first >= total:
        raise UsageError(f"--start {start:g} s is at or past the end of the input ({total / rate:.3f} s)", "--start")
    count = total - first if duration is None else max(1, round(duration * rate))
    return first, min(count, total - first)


def _decoded_blocks(path: Path, start: float = 0.0,
                    duration: float | None = None) -> tuple[Iterator[np.ndarray], int, int, int]:
    """Decode an audio file, or the region of it from `start` lasting `duration` seconds,
    as (blocks of (frames, channels) float32, rate, channels, frames in the whole file)."""
    import soundfile as sf

    try:
        handle = sf.SoundFile(str(path))
    except (RuntimeError, sf.LibsndfileError, ValueError, EOFError) as sf_error:
        # MP3/M4A/... where libsndfile cannot: librosa falls back to audioread (ffmpeg),
        # which decodes the whole file.
        try:
            import librosa

            with quiet_library_warnings():
                data, rate = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
        except Exception:
            reason = _first_line(sf_error).replace(f"Error opening {str(path)!r}: ", "")  # the path is the subject
            raise InputAudioError(f"cannot decode audio: {reason}", path) from sf_error
        data = np.atleast_2d(data).T  # librosa gives (channels, frames)
        total = len(data)
        first, count = region_frames(total, int(rate), start, duration) if total else (0, 0)
        data = np.ascontiguousarray(data[first:first + count], dtype=np.float32)  # (frames, channels)
        return iter([data]), int(rate), data.shape[1], total

    total, count = handle.frames, None  # None: to the end, however long (a header's count may be off)
    if start or duration is not None:
        try:
            first, count = region_frames(total, handle.samplerate, start, duration) if total else (0, 0)
            if first:
                handle.seek(first)
        except BaseException:
            handle.close()
            raise

    def blocks() -> Iterator[np.ndarray]:
        left = count
        with handle:
            try:
                while left is None or left > 0:
                    block = handle.read(READ_BLOCK if left is None else min(READ_BLOCK, left), dtype="float32",
                                        always_2d=True)
                    if not len(block):
                        return
                    if left is not None:
                        left -= len(block)
                    yield block
            except (RuntimeError, sf.LibsndfileError, ValueError, EOFError) as exc:
                raise InputAudioError(f"cannot decode audio: {_first_line(exc)}", path) from exc

    return blocks(), int(handle.samplerate), int(handle.channels), total


class Resampler:
    """resample() a block at a time: soxr's stream gives the one-shot's samples exactly;
    finish(n) ends the stream and cuts or pads the total to ceil(n * target / orig)."""

    def __init__(self, orig_sr: int, target_sr: int, dtype: Any = np.float32):
        import soxr

        self.orig_sr, self.target_sr, self.dtype = orig_sr, target_sr, np.dtype(dtype)
        self._stream = soxr.ResampleStream(orig_sr, target_sr, 1, dtype=self.dtype.name, quality="soxr_hq")
        self._emitted = 0

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        out = self._stream.resample_chunk(np.ascontiguousarray(block, dtype=self.dtype), last=last)
        self._emitted += len(out)
        return out

    def finish(self, n_in: int) -> np.ndarray:
        """The stream's last samples, with the total made ceil(n_in * target / orig)."""
        size = math.ceil(n_in * (float(self.target_sr) / self.orig_sr))
        tail = self(np.zeros(0, self.dtype), last=True)
        excess = self._emitted - size
        if excess > 0:  # cut: never more than the last block holds
            tail = tail[:max(0, len(tail) - excess)]
        return np.concatenate([tail, np.zeros(max(0, -excess), self.dtype)])


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling with soxr at high quality, cut or zero-padded to
    ceil(n * target_sr / orig_sr) samples: exactly librosa.resample(res_type="soxr_hq"),
    without the seconds librosa's first call spends importing (soxr is librosa's own
    resampler, installed with it)."""
    if orig_sr == target_sr:
        return audio
    resampler = Resampler(orig_sr, target_sr, audio.dtype)
    return np.concatenate([resampler(audio), resampler.finish(len(audio))])


def downmix(data: np.ndarray) -> np.ndarray:
    """(frames, channels) to mono as the WebUI's decoder (ffmpeg `-ac 1`) does: stereo
    is (L + R) / sqrt(2), each side at -3 dB; other layouts are averaged."""
    channels = data.shape[1]
    if channels == 1:
        return data[:, 0]
    if channels == 2:
        return ((data[:, 0] + data[:, 1]) * STEREO_TO_MONO_GAIN).astype(np.float32)
    return data.mean(axis=1, dtype=np.float32)


def read_input_audio(path: Path, warn: Warn = print_warning, directory: Path | None = None,
                     start: float = 0.0, duration: float | None = None) -> InputAudio:
    """Read an input file (or the region of it from `start` lasting `duration` seconds) as
    the pipeline wants it: mono float32 at 16 kHz, decoded, mixed down and resampled a
    block at a time into a SampleFile (in `directory`).

    Channels are mixed down as the WebUI's ffmpeg does, other rates resampled (the run's
    summary and report say so: they are ordinary, no cause for a warning).
    Empty, non-finite or undecodable input is an InputAudioError.
    """
    path = Path(path)
    if not path.exists():
        raise InputAudioError("input file not found", path)
    if path.is_dir():
        raise InputAudioError("input is a directory, not an audio file", path)
    blocks, rate, channels, total = _decoded_blocks(path, start, duration)
    resampler = Resampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
    samples = SampleFile(np.float32, directory)
    frames = clipped = 0
    peak = 0.0
    try:
        def keep(mono: np.ndarray) -> None:
            nonlocal peak
            if len(mono):
                peak = max(peak, float(np.abs(mono).max()))
                samples.append(mono)

        for block in blocks:
            if not np.isfinite(block).all():
                raise InputAudioError("input contains NaN or infinite samples", path)
            frames += len(block)
            clipped += int(np.count_nonzero(np.abs(block) >= CLIP_LEVEL))
            mono = downmix(block)
            keep(resampler(mono) if resampler else mono)
        if frames == 0:
            raise InputAudioError("input has no audio samples", path)
        if resampler:
            keep(resampler.finish(frames))
    except BaseException:
        samples.close()
        raise
    if clipped >= CLIPPED_SAMPLES_TO_WARN:
        warn(f"the input is clipped: {clipped} samples at or beyond full scale")
    if duration is not None and frames < round(duration * rate):
        warn(f"the input ends {frames / rate:.3f} s after --start: converting that, not --duration {duration:g} s")
    return InputAudio(samples, rate, channels, frames / rate, peak, frames)


def describe_input(audio: InputAudio) -> str:
    """The input as a person would say it: "44100 Hz stereo"."""
    layout = {1: "mono", 2: "stereo"}.get(audio.source_channels, f"{audio.source_channels} channels")
    return f"{audio.source_rate} Hz {layout}"


def int16_scale(peak: float) -> np.float32:
    """The reference's factor from float audio to int16 steps; `peak` is max |sample| of the
    whole output: outputs peaking above OUTPUT_PEAK are normalised to that peak, others are
    left as they are."""
    peak = peak / OUTPUT_PEAK
    return np.float32(INT16_SCALE / peak if peak > 1 else INT16_SCALE)


def to_int16(audio: np.ndarray, peak: float) -> np.ndarray:
    """int16 samples as the reference makes them (int16_scale)."""
    return (audio * int16_scale(peak)).astype(np.int16)  # truncation toward zero, as the reference


def to_output_floats(audio: np.ndarray, peak: float) -> np.ndarray:
    """The samples to_int16 truncates, as floats in -1..1 (for outputs of more than 16 bits);
    dividing by INT16_SCALE, a power of two, is exact."""
    return (audio * (int16_scale(peak) / np.float32(INT16_SCALE))).astype(np.float32)


# "-" as INPUT reads the audio from stdin, as OUTPUT writes a WAV to stdout. Both go
# through a private scratch file: decoding needs to seek, and stdout gets the output only
# once it is complete, so a failure leaves stdout empty.
STDIO = "-"
STDIO_BLOCK = 1 << 20  # bytes copied per read


def spool_stdin(directory: Path) -> Path:
    """stdin's bytes, all of them, into a file in `directory`: its path."""
    path = directory / "stdin.audio"
    try:
        with open(path, "xb") as handle:
            shutil.copyfileobj(sys.stdin.buffer, handle, STDIO_BLOCK)
    except OSError as exc:
        raise InputAudioError(f"cannot read the input from stdin ({exc.strerror or exc})", "stdin") from exc
    return path


def copy_to_stdout(path: Path) -> None:
    """A finished output file's bytes onto stdout."""
    try:
        with open(path, "rb") as handle:
            shutil.copyfileobj(handle, sys.stdout.buffer, STDIO_BLOCK)
        sys.stdout.buffer.flush()
    except OSError as exc:  # a closed pipe, a full disk behind a redirection
        raise OutputError(f"cannot write the output to stdout ({exc.strerror or exc})", "stdout") from exc


@dataclass(frozen=True)
class OutputSpec:
    """How an output file is written: the format's name (OUTPUT_FORMATS), soundfile's
    format and subtype."""

    name: str = DEFAULT_OUTPUT_FORMAT
    format: str = "WAV"
    subtype: str = "PCM_16"

    @property
    def float_samples(self) -> bool:
        """Written from the float samples (24-bit, float), not from the WebUI's int16 ones."""
        return self.subtype in ("PCM_24", "FLOAT")


def output_spec(path: Path | str, chosen: str | None = None, bit_depth: str | None = None) -> OutputSpec:
    """The format of an output: its extension's when OUTPUT_FORMATS knows it, else `chosen`
    (--output_format; "-" defaults to WAV); `bit_depth` for the formats that have one."""
    suffix = "" if str(path) == STDIO else Path(path).suffix.lower()[1:]
    name = suffix if suffix in OUTPUT_FORMATS else chosen or (DEFAULT_OUTPUT_FORMAT if str(path) == STDIO else None)
    if name is None:
        known = ", ".join(f".{n}" for n in OUTPUT_FORMATS)
        raise UsageError(f"unsupported output format {f'.{suffix}' if suffix else '(no extension)'!r}; "
                         f"name the output {known}, or give --output_format", path)
    fmt, subtypes = OUTPUT_FORMATS[name]
    if None in subtypes:
        return OutputSpec(name, fmt, subtypes[None])
    depth = bit_depth or DEFAULT_BIT_DEPTH
    if depth not in subtypes:
        raise UsageError(f"{name.upper()} holds {' or '.join(subtypes)}-bit samples, not {depth}", "--bit_depth")
    return OutputSpec(name, fmt, subtypes[depth])


def check_format_writable(spec: OutputSpec, subject: Path | str) -> None:
    """The installed soundfile can write this format (MP3 came with libsndfile 1.1.0)."""
    import soundfile as sf

    if spec.format not in sf.available_formats():
        raise OutputError(f"this soundfile (libsndfile {sf.__libsndfile_version__}) cannot write "
                          f"{spec.name.upper()}; pip install --upgrade soundfile for one that can", subject)


def check_path_writable(path: Path) -> None:
    """Fail early if a file could not be written at `path` (a folder there, no folder for
    it, or one without write permission)."""
    if path.is_dir():
        raise OutputError("output path is a directory", path)
    parent = path.parent
    if not parent.is_dir():
        raise OutputError("output directory does not exist", parent)
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise OutputError(f"output directory is not writable ({exc.strerror})", parent) from exc
    os.close(fd)
    os.unlink(probe)


def check_output_writable(path: Path, spec: OutputSpec | None = None) -> None:
    """Fail early (before any model loads) if the output could not be written."""
    path = Path(path)
    check_format_writable(spec or output_spec(path), path)
    if str(path) != STDIO:
        check_path_writable(path)


@contextlib.contextmanager
def atomic_file(path: Path, before_commit: Callable[[], None] | None = None) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write. When the block ends, the file
    is flushed to disk and renamed onto `path` (after before_commit()); when it fails or is
    interrupted, the file is removed and an existing file at `path` stays as it was. A
    reader never sees a half-written file."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot create the output file ({exc.strerror})", path) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the output ({exc.strerror or exc})", path) from exc
        raise


def write_audio_atomic(path: Path, blocks: np.ndarray | Iterable[np.ndarray], sample_rate: int,
                       before_commit: Callable[[], None] | None = None, spec: OutputSpec | None = None) -> int:
    """Write samples (an array, or blocks of one as they are made) in `spec`'s format (by
    default its extension's) through atomic_file(); returns the number of frames written.
    Also a failure raised while a block is being made leaves nothing behind."""
    import soundfile as sf

    path = Path(path)
    spec = spec or output_spec(path)
    if isinstance(blocks, np.ndarray):
        blocks = [blocks]
    frames = 0
    with atomic_file(path, before_commit) as tmp, \
            sf.SoundFile(str(tmp), "w", sample_rate, 1, spec.subtype, format=spec.format) as out:
        for block in blocks:  # what making a block raises is not the writer's fault
            try:
                out.write(block)
            except (RuntimeError, sf.LibsndfileError) as exc:
                raise OutputError(f"cannot write the output ({_first_line(exc)})", path) from exc
            frames += len(block)
    return frames


# =============================================================================
# 5. Weight loading
# =============================================================================

# Memory policy. glibc's malloc maps every block above its mmap threshold (at most 32 MB)
# fresh from the kernel and unmaps it when it is freed. The decoder's activations are such
# blocks, so every layer of every chunk paid for page faults and zero-filling: 3.7 million
# faults and 9 s of system time per 10 s of audio, measured. Served from the heap and kept
# once freed, they are reused instead (system time 0.3 s); the bounded chunks and segments
# keep that heap small. Weights are the opposite: allocated once, freed whole (RMVPE once
# the pitch is known), so they are mapped outside the heap while a model loads, and what
# they free goes back to the system instead of staying behind as heap that only fits
# activations (a 60 s conversion's peak: -80 to -170 MB, measured).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
MMAP_MAX_DEFAULT = 65536  # glibc's own default for M_MMAP_MAX
WEIGHT_MMAP_THRESHOLD = 1 << 20  # bytes: tensors from this size up are mapped while loading
_GLIBC_MALLOC: dict[str, Callable[..., int]] = {}  # glibc's mallopt and malloc_trim, once keep_freed_memory() ran


def keep_freed_memory() -> bool:
    """Tell glibc's malloc never to mmap blocks nor to trim the heap; False elsewhere."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)  # the malloc this process runs on
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        return False
    _GLIBC_MALLOC.update(mallopt=mallopt, malloc_trim=malloc_trim)
    return True


def release_freed_memory() -> None:
    """Give the pages of the heap's free blocks back to the system (malloc_trim), once a
    stage is over and its network dropped: the next stage's peak then does not stack on
    memory the last one freed but kept (dropping the voice network: 60 MB, measured).
    A no-op unless keep_freed_memory() is in effect."""
    if _GLIBC_MALLOC:
        _GLIBC_MALLOC["malloc_trim"](0)


@contextlib.contextmanager
def blocks_outside_heap(threshold: int = WEIGHT_MMAP_THRESHOLD) -> Iterator[None]:
    """Meanwhile, blocks of `threshold` bytes and more are mapped (and unmapped when freed,
    whenever that is): weights while a model loads, a stage's few long-lived large blocks
    while the heap serves its many short-lived ones. A no-op unless keep_freed_memory() is
    in effect. Not for concurrent use: malloc's settings are the process's."""
    if not _GLIBC_MALLOC:
        yield
        return
    mallopt = _GLIBC_MALLOC["mallopt"]
    mallopt(M_MMAP_THRESHOLD, threshold)
    mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
    try:
        yield
    finally:
        mallopt(M_MMAP_MAX, 0)


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


def _describe_load_failure(path: Path, exc: BaseException) -> ModelFileError:
    text = str(exc)
    refused = ("unsupported global", "unrecognized function", "allowlisted", "is blocked")
    if any(phrase in text.lower() for phrase in refused):  # torch's weights-only unpickler said no
        return ModelFileError("unsafe file: it references Python code or objects that are not weights; refusing to load it", path)
    if isinstance(exc, (EOFError,)) or "failed finding central directory" in text or "truncated" in text.lower():
        return ModelFileError("corrupt or truncated file", path)
    return ModelFileError(f"not a readable PyTorch weights file ({type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'})", path)


def _pickled_globals(path: Path) -> list[str]:
    """The globals a torch checkpoint names beyond torch's own allow-list (no code runs)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as exc:  # not a zip checkpoint: legacy format, or not torch at all
        raise _describe_load_failure(path, exc) from exc


def load_torch_file(path: Path, *, allow_standins: bool = False, mmap: bool = False) -> Any:
    """Load a torch.save file without ever executing code from it.

    allow_standins: accept harmless pickled objects from STANDIN_MODULE_PREFIXES modules
    (fairseq checkpoints) as inert placeholders; all other globals are refused.
    mmap: map the tensors' data instead of reading it (zip-format files; others are read).
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
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
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
                     ignore: Iterable[str] = (), spell: Callable[[str], str] = str) -> None:
    """Every key the module needs is present with its exact shape, and nothing else is.

    Raises ModelFileError naming the first offending key, as `spell` writes it (the file's
    own naming where the loader renamed keys). `ignore`: keys of the file that inference
    does not use (they may be present or not).
    """
    ignore = set(ignore)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key, shape in expected.items():
        if key not in state:
            raise ModelFileError(f"missing tensor {spell(key)!r}", path)
        if not isinstance(state[key], torch.Tensor):
            raise ModelFileError(f"{spell(key)!r} is not a tensor", path)
        if tuple(state[key].shape) != shape:
            raise ModelFileError(f"tensor {spell(key)!r} has shape {list(state[key].shape)}, "
                                 f"expected {list(shape)}", path)
    extra = sorted(k for k in state if k not in expected and k not in ignore)
    if extra:
        raise ModelFileError(f"unexpected tensor {spell(extra[0])!r}", path)


class StoredLinear(nn.Linear):
    """A linear layer whose weight may be stored narrower than it computes: an fp16 weight
    from an fp16 file stays fp16 in memory and is widened for each call. fp16 -> fp32 is
    exact, so the result is the fp32 layer's, for half the memory (hubert_base's
    transformer: 170 MB) and a copy per call (~0.1 s per 40 s segment)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def checked_on_meta(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], path: Path,
                    ignore: Iterable[str] = (), spell: Callable[[str], str] = str) -> nn.Module:
    """The network built on the meta device (no storage, no random initialisation: for a
    full-size model that saves about a second) and checked against the file's tensors."""
    with torch.device("meta"):
        module = build()
    check_state_dict(module, state, path, ignore, spell)
    return module


def load_checked(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], path: Path,
                 ignore: Iterable[str] = (), spell: Callable[[str], str] = str) -> nn.Module:
    """Build a network, check the file's tensors against it, and adopt them as fp32 (eval
    mode), but for the weights of its StoredLinear layers, which keep the file's fp16.

    The network is built and checked on the meta device (checked_on_meta: every tensor is
    replaced anyway); the file's tensors are then assigned to it, cast to fp32 (a no-op for fp32 files). A dict
    `state` is emptied of them as they are cast, so that where the caller holds no other
    reference the file's fp16 copy and the fp32 one are never both whole in memory
    (hubert_base: 190 MB less at its peak).
    """
    module = checked_on_meta(build, state, path, ignore, spell)
    stored_half = {f"{name}.weight" for name, layer in module.named_modules() if isinstance(layer, StoredLinear)}
    adopted = {}
    for key in module.state_dict():
        tensor = state.pop(key) if isinstance(state, dict) else state[key]
        keep = key in stored_half and tensor.dtype == torch.float16
        adopted[key] = tensor.float() if tensor.is_floating_point() and not keep else tensor
        del tensor
    module.load_state_dict(adopted, assign=True)
    return module.eval()


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(key, str) for key in obj)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_SAFETENSORS_HEADER = 100 * 2**20  # bytes; the format's own limit


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


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity. A finite sum proves it without a temporary the size of the tensor;
    a non-finite sum is confirmed element-wise (it could also be an overflow)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


# =============================================================================
# 6. HuBERT content encoder
# =============================================================================

# HuBERT-base turns 16 kHz audio into one content vector per 20 ms: a strided conv stack
# (the "feature extractor"), a projection to the model width, a convolutional positional
# embedding, then a post-LN transformer. RVC's hubert_base.pt is this architecture with
# ContentVec weights (HuBERT-base retrained to carry less speaker identity) and a final
# projection to 256 dimensions. Module and tensor names follow transformers' HubertModel
# (plus RVC's final_proj); fairseq checkpoints are renamed on load (6b below).
#
# RVC's two model versions read different features: v1 the 256-d final_proj of transformer
# layer 9's output (fairseq's output_layer=9, transformers' hidden_states[9]), v2 the
# 768-d output of the last layer, without final_proj. Neither is normalised further.

HUBERT_V1_LAYER = 9
VERSION_PHONE_DIMS = {"v1": 256, "v2": 768}  # content feature size each model version reads
HUBERT_CHUNK_FRAMES = 100  # feature-extractor frames (2 s) at once: 13 MB of first-layer output (5 s: +180 MB peak)


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

    def forward(self, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, C_in, N) -> (B, C_out, N'). stats: the (mean, 1 / std) of this layer's
        convolution output per channel over the whole signal, (B, C_out) each, when x is
        only a piece of it; None: x is the whole signal."""
        x = self.conv(x)
        if self.layer_norm is not None:
            if stats is None:
                x = self.layer_norm(x)
            else:  # in fp32 whatever the module dtype, as Fp32GroupNorm
                mean, inv_std = stats
                scale = inv_std * self.layer_norm.weight.float()  # (B, C)
                x = ((x.float() - mean[..., None]) * scale[..., None]
                     + self.layer_norm.bias.float()[:, None]).type_as(x)
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
        """In one piece up to HUBERT_CHUNK_FRAMES frames, else HUBERT_CHUNK_FRAMES at a time.

        The convolutions have no padding, so a range of frames needs only the samples
        under it (stride * frames + the receptive field). Only the first layer's GroupNorm
        looks at the whole signal: its statistics come first, from the first convolution
        alone, in pieces. The first layer's output of a 50 s segment would be 340 MB.
        """
        x = wave[:, None, :]
        n_frames = self.num_frames(x.shape[-1])
        if n_frames <= HUBERT_CHUNK_FRAMES:
            for layer in self.conv_layers:
                x = layer(x)
            return x
        stats = self._first_layer_stats(x)
        stride, field = self.stride_and_field()
        pieces = []
        for start in range(0, n_frames, HUBERT_CHUNK_FRAMES):
            stop = min(start + HUBERT_CHUNK_FRAMES, n_frames)
            piece = x[..., start * stride: (stop - 1) * stride + field]
            piece = self.conv_layers[0](piece, stats)
            for layer in self.conv_layers[1:]:
                piece = layer(piece)
            pieces.append(piece)  # (B, C, stop - start)
        return torch.cat(pieces, dim=-1)

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv stack makes of num_samples samples (0 if too short)."""
        for layer in self.conv_layers:
            num_samples = max(0, (num_samples - layer.conv.kernel_size[0]) // layer.conv.stride[0] + 1)
        return num_samples

    def stride_and_field(self) -> tuple[int, int]:
        """Samples between frames, and samples under one frame (hubert_base: 320, 400)."""
        stride, field = 1, 1
        for layer in reversed(self.conv_layers):
            field = (field - 1) * layer.conv.stride[0] + layer.conv.kernel_size[0]
            stride *= layer.conv.stride[0]
        return stride, field

    def _first_layer_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / sqrt(var + eps)) per (batch, channel) of the first convolution's output
        over the whole signal (B, 1, N), as GroupNorm computes them (biased variance),
        accumulated in float64 a piece at a time; float32."""
        conv = self.conv_layers[0].conv
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        n_out = (x.shape[-1] - kernel) // stride + 1
        step = HUBERT_CHUNK_FRAMES * self.stride_and_field()[0] // stride  # first-layer outputs per piece
        total = torch.zeros(x.shape[0], conv.out_channels, dtype=torch.float64, device=x.device)
        squares = torch.zeros_like(total)
        for start in range(0, n_out, step):
            stop = min(start + step, n_out)
            y = conv(x[..., start * stride: (stop - 1) * stride + kernel]).double()  # (B, C, stop - start)
            total += y.sum(-1)
            squares += (y * y).sum(-1)
        mean = total / n_out
        var = (squares / n_out - mean * mean).clamp(min=0)
        return mean.float(), torch.rsqrt(var + self.conv_layers[0].layer_norm.eps).float()


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
        self.q_proj = StoredLinear(hidden, hidden)
        self.k_proj = StoredLinear(hidden, hidden)
        self.v_proj = StoredLinear(hidden, hidden)
        self.out_proj = StoredLinear(hidden, hidden)

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
        self.intermediate_dense = StoredLinear(hidden, ffn)
        self.output_dense = StoredLinear(ffn, hidden)

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
        return self.feature_extractor.num_frames(num_samples)

    def forward(self, wave: torch.Tensor, num_layers: int) -> torch.Tensor:  # (B, N) -> (B, T, H)
        """The output of transformer layer `num_layers` (1-based; 0 = the input to layer 1),
        i.e. transformers' hidden_states[num_layers], fairseq's output_layer=num_layers."""
        x = self.feature_extractor(wave.to(self.final_proj.weight.dtype))  # (B, C, T)
        x = self.feature_projection(x.transpose(1, 2))  # (B, T, H)
        return self.encoder(x, num_layers)

    @torch.no_grad()
    def extract(self, wave: torch.Tensor, version: str) -> torch.Tensor:
        """RVC's content features of a (1, N) 16 kHz waveform: v1 -> final_proj(layer 9)
        (1, T, 256); v2 -> the last layer (1, T, 768)."""
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
# 6b. HuBERT loading: fairseq hubert_base.pt or a transformers folder
# -----------------------------------------------------------------------------

# Two layouts hold the same weights: a fairseq checkpoint file
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


def _rename_prefix(key: str, names: Sequence[tuple[str, str]], to_ours: bool) -> str:
    for theirs, ours in names:
        old, new = (theirs, ours) if to_ours else (ours, theirs)
        pattern = "^" + r"(\d+)".join(re.escape(part) for part in old.split("{}"))
        renamed, count = re.subn(pattern, new.replace("{}", r"\1"), key, count=1)
        if count:
            return renamed
    return key


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


def _read_hubert_fairseq(path: Path, mmap: bool = False) -> tuple[HubertConfig, Mapping[str, torch.Tensor]]:
    """Only `cfg["model"]` (or the old `args`) and `model` are read; fairseq's Dictionary
    and the training state become inert stand-ins that nothing touches."""
    checkpoint = load_torch_file(path, allow_standins=True, mmap=mmap)
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


def _read_hubert_folder(path: Path, mmap: bool = False) -> tuple[HubertConfig, Mapping[str, torch.Tensor], Path]:
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
    state = read_safetensors(weights) if weights.suffix == ".safetensors" else load_torch_file(weights, mmap=mmap)
    if not _is_state_dict(state):
        raise ModelFileError("not a state dict (a mapping of tensor names)", weights)
    return hubert_config, state, weights


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


def _hubert_state(path: Path, mmap: bool = False) -> tuple[HubertConfig, dict, Path, dict[str, Any]]:
    """A HuBERT file's config, its tensors under our names (mmap: mapped, not read), the
    file they came from, and the `ignore` and `spell` of its key check (check_state_dict):
    the keys inference does not use, and how that file spells our names."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"HuBERT weights not found (hubert_base.pt or a hubert_base/ folder); "
                            f"{where_to_get(HUBERT_FILE)}", path)
    fairseq = not path.is_dir()
    if fairseq:
        config, state = _read_hubert_fairseq(path, mmap)
        state = {_rename_prefix(key, HUBERT_FAIRSEQ_NAMES, to_ours=True): value for key, value in state.items()}
        weights_path = path
    else:
        config, state, weights_path = _read_hubert_folder(path, mmap)

    def file_name(key: str) -> str:  # our tensor name as the file spells it
        return _rename_prefix(key, HUBERT_FAIRSEQ_NAMES, to_ours=False) if fairseq else key

    state = _fold_pos_conv(state, config, weights_path, file_name)
    checks = {"ignore": [k for k in state if HUBERT_UNUSED_KEYS.fullmatch(k)], "spell": file_name}
    return config, state, weights_path, checks


@blocks_outside_heap()
def load_hubert(path: Path) -> HubertEncoder:
    """The HuBERT encoder in a fairseq checkpoint file or a transformers folder (fp32, eval)."""
    config, state, weights_path, checks = _hubert_state(path)
    return load_checked(lambda: HubertEncoder(config), state, weights_path, **checks)


def inspect_hubert(path: Path) -> HubertConfig:
    """Every check load_hubert makes (the file, its config, every key and shape), without
    reading the weights (they are mapped): the HuBERT's config, for a conversion that loads
    the network itself only once the pitch is done."""
    config, state, weights_path, checks = _hubert_state(path, mmap=True)
    checked_on_meta(lambda: HubertEncoder(config), state, weights_path, **checks)
    return config


def check_hubert_fits(config: HubertConfig, version: str, phone_dim: int, path: Path) -> None:
    """A voice model reads HuBERT features of one size: v1 the final_proj of layer 9, v2
    the last layer (HubertEncoder.extract). A HuBERT that gives another size is refused."""
    if version == "v1" and config.layers < HUBERT_V1_LAYER:
        raise ModelFileError(f"v1 voice models need HuBERT layer {HUBERT_V1_LAYER}, "
                             f"but this HuBERT has only {config.layers} layers", path)
    gives = config.final_dim if version == "v1" else config.hidden
    if gives != phone_dim:
        raise ModelFileError(f"this HuBERT gives {gives}-dim {version} features, but the voice model needs "
                             f"{phone_dim}-dim ones", path)


# =============================================================================
# 7. RMVPE pitch network
# =============================================================================

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

# The head after the U-Net: a 3-channel conv, then a BiGRU over the (3 x 128 mel) frames
# and a linear layer to the bins. These sizes are fixed in RVC (E2E's defaults).
RMVPE_CNN_CHANNELS = 3
RMVPE_GRU_HIDDEN = 256  # per direction

# The U-Net halves time five times, so the mel is zero-padded to a multiple of 32 frames.
RMVPE_FRAME_MULTIPLE = 32

# Long inputs. The real net's activations take ~0.09 MB per frame: an hour (360,000 frames)
# in one piece would need ~32 GB. Signals longer than RMVPE_MAX_UNCHUNKED_FRAMES run in
# chunks of RMVPE_CHUNK_FRAMES, each with RMVPE_CONTEXT_FRAMES of real signal on both sides
# that is cropped away afterwards. The context covers the receptive field of the real U-Net
# (about ±1590 frames), so in each chunk's core the U-Net output is the whole-signal one;
# only the BiGRU starts 16 s early instead of at the signal's start. Every chunk's window
# (the chunk and its context) is as long as the longest one-piece input, the first and the
# last taking more context on their inner side: the memory for the pitch stops growing
# there, and equal windows reuse each other's freed memory (a shorter first window left
# ~130 MB of heap that the longer ones could not use, measured). Long inputs pay for it
# in time: their pitch costs twice the one-piece computation.
# Chunks and context are multiples of 32 frames so the pooling grid stays aligned.
RMVPE_MAX_UNCHUNKED_FRAMES = 6400  # 64 s (a minute, padded): one piece, exactly as the reference
RMVPE_CONTEXT_FRAMES = 1600  # 16 s each side
RMVPE_CHUNK_FRAMES = RMVPE_MAX_UNCHUNKED_FRAMES - 2 * RMVPE_CONTEXT_FRAMES  # 32 s
# Within a chunk, every level of the U-Net runs RMVPE_PIECE_FRAMES (of its own resolution)
# at a time: a level's convolutions see only a few frames around each output (see
# RMVPEUNet), so pieces with that much context, cropped, give the whole-chunk values. The
# top level's output, the largest, is not even kept for the decoder: it is computed again,
# piece by piece, where the decoder needs it (6 % more work). The mel's STFT runs in pieces
# too. What stays whole per chunk (skips, the BiGRU's input and output) is mapped outside
# the heap from RMVPE_MMAP_THRESHOLD up, so that the heap holds only the pieces, whose sizes
# repeat. Measured over five 64 s windows (130 s of audio): the pitch's peak 925 -> 789 MiB,
# its time 15.0 -> 16.4 s (one run; this machine's noise is 10 %).
RMVPE_PIECE_FRAMES = 512
RMVPE_PIECEWISE_LEVELS = 5  # the top levels that run in pieces: all of RVC's five
RMVPE_MMAP_THRESHOLD = 16 << 20  # bytes; above every piece's blocks (the largest: the top decoder level's 9 MB)
RMVPE_GRU_PIECE_FRAMES = 2048  # the BiGRU's frames at a time (RMVPEBiGRU); 512 would be twice as slow (measured)


# The HTK mel scale in librosa's spelling. It is the scale of coarse pitch (1127 ln(1 + f/700),
# Pitch section), but written as librosa writes it, so that the filterbank below equals
# librosa's to the last bit: 2595 log10 and 1127 ln round differently.
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
    """BatchNorm on the input, then levels of residual blocks, each followed by average
    pooling (channels ×2 per level); RMVPEUNet runs them."""

    def __init__(self, cfg: RMVPEConfig):
        super().__init__()
        self.pool = cfg.kernel_size
        self.bn = _rmvpe_batch_norm(cfg.in_channels)
        widths = [cfg.in_channels] + [cfg.en_out_channels * 2 ** i for i in range(cfg.en_de_layers)]
        self.layers = nn.ModuleList([RMVPEResStack(widths[i], widths[i + 1], cfg.n_blocks)
                                     for i in range(cfg.en_de_layers)])


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
    """Decoder levels, channels ÷2 per level, each joined to the encoder skip of its size;
    RMVPEUNet runs them."""

    def __init__(self, cfg: RMVPEConfig):
        super().__init__()
        bottom = cfg.en_out_channels * 2 ** cfg.en_de_layers
        self.layers = nn.ModuleList([RMVPEDecoderLevel(bottom >> i, bottom >> (i + 1), cfg.kernel_size, cfg.n_blocks)
                                     for i in range(cfg.en_de_layers)])


def in_time_pieces(fn: Callable[..., torch.Tensor], n_frames: int, context: int,
                   inputs: Sequence[tuple[torch.Tensor, int]], out_divisor: int = 1) -> torch.Tensor:
    """fn over (B, C, T, F) tensors, RMVPE_PIECE_FRAMES frames at a time.

    Frames are counted at the finest resolution, n_frames of them: inputs are (tensor,
    divisor) pairs, a tensor holding n_frames // divisor frames on dim 2, and fn's output
    holds n_frames // out_divisor. Each piece gets `context` frames (a multiple of every
    divisor) on both sides, cropped after: equal to fn on the whole when each output frame
    of fn depends only on inputs within `context` frames of it (zero padding at the ends
    of the whole stays).
    """
    out = None
    for start in range(0, n_frames, RMVPE_PIECE_FRAMES):
        stop = min(start + RMVPE_PIECE_FRAMES, n_frames)
        lo, hi = max(0, start - context), min(n_frames, stop + context)
        y = fn(*(x[:, :, lo // d: hi // d] for x, d in inputs))
        y = y[:, :, (start - lo) // out_divisor: (stop - lo) // out_divisor]
        if stop - start == n_frames:
            return y
        if out is None:
            out = y.new_empty(*y.shape[:2], n_frames // out_divisor, *y.shape[3:])
        out[:, :, start // out_divisor: stop // out_divisor] = y
    return out


class RMVPEUNet(nn.Module):
    def __init__(self, cfg: RMVPEConfig):
        super().__init__()
        self.encoder = RMVPEEncoder(cfg)
        self.intermediate = RMVPEIntermediate(cfg)
        self.decoder = RMVPEDecoder(cfg)
        # A level's output frame depends on frames within 2·n_blocks (its 3×3 convolutions)
        # plus 2 (the decoder's transposed conv and the head) of it; even, for the pooling.
        self.context = 2 * (cfg.n_blocks + 2)

    def forward(self, x: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        """(B, C_in, T, 128) -> (B, en_out, T, 128), or head of that; T a multiple of 32.

        The encoder and decoder levels of the top RMVPE_PIECEWISE_LEVELS resolutions run in
        time pieces (in_time_pieces), `head` (a 3×3 conv) with the top decoder level. When
        any level does, the top encoder level's output is not kept: its pooled output goes
        down the U, and the top decoder level's pieces compute it again from the input."""
        x_in = x = self.encoder.bn(x)
        n_frames, pool, top = x.shape[2], self.encoder.pool, self.encoder.layers[0]
        recompute_top = RMVPE_PIECEWISE_LEVELS > 0
        skips: list[torch.Tensor | None] = []  # per level, (B, C, T', F') before pooling, for the decoder
        for level, encode in enumerate(self.encoder.layers):
            if level == 0 and recompute_top:
                x = in_time_pieces(lambda x: F.avg_pool2d(top(x), pool), n_frames, self.context, [(x, 1)],
                                   out_divisor=2)
                skips.append(None)
                continue
            if level < RMVPE_PIECEWISE_LEVELS:
                x = in_time_pieces(encode, x.shape[2], self.context, [(x, 1)])
            else:
                x = encode(x)
            skips.append(x)
            x = F.avg_pool2d(x, pool)
        x = self.intermediate(x)
        for decode, level in zip(self.decoder.layers, reversed(range(len(skips)))):  # from the bottom up
            skip, skips[level] = skips[level], None  # each skip is freed once used
            if level == 0 and recompute_top:
                # the top encoder level's receptive field (2·n_blocks frames) adds to this one's
                def fn(low: torch.Tensor, x_in: torch.Tensor, decode=decode) -> torch.Tensor:
                    y = decode(low, top(x_in))
                    return y if head is None else head(y)
                x = in_time_pieces(fn, n_frames, 2 * self.context, [(x, 2), (x_in, 1)])
                continue
            fn = decode if level or head is None else (lambda low, skip, decode=decode: head(decode(low, skip)))
            if level < RMVPE_PIECEWISE_LEVELS:
                x = in_time_pieces(fn, skip.shape[2], self.context, [(x, 2), (skip, 1)])
            else:
                x = fn(x, skip)
            del skip
        return x


class RMVPEBiGRU(nn.Module):
    """A bidirectional GRU that runs long sequences RMVPE_GRU_PIECE_FRAMES at a time.

    torch's GRU computes the input projections of the whole sequence at once (3·hidden
    values per frame and direction: 40 MB for a 64 s window, with its other whole-sequence
    temporaries). On a CPU each direction instead runs in pieces, its hidden state carried
    from piece to piece (the backward one from the end): the same recurrence, through the
    same kernels, bit for bit (measured), at the same speed. On a GPU the whole sequence
    is one call."""

    def __init__(self, n_in: int, n_hidden: int, n_layers: int):
        super().__init__()
        self.gru = nn.GRU(n_in, n_hidden, num_layers=n_layers, batch_first=True, bidirectional=True)

    def _one_way(self, layer: int, suffix: str) -> nn.GRU:
        """One direction of one layer as a one-layer GRU on the same tensors (not copies)."""
        gru = self.gru
        one = nn.GRU(gru.input_size if layer == 0 else 2 * gru.hidden_size, gru.hidden_size, batch_first=True)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(one, f"{name}_l0", getattr(gru, f"{name}_l{layer}{suffix}"))
        return one

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, n_in) -> (B, T, 2·n_hidden)
        b, t, _ = x.shape
        if t <= RMVPE_GRU_PIECE_FRAMES or x.device.type != "cpu":
            return self.gru(x)[0]
        hidden = self.gru.hidden_size
        for layer in range(self.gru.num_layers):  # (RVC's RMVPE has one)
            out = x.new_empty(b, t, 2 * hidden)  # (B, T, 2·hidden): forward, then backward
            for direction, suffix in enumerate(("", "_reverse")):
                one, h = self._one_way(layer, suffix), None
                starts = range(0, t, RMVPE_GRU_PIECE_FRAMES)
                for start in reversed(starts) if direction else starts:
                    piece = x[:, start: start + RMVPE_GRU_PIECE_FRAMES]
                    y, h = one(piece.flip(1) if direction else piece, h)
                    out[:, start: start + piece.shape[1], direction * hidden: (direction + 1) * hidden] = (
                        y.flip(1) if direction else y)
            x = out
        return x


class RMVPE(nn.Module):
    """RVC's E2E pitch network with its log-mel front-end and decoding.

    The mel filterbank is a plain attribute, not a buffer: it is not in rmvpe.pt, and it
    must stay float32 when the network is cast to half precision.
    """

    def __init__(self, cfg: RMVPEConfig = RMVPEConfig()):
        super().__init__()
        self.cfg = cfg
        self.unet = RMVPEUNet(cfg)
        self.cnn = nn.Conv2d(cfg.en_out_channels, RMVPE_CNN_CHANNELS, 3, padding=1)
        # Dropout(0.25) and Sigmoid follow in the reference Sequential (fc.2, fc.3): neither
        # has weights, dropout is the identity at inference, and forward applies the sigmoid.
        self.fc = nn.Sequential(RMVPEBiGRU(RMVPE_CNN_CHANNELS * RMVPE_N_MELS, RMVPE_GRU_HIDDEN, cfg.n_gru),
                                nn.Linear(2 * RMVPE_GRU_HIDDEN, RMVPE_N_BINS))  # 2: both GRU directions
        self.mel_basis = torch.from_numpy(rmvpe_mel_filterbank())  # (128, 513)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 128, T) log-mel, T a multiple of 32 -> (B, T, 360) salience in (0, 1)."""
        x = self.unet(mel.transpose(1, 2).unsqueeze(1), head=self.cnn)  # (B, 3, T, 128)
        x = x.transpose(1, 2).flatten(2)  # (B, T, 384)
        return torch.sigmoid(self.fc(x))

    @torch.inference_mode()
    def mel(self, audio: Signal, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Frames [start, stop) of the log-mel of the whole signal `audio` (N,): (128, stop - start).

        Frame t is the periodic-Hann-windowed STFT of samples t·HOP ± 512, the signal being
        reflected at its ends (torch.stft center=True). Only the samples a range of frames
        needs are read, and they give exactly those frames of the whole-signal spectrogram.
        """
        n = len(audio)
        if n < 2:
            raise ValueError("RMVPE needs at least 2 samples")
        stop = 1 + n // HOP if stop is None else stop
        if stop - start <= RMVPE_PIECE_FRAMES:
            return self._log_mel(audio, start, stop)
        out = torch.empty(RMVPE_N_MELS, stop - start, device=self.cnn.weight.device)
        for a in range(start, stop, RMVPE_PIECE_FRAMES):  # (the STFT's temporaries: ~10 KB a frame)
            b = min(a + RMVPE_PIECE_FRAMES, stop)
            out[:, a - start: b - start] = self._log_mel(audio, a, b)
        return out

    def _log_mel(self, audio: Signal, start: int, stop: int) -> torch.Tensor:
        """mel() of frames [start, stop) in one piece."""
        device = self.cnn.weight.device
        window = reflect_read(audio, start * HOP - RMVPE_N_FFT // 2, (stop - 1) * HOP + RMVPE_N_FFT // 2)
        samples = torch.from_numpy(np.asarray(window, dtype=np.float32)).to(device)
        spec = torch.stft(samples, RMVPE_N_FFT, HOP, window=torch.hann_window(RMVPE_N_FFT, device=device),
                          center=False, return_complex=True)  # (513, stop - start)
        magnitude = torch.sqrt(spec.real ** 2 + spec.imag ** 2)
        mel = self.mel_basis.to(device) @ magnitude  # (128, stop - start)
        return torch.log(torch.clamp(mel, min=RMVPE_LOG_FLOOR))

    @torch.inference_mode()
    def salience(self, mel: torch.Tensor) -> torch.Tensor:
        """(128, T) float32 log-mel -> (T, 360) float32 salience.

        The mel is zero-padded on the right to a multiple of 32 frames (the reference pads
        with 0, not with the log floor), run in the network's dtype, and cropped back.
        """
        n_frames = mel.shape[-1]
        padded = F.pad(mel, (0, -n_frames % RMVPE_FRAME_MULTIPLE))  # (128, T')
        with blocks_outside_heap(RMVPE_MMAP_THRESHOLD):
            salience = self(padded.unsqueeze(0).to(self.cnn.weight.dtype))  # (1, T', 360)
        return salience[0, :n_frames].float()

    def f0(self, audio16k: Signal, threshold: float = RMVPE_THRESHOLD, *,
           chunk_frames: int | None = None, context_frames: int = RMVPE_CONTEXT_FRAMES,
           progress: Progress | None = None) -> np.ndarray:
        """Pitch of a 16 kHz signal (N,): (1 + N // 160,) float64 Hz, 0 where unvoiced.

        chunk_frames: process this many frames at a time (a multiple of 32), each chunk
        in a window of chunk_frames + 2·context_frames (a multiple of 32) frames of the
        signal around it (where the signal is that long); None = in one piece up to
        RMVPE_MAX_UNCHUNKED_FRAMES, else chunks of RMVPE_CHUNK_FRAMES.
        progress: called ("pitch", done, total) as chunks start and end, when there are several.
        """
        n_frames = 1 + len(audio16k) // HOP
        if chunk_frames is None:
            chunk_frames = n_frames if n_frames <= RMVPE_MAX_UNCHUNKED_FRAMES else RMVPE_CHUNK_FRAMES
        if chunk_frames < n_frames and (chunk_frames <= 0 or context_frames < 0 or chunk_frames % RMVPE_FRAME_MULTIPLE
                                        or context_frames % RMVPE_FRAME_MULTIPLE):
            raise ValueError(f"chunk_frames and context_frames must be multiples of {RMVPE_FRAME_MULTIPLE}")
        f0, starts = [], range(0, n_frames, chunk_frames)
        window = chunk_frames + 2 * context_frames
        last_aligned = (n_frames - window) // RMVPE_FRAME_MULTIPLE * RMVPE_FRAME_MULTIPLE  # the last window's start
        if progress is not None and len(starts) > 1:
            progress("pitch", 0, len(starts))
        for start in starts:
            stop = min(start + chunk_frames, n_frames)
            lo = max(0, min(start - context_frames, last_aligned))
            hi = min(n_frames, max(lo + window, stop + context_frames))  # (the last: up to 31 frames longer)
            salience = self.salience(self.mel(audio16k, lo, hi))[start - lo: stop - lo]  # (stop - start, 360)
            f0.append(decode_salience(salience.cpu().numpy(), threshold))
            if progress is not None and len(starts) > 1:
                progress("pitch", len(f0), len(starts))
        return np.concatenate(f0)


# -----------------------------------------------------------------------------
# 7b. RMVPE loading: rmvpe.pt
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


@blocks_outside_heap()
def load_rmvpe(path: Path) -> RMVPE:
    """Load rmvpe.pt (any E2E size) as a float32 RMVPE in eval mode, refusing anything else."""
    path = Path(path)
    state = load_torch_file(path)
    if not isinstance(state, Mapping):
        raise ModelFileError(f"not an RMVPE model: the file holds a {type(state).__name__}, not a state dict", path)
    cfg = rmvpe_config_from_state(state, path)
    # BatchNorm batch counters are training bookkeeping that some files omit.
    counters = {k.removesuffix("running_mean") + "num_batches_tracked": torch.zeros((), dtype=torch.long)
                for k in state if k.endswith(".running_mean")}
    return load_checked(lambda: RMVPE(cfg), {**counters, **state}, path)


# =============================================================================
# 8. RVC synthesizer
# =============================================================================

# The synthesizer is VITS's inference half as RVC uses it: a text encoder turns content
# features (+ coarse pitch) into a Gaussian prior over a latent z; a normalising flow run
# backwards maps a sample of that prior to the decoder's latent; an NSF-HiFiGAN decoder,
# driven by a sine excitation at the target pitch, turns the latent into a waveform.
# Attribute names reproduce the WebUI's, so its state-dict keys load as they are (after
# fold_weight_norm has turned every weight_g/weight_v pair into a plain `weight`); class
# names carry a Synth prefix and each docstring names the WebUI class it stands for.
#
# Masks: upstream multiplies by a sequence mask x_mask everywhere. We run batch 1 with the
# whole sequence valid, so x_mask is all ones: multiplying by it is the identity and the
# attention's masked_fill touches no element. Dropping the masks is therefore exact.

LRELU_SLOPE = 0.1  # leaky ReLU slope everywhere except before the decoder's last conv
FINAL_LRELU_SLOPE = 0.01  # upstream calls leaky_relu() with torch's default slope there
ATTENTION_WINDOW = 10  # relative-position window of the text encoder's attention
ATTENTION_MASKED = -1e4  # the score of a masked key (training batches are padded)
ATTENTION_QUERY_ROWS = 256  # query frames scored at once: 40 s segments' text encoder +138 -> +76 MB, as fast
LAYER_NORM_EPS = 1e-5
PRIOR_NOISE_SCALE = 0.66666  # scale of the prior sample's noise; upstream's literal constant
FLOW_COUPLINGS = 4  # coupling layers in the flow (each followed by a channel flip)
FLOW_KERNEL_SIZE = 5  # WaveNet kernel inside each coupling layer
FLOW_DILATION_RATE = 1  # WaveNet layer i uses dilation FLOW_DILATION_RATE**i
FLOW_WN_LAYERS = 3  # WaveNet layers inside each coupling layer
DECODER_CONV_KERNEL = 7  # kernel of the decoder's conv_pre and conv_post
# The decoder runs long inputs in chunks of frames, each with context on both sides that is
# dropped afterwards: its activations (about 50 KB per frame each, for 40 kHz) then stay
# bounded, about 13 MB a chunk. The context covers the decoder's receptive field (about 11
# frames for the WebUI's configurations: conv_pre ±3, the first stage's widest resblock ±6,
# the rest ±2). Measured on the v2 40k model: from 8 frames of context on, the chunks give
# the one-piece output bit for bit; 4 frames leave 4e-5. Chunks of 256 frames run as fast
# as chunks of 400 (measured on 40 s segments, bf16: the extra context costs what the
# smaller activations save in cache misses) and hold ~80 MB less at a segment's peak;
# 200 frames hold ~60 MB less again but ran 2-5 % slower.
DECODER_CHUNK_FRAMES = 256
DECODER_CONTEXT_FRAMES = 16
SINE_AMP = 0.1  # amplitude of the NSF sine excitation
NOISE_STD = 0.003  # std of the excitation's additive noise in voiced samples
UNVOICED_NOISE_STD = SINE_AMP / 3  # std of the excitation noise in unvoiced samples
SAMPLE_RATE_NAMES = {"32k": 32000, "40k": 40000, "48k": 48000}


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


@dataclass(frozen=True)
class SynthConfig:
    """The hyper-parameters of the 18-element `config` list that matter at inference.

    The list holds, in order: spec_channels, segment_size, inter_channels, hidden_channels,
    filter_channels, n_heads, n_layers, kernel_size, p_dropout, resblock,
    resblock_kernel_sizes, resblock_dilation_sizes, upsample_rates,
    upsample_initial_channel, upsample_kernel_sizes, spk_embed_dim, gin_channels, sr
    (the synthesizer's constructor arguments; training-only ones are not kept here).
    """

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


def zero_embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table that starts at zero.

    Weights always come from a file, so initial values are placeholders; zeros (unlike
    nn.Embedding's random normal init) are also free to create on the meta device, where
    the loader builds the net (a meta normal_() would import torch._dynamo: seconds).
    """
    return nn.Embedding.from_pretrained(torch.zeros(num, dim), freeze=False)


class SynthLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, T) tensor (parameters gamma/beta)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        x = F.layer_norm(x.transpose(1, -1), self.gamma.shape, self.gamma, self.beta, LAYER_NORM_EPS)
        return x.transpose(1, -1)


def relative_to_absolute(rel: torch.Tensor, window: int, total: int | None = None, start: int = 0) -> torch.Tensor:
    """(B, H, R, 2W+1) values of query rows start..start+R-1 indexed by distance j - i + W
    ->  (B, H, R, total) indexed by key j (total: the number of keys, default R).

    out[..., i, j] = rel[..., i, j - i + W] when |j - i| <= W, else 0. Row i has to move i
    places right: lay the rows out with stride R + 2W + 1 and read them back with a stride
    one shorter (every row then starts one element earlier than the previous one did);
    that band covers keys start - W .. start + R + W - 1, padded or cut to 0 .. total - 1.
    """
    b, h, r, n = rel.shape
    total = r if total is None else total
    flat = F.pad(rel, (0, r)).reshape(b, h, r * (n + r))
    band = flat[..., : r * (n + r - 1)].reshape(b, h, r, n + r - 1)  # (B, H, R, R + 2W)
    return F.pad(band, (start - window, total - start - r - window))  # negative pads cut


def absolute_to_relative(x: torch.Tensor, window: int, start: int = 0) -> torch.Tensor:
    """(B, H, R, T) query rows start..start+R-1 indexed by key j  ->  (B, H, R, 2W+1)
    indexed by j - i + W (the inverse skew).

    out[..., i, r] = x[..., i, i + r - W], zero where that key does not exist.
    """
    b, h, r, t = x.shape
    band = F.pad(x, (window - start, start + r + window - t))  # keys start - W .. start + R + W - 1
    flat = F.pad(band.reshape(b, h, r * (r + 2 * window)), (0, r))
    return flat.reshape(b, h, r, r + 2 * window + 1)[..., : 2 * window + 1]


class SynthAttention(nn.Module):
    """Self-attention with learned relative-position keys and values (window ±W, shared by heads).

    Queries run ATTENTION_QUERY_ROWS at a time: each row's softmax is its own, and the
    (T, T) score matrix of a long segment would not fit (5 200 frames: 216 MB a head).
    """

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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, C, T)
        """mask (B, 1, T, T): 0 where a query may not see a key (a batch's padding, in training)."""
        b, c, t = x.shape
        q = self._heads(self.conv_q(x)) / math.sqrt(self.head_dim)  # (B, H, T, D), pre-scaled
        k, v = self._heads(self.conv_k(x)), self._heads(self.conv_v(x))
        out = torch.empty_like(q)  # (B, H, T, D)
        for start in range(0, t, ATTENTION_QUERY_ROWS):
            rows = q[:, :, start: start + ATTENTION_QUERY_ROWS]  # (B, H, R, D)
            stop = start + rows.shape[2]
            scores = rows @ k.transpose(-2, -1)  # (B, H, R, T)
            # The relative terms touch only the keys within ±W of these rows: work on that band.
            lo, hi = max(0, start - self.window), min(t, stop + self.window)
            scores[..., lo:hi] += relative_to_absolute(rows @ self.emb_rel_k.transpose(-2, -1), self.window,
                                                       hi - lo, start - lo)
            if mask is not None:
                scores = scores.masked_fill(mask[:, :, start:stop] == 0, ATTENTION_MASKED)
            p = F.softmax(scores, dim=-1)
            del scores
            out[:, :, start:stop] = p @ v + absolute_to_relative(p[..., lo:hi], self.window, start - lo) @ self.emb_rel_v
        return self.conv_o(out.transpose(2, 3).reshape(b, c, t))


class SynthFFN(nn.Module):
    """Two 'same'-padded convolutions with a ReLU between them."""

    def __init__(self, channels: int, filter_channels: int, kernel_size: int):
        super().__init__()
        self.pad = ((kernel_size - 1) // 2, kernel_size // 2)
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, C, T)
        if mask is None:
            x = torch.relu(self.conv_1(F.pad(x, self.pad)))  # (B, filter, T)
            return self.conv_2(F.pad(x, self.pad))
        x = torch.relu(self.conv_1(F.pad(x * mask, self.pad)))  # mask (B, 1, T): 0 on padding
        return self.conv_2(F.pad(x * mask, self.pad)) * mask


class SynthTransformer(nn.Module):
    """Post-LN transformer (the WebUI's attentions.Encoder): per layer
    x = LN(x + attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, channels: int, filter_channels: int, n_heads: int, n_layers: int, kernel_size: int):
        super().__init__()
        self.attn_layers = nn.ModuleList(SynthAttention(channels, n_heads) for _ in range(n_layers))
        self.norm_layers_1 = nn.ModuleList(SynthLayerNorm(channels) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(SynthFFN(channels, filter_channels, kernel_size) for _ in range(n_layers))
        self.norm_layers_2 = nn.ModuleList(SynthLayerNorm(channels) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, C, T)
        """mask (B, 1, T): 1 on the frames of each item of a padded batch (training), else None."""
        attn_mask = None if mask is None else mask.unsqueeze(2) * mask.unsqueeze(-1)  # (B, 1, T, T)
        x = x if mask is None else x * mask
        for attn, norm_1, ffn, norm_2 in zip(self.attn_layers, self.norm_layers_1,
                                             self.ffn_layers, self.norm_layers_2):
            x = norm_1(x + attn(x, attn_mask))
            x = norm_2(x + ffn(x, mask))
        return x if mask is None else x * mask


class SynthTextEncoder(nn.Module):
    """The WebUI's TextEncoder: content features (+ coarse pitch) -> prior mean m_p and
    log-std logs_p of z."""

    def __init__(self, cfg: SynthConfig, phone_dim: int, has_f0: bool):
        super().__init__()
        self.hidden = cfg.hidden_channels
        self.emb_phone = nn.Linear(phone_dim, cfg.hidden_channels)
        self.emb_pitch = zero_embedding(F0_COARSE_BINS, cfg.hidden_channels) if has_f0 else None
        self.encoder = SynthTransformer(cfg.hidden_channels, cfg.filter_channels, cfg.n_heads, cfg.n_layers,
                                        cfg.kernel_size)
        self.proj = nn.Conv1d(cfg.hidden_channels, 2 * cfg.inter_channels, 1)

    def forward(self, phone: torch.Tensor, pitch: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mask (B, 1, T): 1 on each item's frames of a padded (training) batch."""
        x = self.emb_phone(phone)  # (B, T, hidden)
        if self.emb_pitch is not None:
            x = x + self.emb_pitch(pitch)
        x = F.leaky_relu(x * math.sqrt(self.hidden), LRELU_SLOPE)
        x = self.encoder(x.transpose(1, 2), mask)  # (B, hidden, T)
        stats = self.proj(x) if mask is None else self.proj(x) * mask
        m_p, logs_p = stats.chunk(2, dim=1)  # (B, inter, T) each
        return m_p, logs_p


class SynthWaveNet(nn.Module):
    """The WebUI's WN: gated dilated convs conditioned on the speaker, summed skip outputs."""

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

    def forward(self, x: torch.Tensor, g: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:  # x (B, H, T), g (B, gin, 1), mask (B, 1, T)
        h = self.hidden
        cond = self.cond_layer(g)  # (B, 2H*layers, 1), broadcast over time
        out = torch.zeros_like(x)
        for i, (in_layer, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            gates = in_layer(x) + cond[:, 2 * h * i: 2 * h * (i + 1)]  # (B, 2H, T)
            acts = torch.tanh(gates[:, :h]) * torch.sigmoid(gates[:, h:])
            res_and_skip = res_skip(acts)  # (B, 2H, T), the last layer's (B, H, T) is all skip
            if i < len(self.in_layers) - 1:
                x = x + res_and_skip[:, :h] if mask is None else (x + res_and_skip[:, :h]) * mask
                out = out + res_and_skip[:, h:]
            else:
                out = out + res_and_skip
        return out if mask is None else out * mask  # (B, H, T)


class SynthCouplingLayer(nn.Module):
    """The WebUI's ResidualCouplingLayer (mean only): the second half of the channels is
    shifted by a function of the first."""

    def __init__(self, channels: int, hidden: int, gin_channels: int):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = SynthWaveNet(hidden, FLOW_KERNEL_SIZE, FLOW_DILATION_RATE, FLOW_WN_LAYERS, gin_channels)
        self.post = nn.Conv1d(hidden, self.half, 1)

    def reverse(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        x0, x1 = x.split(self.half, dim=1)  # (B, C/2, T) each
        shift = self.post(self.enc(self.pre(x0), g))  # mean only: the log-scale is 0
        return torch.cat([x0, x1 - shift], dim=1)

    def forward(self, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The training direction, on a padded batch (mask (B, 1, T))."""
        x0, x1 = x.split(self.half, dim=1)
        shift = self.post(self.enc(self.pre(x0) * mask, g, mask)) * mask
        return torch.cat([x0, shift + x1 * mask], dim=1)


class SynthFlip(nn.Module):
    """The WebUI's Flip: reverse the channel order (its own inverse)."""

    def reverse(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, [1])

    def forward(self, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, [1])


class SynthFlow(nn.Module):
    """The WebUI's ResidualCouplingBlock: [coupling, flip] x FLOW_COUPLINGS; reverse() samples,
    forward() (training) maps the posterior to the prior."""

    def __init__(self, cfg: SynthConfig):
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(FLOW_COUPLINGS):
            self.flows.append(SynthCouplingLayer(cfg.inter_channels, cfg.hidden_channels, cfg.gin_channels))
            self.flows.append(SynthFlip())

    def reverse(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # (B, inter, T)
        for flow in reversed(self.flows):
            x = flow.reverse(x, g)
        return x

    def forward(self, x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The training direction: the posterior's z to the prior's z_p."""
        for flow in self.flows:
            x = flow(x, g, mask)
        return x


def conv1d_one_channel(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """conv(x) for a one-channel x (B, 1, N), as the matrix product of the weights with x's
    windows: oneDNN's direct convolution is slow for a single input channel (about 0.5 s
    per 10 s of 40 kHz audio for each of the decoder's noise_convs; this takes milliseconds)."""
    (kernel,), (stride,), (padding,) = conv.kernel_size, conv.stride, conv.padding
    windows = F.pad(x[:, 0], (padding, padding)).unfold(-1, kernel, stride)  # (B, L, kernel)
    y = conv.weight[:, 0] @ windows.transpose(1, 2)  # (C, kernel) @ (B, kernel, L) -> (B, C, L)
    return y if conv.bias is None else y + conv.bias[:, None]


def conv_transpose1d_gemm(x: torch.Tensor, up: nn.ConvTranspose1d) -> torch.Tensor:
    """up(x) as one matrix product and an overlap-add (F.fold): every input sample times the
    (C_out x kernel) weights, the products laid `stride` apart and summed. oneDNN's transposed
    convolution runs at a tenth of the matrix product's speed here."""
    c_in, c_out, kernel = up.weight.shape
    (stride,), (padding,), (output_padding,) = up.stride, up.padding, up.output_padding
    if output_padding > padding or up.dilation[0] != 1 or up.groups != 1:
        return up(x)  # the crop below would need samples the overlap-add does not make
    n = x.shape[-1]
    cols = up.weight.reshape(c_in, c_out * kernel).T @ x  # (B, C_out*kernel, N)
    full = (n - 1) * stride + kernel
    y = F.fold(cols, output_size=(1, full), kernel_size=(1, kernel), stride=(1, stride))  # (B, C_out, 1, full)
    n_out = (n - 1) * stride - 2 * padding + kernel + output_padding
    y = y[:, :, 0, padding: padding + n_out]
    return y if up.bias is None else y + up.bias[:, None]


class LowPrecisionConv1d(nn.Module):
    """A trained Conv1d computed in bf16 (or fp16) by oneDNN's low-precision convolution,
    which multiplies in bf16 and accumulates in fp32. It takes any dtype and returns its
    own; adding that to an fp32 tensor gives fp32, so a residual stream around it keeps
    full precision. oneDNN builds a kernel per input length, about a millisecond each
    (measured): the primitive cache (configure_onednn_cache) keeps the decoder chunks' few."""

    def __init__(self, conv: nn.Conv1d, dtype: torch.dtype):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("weight", conv.weight.detach().to(dtype), persistent=False)  # (C_out, C_in, K)
        bias = None if conv.bias is None else conv.bias.detach().to(dtype)
        self.register_buffer("bias", bias, persistent=False)  # (C_out,) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, L) -> (B, C_out, L')
        return F.conv1d(x.to(self.weight.dtype), self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class SynthResBlock(nn.Module):
    """HiFi-GAN's ResBlock1: per dilation d, x += conv(lrelu(conv_d(lrelu(x))))."""

    compute_dtype: torch.dtype | None = None  # the convolutions' dtype when it is not x's (bf16 on a CPU)

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                              padding=d * (kernel_size - 1) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2)
                                    for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, L)
        # In place where the tensor is this block's own: the same values with less memory
        # traffic. (In low precision the convs return bf16 and x stays fp32.)
        for i, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2)):
            residual = conv2(F.leaky_relu_(conv1(self._activated(x)), LRELU_SLOPE))
            in_place = i > 0 and not torch.is_grad_enabled()  # (autograd keeps x for the next activation)
            x = x.add_(residual) if in_place else x + residual  # the first x is the caller's
        return x

    def _activated(self, x: torch.Tensor) -> torch.Tensor:
        """lrelu(x), in the convolutions' dtype: cast first, then activated in place, which
        moves half the bytes of activating in fp32 and then casting."""
        if self.compute_dtype is None or self.compute_dtype == x.dtype:
            return F.leaky_relu(x, LRELU_SLOPE)
        return F.leaky_relu_(x.to(self.compute_dtype), LRELU_SLOPE)


class SynthSineGen(nn.Module):
    """The WebUI's SineGen: sine excitation at F0 (harmonic_num 0), the 2026 WebUI algorithm (the original
    cumulative-sum one; the classic branch switched to an fmod-based variant in 2024-11).

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
        # Per-sample tensors are a segment long (6.4 MB for 40 s at 40 kHz): each is made
        # once and then changed in place, which gives the same values as the reference's
        # chain of new tensors (bit for bit) with less memory (40 s: +80 -> +49 MB).
        f0 = f0.float().unsqueeze(-1)  # (B, T, 1)
        rad = (f0 / self.sample_rate) % 1  # phase increment per sample, in cycles
        frame_phase = torch.cumsum(rad, dim=1) * upp  # (B, T, 1) phase at each frame's end
        phase = F.interpolate(frame_phase.transpose(1, 2), scale_factor=float(upp), mode="linear",
                              align_corners=True).transpose(1, 2).remainder_(1)  # (B, T*upp, 1)
        wrapped = phase[:, 1:] < phase[:, :-1]  # the interpolated phase wrapped here (a - b < 0)
        del phase
        rad = torch.repeat_interleave(rad, upp, dim=1)  # (B, T*upp, 1)
        rad[:, 1:] -= wrapped.to(rad.dtype)  # the wrap-arounds moved onto the increments
        del wrapped
        sine = torch.cumsum(rad, dim=1)
        del rad
        sine.mul_(2 * math.pi).sin_().mul_(SINE_AMP)
        voiced = torch.repeat_interleave(f0 > 0, upp, dim=1)  # (B, T*upp, 1) voiced flag per sample
        excitation = sine.mul_(voiced)
        if noise is not None:
            excitation += torch.where(voiced, NOISE_STD, UNVOICED_NOISE_STD).to(excitation.dtype).mul_(noise)
        return excitation  # (B, T*upp, 1)


class SynthSource(nn.Module):
    """The WebUI's SourceModuleHnNSF: the sine excitation through a 1->1 linear layer and tanh."""

    def __init__(self, sample_rate: int):
        super().__init__()
        self.l_sin_gen = SynthSineGen(sample_rate)
        self.l_linear = nn.Linear(1, 1)

    def forward(self, f0: torch.Tensor, upp: int, noise: torch.Tensor | None) -> torch.Tensor:
        sine = self.l_sin_gen(f0, upp, noise).to(self.l_linear.weight.dtype)  # (B, T*upp, 1)
        return torch.tanh_(self.l_linear(sine)).transpose(1, 2)  # (B, 1, T*upp)


class SynthDecoder(nn.Module):
    """The WebUI's Generator (HiFi-GAN); with `nsf` its GeneratorNSF, which adds the pitch
    excitation at every upsampling stage."""

    def __init__(self, cfg: SynthConfig, nsf: bool):
        super().__init__()
        rates, n_kernels = cfg.upsample_rates, len(cfg.resblock_kernel_sizes)
        channels = [cfg.upsample_initial_channel >> i for i in range(len(rates) + 1)]  # halved per stage
        self.hop, self.n_kernels = cfg.hop, n_kernels
        # (registration order = the WebUI's, so state_dict() lists keys in the same order)
        self.m_source = SynthSource(cfg.sample_rate) if nsf else None
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
            SynthResBlock(channels[i + 1], k, d) for i in range(len(rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(channels[-1], 1, DECODER_CONV_KERNEL, padding=DECODER_CONV_KERNEL // 2,
                                   bias=False)
        self.cond = nn.Conv1d(cfg.gin_channels, channels[0], 1)

    def forward(self, z: torch.Tensor, g: torch.Tensor, f0: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, keep: tuple[int, int] | None = None) -> torch.Tensor:
        """z (B, inter, T), g (B, gin, 1), f0 (B, T) Hz for NSF, noise (B, T*hop, 1) or None
        -> (B, 1, T*hop) audio; with keep = (first, last), only frames first..last-1's audio.

        Chunks of DECODER_CHUNK_FRAMES with DECODER_CONTEXT_FRAMES of context on both sides
        give the one-piece samples (bit-identical from 8 frames of context, measured), so
        frames nobody keeps (the segment's padding, trimmed after) need not be decoded.
        """
        # The excitation's phase is a running sum over the whole signal: made in one piece.
        source = self.m_source(f0, self.hop, noise) if self.m_source is not None else None  # (B, 1, T*hop)
        x = self.conv_pre(z) + self.cond(g)  # (B, C0, T)
        n_frames, hop = x.shape[-1], self.hop
        first, last = (0, n_frames) if keep is None else keep
        if keep is None and n_frames <= DECODER_CHUNK_FRAMES + 2 * DECODER_CONTEXT_FRAMES:
            return self._upsample(x, source)
        out = x.new_empty(x.shape[0], 1, max(0, last - first) * hop)
        for start in range(first, last, DECODER_CHUNK_FRAMES):
            stop = min(start + DECODER_CHUNK_FRAMES, last)
            lo, hi = max(0, start - DECODER_CONTEXT_FRAMES), min(n_frames, stop + DECODER_CONTEXT_FRAMES)
            chunk = self._upsample(x[:, :, lo:hi], None if source is None else source[:, :, lo * hop: hi * hop])
            out[:, :, (start - first) * hop: (stop - first) * hop] = chunk[:, :, (start - lo) * hop: (stop - lo) * hop]
        return out

    def _upsample(self, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """The stages and conv_post on frames x (B, C0, T) and their excitation (B, 1, T*hop)."""
        for i, up in enumerate(self.ups):
            x = conv_transpose1d_gemm(F.leaky_relu(x, LRELU_SLOPE), up)  # (B, C_i, T * prod(rates[:i+1]))
            if source is not None:
                x = x + conv1d_one_channel(source, self.noise_convs[i])
            blocks = self.resblocks[i * self.n_kernels: (i + 1) * self.n_kernels]
            total = blocks[0](x)  # the blocks' mean, summed in place in the same order
            if torch.is_grad_enabled():  # (training: autograd keeps what in-place sums would change)
                for block in blocks[1:]:
                    total = total + block(x)
                x = total / self.n_kernels
                continue
            for block in blocks[1:]:
                total.add_(block(x))
            x = total.div_(self.n_kernels)
        return torch.tanh(self.conv_post(F.leaky_relu(x, FINAL_LRELU_SLOPE)))  # (B, 1, T*hop)


def standard_normal(shape: Sequence[int], like: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) noise drawn in float32 (on the rng's device), then moved to `like`."""
    device = rng.device if rng is not None else like.device
    noise = torch.randn(tuple(shape), generator=rng, device=device, dtype=torch.float32)
    return noise.to(like.device, like.dtype)


class Synthesizer(nn.Module):
    """RVC's SynthesizerTrnMs{256,768}NSFsid[_nono], inference only (no posterior encoder enc_q)."""

    def with_low_precision(self, dtype: torch.dtype) -> "Synthesizer":
        """This net with the decoder's residual blocks (about 93 % of the work) computed in
        `dtype`; the rest (text encoder, flow, upsampling, excitation, conv_post) and every
        sum between layers stay fp32. All-bf16 gives about 30 dB SNR against fp32; this
        keeps 40+ dB. The new net shares every other weight with this one, which is unchanged."""
        def shallow(module: nn.Module) -> nn.Module:  # a copy whose submodules can be replaced
            clone = copy.copy(module)
            clone._modules = dict(module._modules)
            return clone

        blocks = []
        for block in self.dec.resblocks:
            block = shallow(block)
            block.compute_dtype = dtype
            block.convs1 = nn.ModuleList(LowPrecisionConv1d(conv, dtype) for conv in block.convs1)
            block.convs2 = nn.ModuleList(LowPrecisionConv1d(conv, dtype) for conv in block.convs2)
            blocks.append(block)
        decoder = shallow(self.dec)
        decoder.resblocks = nn.ModuleList(blocks)
        net = shallow(self)
        net.dec = decoder
        return net

    def __init__(self, cfg: SynthConfig, phone_dim: int, has_f0: bool, n_speakers: int):
        super().__init__()
        self.cfg, self.phone_dim, self.has_f0, self.n_speakers = cfg, phone_dim, has_f0, n_speakers
        self.enc_p = SynthTextEncoder(cfg, phone_dim, has_f0)
        self.dec = SynthDecoder(cfg, nsf=has_f0)
        self.flow = SynthFlow(cfg)
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
                     sid: torch.Tensor, *, noise: bool = True, rng: torch.Generator | None = None,
                     keep: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """infer(), also returning the intermediate stages m_p, logs_p and z (the decoder input).

        noise=False drops the two random terms (prior noise, excitation noise): deterministic.
        With noise, every random number comes from `rng` when one is given. keep: only the
        audio of frames keep[0]..keep[1]-1 is decoded and returned (the random numbers drawn
        are the same).
        """
        self._check_inputs(phone, pitch, nsff0, sid)
        weight = self.emb_g.weight
        g = self.emb_g(sid.reshape(1).to(weight.device)).unsqueeze(-1)  # (1, gin, 1)
        m_p, logs_p = self.enc_p(phone.to(weight.device, weight.dtype),
                                 pitch.to(weight.device) if self.has_f0 else None)  # (1, inter, T) each
        z_p = m_p  # the prior's mean, or a sample from it:
        if noise:
            z_p = m_p + torch.exp(logs_p) * standard_normal(m_p.shape, m_p, rng) * PRIOR_NOISE_SCALE
        z = self.flow.reverse(z_p, g)  # (1, inter, T)
        if self.has_f0:
            f0 = nsff0.to(weight.device, torch.float32)  # (1, T) Hz
            excitation_noise = None
            if noise:
                excitation_noise = standard_normal((1, f0.shape[1] * self.hop, 1), f0, rng)
            out = self.dec(z, g, f0, excitation_noise, keep=keep)
        else:
            out = self.dec(z, g, keep=keep)
        return {"m_p": m_p, "logs_p": logs_p, "z": z, "out": out[:, 0].float()}  # out (1, T*hop)

    def infer(self, phone: torch.Tensor, pitch: torch.Tensor | None, nsff0: torch.Tensor | None,
              sid: torch.Tensor, *, noise: bool = True, rng: torch.Generator | None = None,
              keep: tuple[int, int] | None = None) -> torch.Tensor:
        """Content features (1, T, D), coarse pitch (1, T), F0 in Hz (1, T), speaker (1,) -> audio (1, T*hop)
        (with keep = (first, last): the audio of those frames only)."""
        return self.infer_stages(phone, pitch, nsff0, sid, noise=noise, rng=rng, keep=keep)["out"]


# -----------------------------------------------------------------------------
# 8b. Voice model loading: WebUI .pth files
# -----------------------------------------------------------------------------

# A voice model file is a torch.save'd dict: `weight` (the synthesizer's state dict without the
# training-only posterior encoder enc_q, usually fp16, weight norm as weight_g/weight_v
# pairs), `config` (18 constructor arguments), `info`, `sr`, `f0`, `version`, plus extra
# keys from forks such as Applio. The architecture is read from the tensors themselves
# (phone dim, pitch embedding, speaker table); `version`/`f0` only get a warning when they
# disagree. Training checkpoints (G_*.pth) are refused rather than extracted on the fly:
# they carry no config, and guessing the upsample rates from shapes would be fragile.

PHONE_DIM_VERSIONS = {dim: version for version, dim in VERSION_PHONE_DIMS.items()}
SUPPORTED_VOCODER = "HiFi-GAN"  # Applio's name for RVC's own (NSF-)HiFi-GAN decoder
# Tensor-name prefixes of Applio's other decoders, which this file does not implement.
FOREIGN_DECODER_PREFIXES = {
    "MRF HiFi-GAN": ("dec.upsamples.", "dec.mrfs."),
    "RefineGAN": ("dec.downsample_blocks.", "dec.upsample_blocks.", "dec.pre_conv.", "dec.mel_conv."),
}
# Extra keys Applio writes beside the WebUI's; reported as metadata when present.
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


def _read_voice_checkpoint(path: Path) -> Mapping[str, Any]:
    """The file's dict, once it is known to hold a voice model's `weight` dict of tensors."""
    try:
        ckpt = load_torch_file(path)
    except ModelFileError as exc:
        if exc.message.startswith("unsafe") and _is_fairseq_checkpoint(path):
            raise ModelFileError("not a voice model: this is a fairseq checkpoint "
                                 "(a HuBERT/ContentVec content encoder such as hubert_base.pt?)", path) from exc
        raise
    if not isinstance(ckpt, Mapping):
        raise ModelFileError(f"not a voice model: the file holds a {type(ckpt).__name__}, not a dict", path)
    if "weight" not in ckpt:
        model = ckpt.get("model")
        keys = [str(k) for k in (model if isinstance(model, Mapping) else ckpt)]
        if any(k.startswith("discriminators.") for k in keys):
            raise ModelFileError("discriminator checkpoint (D_*.pth), not a voice model", path)
        if any(k.startswith(("enc_p.", "flow.", "dec.")) for k in keys):
            raise ModelFileError("this is a training checkpoint (G_*.pth), not a voice model; extract the small "
                                 f"model first: --extract_model {path} NAME", path)
        raise ModelFileError(f"not a voice model: it has no 'weight' state dict{_guess_contents(keys)}", path)
    weight = ckpt["weight"]
    if not isinstance(weight, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weight.items()):
        raise ModelFileError("not a voice model: 'weight' is not a dict of named tensors", path)
    return ckpt


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


def _warn_on_disagreement(ckpt: Mapping[str, Any], version: str, has_f0: bool, path: Path, warn: Warn) -> None:
    """The weights decide; a contradicting `version`/`f0` key is worth a warning, and so is an
    embedder other than ContentVec (the content encoder must match the one used in training)."""
    declared = ckpt.get("version")
    if declared is not None and declared != version:
        warn(f"{path.name}: the file says version {declared!r}, but its weights take "
             f"{VERSION_PHONE_DIMS[version]}-d content features; using {version}")
    f0 = ckpt.get("f0")
    if f0 is not None and (str(f0).lower() in ("1", "true")) != has_f0:  # 1/0 (WebUI), True/False (Applio)
        warn(f"{path.name}: the file says f0={f0!r}, but its weights are those of a model "
             f"{'with' if has_f0 else 'without'} pitch; using them as such")
    embedder = ckpt.get("embedder_model")
    if embedder not in CONTENTVEC_EMBEDDERS:
        warn(f"{path.name}: this model was trained with the {embedder!r} content encoder; "
             "it needs that encoder's HuBERT weights, ContentVec (hubert_base.pt) will sound poor")


def _json_safe(value: Any) -> Any:
    """A value for the --json report: as it is when JSON can hold it, else its str()."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


@blocks_outside_heap()
def load_voice_model(path: Path, warn: Warn = print_warning) -> VoiceModel:
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
                             f"expected {' or '.join(f'{d} ({v})' for v, d in VERSION_PHONE_DIMS.items())}", path)
    version = PHONE_DIM_VERSIONS[phone_dim]
    has_f0 = "enc_p.emb_pitch.weight" in weight
    n_speakers = _matrix(weight, "emb_g.weight", path).shape[0]  # config[15] is stale: upstream rule
    _warn_on_disagreement(ckpt, version, has_f0, path, warn)

    try:
        state = fold_weight_norm(weight)
    except KeyError as exc:
        raise ModelFileError(f"missing tensor {exc.args[0]!r} (other half of a weight-norm pair)", path) from exc
    net = load_checked(lambda: Synthesizer(cfg, phone_dim, has_f0, n_speakers), state, path,
                       ignore=[k for k in state if k.startswith("enc_q.")])
    for key, value in net.state_dict().items():
        if not _all_finite(value):
            raise ModelFileError(f"tensor {key!r} has non-finite values (NaN or infinity)", path)

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


# =============================================================================
# 9. Pitch
# =============================================================================

FRAME_PERIOD_MS = 1000.0 * HOP / SAMPLE_RATE  # 10 ms
PM_VOICING_THRESHOLD = 0.6  # Praat's autocorrelation voicing threshold used by RVC
CREPE_PERIODICITY_THRESHOLD = 0.1  # crepe frames less periodic than this are unvoiced
CREPE_BATCH = 512
HARVEST_MEDIAN = 3  # harvest's median filter kernel; filter_radius > 2 only switches it on
F0_BLOCK_FRAMES = 6000  # WORLD estimators run on 60 s blocks of long inputs (see in_blocks)
F0_BLOCK_CONTEXT = 300  # frames (3 s) of signal on each side of a block, discarded after
F0_BLOCK_WORKERS = 4  # blocks estimated at once, at most (harvest: ~0.5 GB each)


def _import_torchcrepe() -> Any:
    """torchcrepe imports torchaudio only to read files, which we never ask it to do.

    Where torchaudio is missing or does not match the installed torch (a common pip
    state), a placeholder module lets torchcrepe import; its file loader is unused.
    """
    import importlib
    import types

    try:
        return importlib.import_module("torchcrepe")
    except (ImportError, OSError) as exc:
        if "torchaudio" not in repr(exc) and "torchaudio" not in str(getattr(exc, "__cause__", "")):
            raise ImportError(str(exc)) from exc
    for name in [m for m in sys.modules if m == "torchcrepe" or m.startswith(("torchcrepe.", "torchaudio"))]:
        del sys.modules[name]
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")  # placeholder: torchcrepe.load.audio is unused
    return importlib.import_module("torchcrepe")


def _import_optional(method: str) -> Any:
    module_name, package = F0_OPTIONAL_PACKAGES[method]
    import importlib

    try:
        if method == "crepe":
            return _import_torchcrepe()
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--f0_method {method} needs the optional package {package}: pip install {package}",
                         "--f0_method") from exc


def in_blocks(estimate: Callable[[np.ndarray], np.ndarray], x: Signal,
              block_frames: int = F0_BLOCK_FRAMES, context_frames: int = F0_BLOCK_CONTEXT,
              workers: int | None = None, progress: Progress | None = None) -> np.ndarray:
    """Run a 10 ms-frame F0 estimator over a long signal block by block.

    WORLD's estimators work on the whole signal at once, with memory that grows faster
    than its length (harvest: ~0.1 GB for 30 s, ~0.9 GB for 120 s), so an hour would not fit.
    Each block is estimated with `context_frames` of signal on both sides, which are then
    dropped; frame k of a block starting at frame `lo` is frame lo + k of the whole.
    Signals up to one block (plus context) run in one piece, exactly as the reference.

    WORLD releases the GIL, so blocks run on `workers` threads (default: torch's thread
    count, at most F0_BLOCK_WORKERS, which bounds memory); the result does not depend on it.
    """
    from concurrent.futures import ThreadPoolExecutor

    n_frames = len(x) // HOP + 1
    if n_frames <= block_frames + 2 * context_frames:
        return estimate(np.asarray(x))
    starts = range(0, n_frames, block_frames)

    def block(start: int) -> np.ndarray:
        lo, hi = max(0, start - context_frames), min(n_frames, start + block_frames + context_frames)
        return estimate(x[lo * HOP: hi * HOP])[start - lo: start - lo + min(block_frames, n_frames - start)]

    workers = workers or min(F0_BLOCK_WORKERS, torch.get_num_threads())
    parts = []
    pool = ThreadPoolExecutor(max(1, min(workers, len(starts))))
    if progress is not None:
        progress("pitch", 0, len(starts))
    try:
        for f0 in pool.map(block, starts):  # in order
            parts.append(f0)
            if progress is not None:
                progress("pitch", len(parts), len(starts))
    finally:  # on an interrupt, do not wait for the blocks still queued
        pool.shutdown(wait=False, cancel_futures=True)
    return np.concatenate(parts)


def _import_pyworld() -> Any:
    with quiet_library_warnings():  # pyworld 0.3.5 imports the deprecated pkg_resources
        import pyworld
    return pyworld


def world_f0(algorithm: str) -> Callable[[np.ndarray], np.ndarray]:
    """WORLD's `algorithm` ("harvest" or "dio") followed by stonemask refinement, as a
    function of one 16 kHz signal (or block of one) to its 10 ms-frame F0 in Hz."""
    pyworld = _import_pyworld()
    estimate = getattr(pyworld, algorithm)

    def f0(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64)
        raw, times = estimate(x, fs=SAMPLE_RATE, f0_ceil=F0_MAX, f0_floor=F0_MIN, frame_period=FRAME_PERIOD_MS)
        return pyworld.stonemask(x, raw, times, SAMPLE_RATE)

    return f0


def f0_harvest(x: Signal, filter_radius: int, progress: Progress | None = None) -> np.ndarray:
    """WORLD harvest + stonemask refinement (the classic WebUI's); median-filtered (kernel 3)
    when filter_radius > 2."""
    from scipy.signal import medfilt

    f0 = in_blocks(world_f0("harvest"), x, progress=progress)
    if filter_radius > 2:
        f0 = medfilt(f0, HARVEST_MEDIAN)
    return f0


def f0_dio(x: Signal, progress: Progress | None = None) -> np.ndarray:
    """WORLD dio + stonemask (the classic WebUI's fast estimator, used in training)."""
    return in_blocks(world_f0("dio"), x, progress=progress)


def f0_pm(x: Signal, p_len: int) -> np.ndarray:
    """Praat autocorrelation pitch (parselmouth's to_pitch_ac), zero-padded on both sides
    to p_len frames as the reference does."""
    parselmouth = _import_optional("pm")
    pitch = parselmouth.Sound(np.asarray(x, dtype=np.float64), SAMPLE_RATE).to_pitch_ac(
        time_step=FRAME_PERIOD_MS / 1000, voicing_threshold=PM_VOICING_THRESHOLD,
        pitch_floor=F0_MIN, pitch_ceiling=F0_MAX)
    f0 = pitch.selected_array["frequency"]
    pad = (p_len - len(f0) + 1) // 2
    if pad > 0 or p_len - len(f0) - pad > 0:
        f0 = np.pad(f0, [[pad, p_len - len(f0) - pad]], mode="constant")
    return f0


def f0_crepe(x: Signal, device: torch.device) -> np.ndarray:
    """CREPE 'full' via torchcrepe, as the classic WebUI: periodicity median-filtered and
    pitch mean-filtered (3 frames each), frames of periodicity < 0.1 unvoiced."""
    torchcrepe = _import_optional("crepe")
    audio = torch.from_numpy(np.asarray(x, dtype=np.float32))[None].to(device)  # (1, N)
    f0, periodicity = torchcrepe.predict(audio, SAMPLE_RATE, HOP, F0_MIN, F0_MAX, "full",
                                         batch_size=CREPE_BATCH, device=device, return_periodicity=True)
    periodicity = torchcrepe.filter.median(periodicity, 3)
    f0 = torchcrepe.filter.mean(f0, 3)
    f0[periodicity < CREPE_PERIODICITY_THRESHOLD] = 0
    return f0[0].cpu().numpy()


def interpolate_unvoiced(f0: np.ndarray) -> np.ndarray:
    """The 2026 WebUI's option: fill unvoiced frames by linear interpolation between their
    voiced neighbours (and the nearest voiced value beyond the first and last)."""
    voiced = f0 > 0
    if not voiced.any():
        return f0
    frames = np.arange(len(f0))
    out = f0.copy()
    out[~voiced] = np.interp(frames[~voiced], frames[voiced], f0[voiced])
    return out


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray | float:
    """The mel scale of the reference's coarse pitch: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log(1.0 + hz / 700.0)


# The pitch range, in mel, is spread linearly over coarse bins 2..255.
F0_MEL_MIN, F0_MEL_MAX = float(hz_to_mel(F0_MIN)), float(hz_to_mel(F0_MAX))  # ~77.755, ~1064.408


def coarse_pitch(f0: np.ndarray) -> np.ndarray:
    """Hz to the 1..255 mel-scale bins the text encoder embeds (1 = unvoiced), rounded
    half to even as numpy's rint (the reference's np.rint)."""
    mel = hz_to_mel(f0)
    voiced = mel > 0
    mel[voiced] = (mel[voiced] - F0_MEL_MIN) * (F0_COARSE_BINS - 2) / (F0_MEL_MAX - F0_MEL_MIN) + 1
    mel[mel <= 1] = 1
    mel[mel > F0_COARSE_BINS - 1] = F0_COARSE_BINS - 1
    return np.rint(mel).astype(np.int32)


def estimate_f0(audio_pad: Signal, p_len: int, method: str, *, f0_up_key: int = 0,
                filter_radius: int = 3, rmvpe: "RMVPE | None" = None,
                device: torch.device = torch.device("cpu"), interp_unvoiced: bool = False,
                progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """F0 of the whole padded 16 kHz signal: (coarse pitch int, f0 in Hz), p_len frames.

    As the reference: estimate, cut or pad to p_len frames, transpose by f0_up_key
    semitones, then quantise to coarse pitch. Unvoiced frames stay 0 Hz (classic WebUI)
    unless interp_unvoiced (2026 WebUI).
    """
    if method == "rmvpe":
        if rmvpe is None:
            raise NotFoundError("--f0_method rmvpe needs rmvpe.pt", "--rmvpe")
        f0 = rmvpe.f0(audio_pad, progress=progress)
    elif method == "harvest":
        f0 = f0_harvest(audio_pad, filter_radius, progress)
    elif method == "dio":
        f0 = f0_dio(audio_pad, progress)
    elif method == "pm":
        f0 = f0_pm(audio_pad, p_len)
    elif method == "crepe":
        f0 = f0_crepe(audio_pad, device)
    else:
        raise UsageError(f"unknown f0 method {method!r}; choose from {', '.join(F0_METHODS)}", "--f0_method")
    f0 = np.asarray(f0, dtype=np.float64)[:p_len]
    if len(f0) < p_len:  # estimators disagree by a frame at the end; unvoiced is the safe fill
        f0 = np.pad(f0, (0, p_len - len(f0)))
    if interp_unvoiced:
        f0 = interpolate_unvoiced(f0)
    f0 = f0 * 2 ** (f0_up_key / 12)
    return coarse_pitch(f0), f0


# =============================================================================
# 10. Retrieval
# =============================================================================

MIN_SQUARED_DISTANCE = 1e-12  # guards 1/d² against an exact match (the reference divides by 0)


@dataclass
class FeatureIndex:
    """A faiss index of the target voice's HuBERT features, and its stored vectors."""

    path: Path
    index: Any  # faiss.Index
    vectors: np.ndarray  # (N, D) float32: the stored features themselves
    ivf: Any = None  # its inverted-file part (faiss.IndexIVF), None when it has none
    nprobe: int | None = None  # the lists the file says to search

    @property
    def nlist(self) -> int | None:
        return None if self.ivf is None else int(self.ivf.nlist)


def load_index(path: Path, phone_dim: int | None = None) -> FeatureIndex:
    """Read a WebUI `.index` (faiss) and check it matches the model's feature size."""
    import faiss

    path = Path(path)
    if not path.is_file():
        raise NotFoundError("index file not found", path)
    try:
        index = faiss.read_index(str(path))
    except Exception as exc:
        raise ModelFileError(f"not a readable faiss index ({_first_line(exc)})", path) from exc
    if index.ntotal == 0:
        raise ModelFileError("index holds no vectors (a trained_*.index; use the added_*.index)", path)
    if phone_dim is not None and index.d != phone_dim:
        raise ModelFileError(f"index has {index.d}-dim features but the model needs {phone_dim} "
                             f"({PHONE_DIM_VERSIONS.get(phone_dim, '?')} HuBERT features)", path)
    try:
        vectors = index.reconstruct_n(0, index.ntotal)
    except Exception as exc:
        raise ModelFileError(f"cannot read the vectors of the index ({_first_line(exc)})", path) from exc
    ivf = faiss.try_extract_index_ivf(index)
    return FeatureIndex(path, index, np.ascontiguousarray(vectors, dtype=np.float32), ivf,
                        None if ivf is None else int(ivf.nprobe))


# Every faiss index file starts with a four-character code (IVF types "Iw..", e.g. "IwFl"
# for the WebUI's IVF-Flat) and the same header, little-endian and unpadded: d (int32),
# ntotal (int64), two int64 placeholders of 2**20, is_trained (bool), metric (int32); an
# IVF index goes on with nlist and nprobe (uint64). A listing reads only these bytes: a
# large index takes seconds and hundreds of MB to load whole.
INDEX_HEADER = struct.Struct("<4siqqq?i")
INDEX_IVF_HEADER = struct.Struct("<QQ")
INDEX_HEADER_PLACEHOLDER = 1 << 20


@dataclass
class IndexHeader:
    """What an index file says about itself: feature size, vectors and (IVF) inverted lists."""

    dim: int
    vectors: int
    nlist: int | None  # None: not an IVF index
    nprobe: int | None


def read_index_header(path: Path) -> IndexHeader:
    """The header of a faiss index file, without loading the index."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(INDEX_HEADER.size + 4 + INDEX_IVF_HEADER.size)  # +4: a metric argument
    except OSError as exc:
        raise ModelFileError(f"cannot read the index ({exc.strerror})", path) from exc
    if len(head) < INDEX_HEADER.size:
        raise ModelFileError("not a faiss index (too short)", path)
    code, dim, vectors, hold1, hold2, _, metric = INDEX_HEADER.unpack_from(head)
    if not (code[:1] == b"I" and code.isalnum() and dim > 0 and vectors >= 0
            and hold1 == hold2 == INDEX_HEADER_PLACEHOLDER):
        raise ModelFileError("not a faiss index", path)
    nlist = nprobe = None
    if code.startswith(b"Iw"):
        offset = INDEX_HEADER.size + (4 if metric > 1 else 0)  # metrics past L2 and inner product carry an argument
        if len(head) < offset + INDEX_IVF_HEADER.size:
            raise ModelFileError("not a faiss index (truncated header)", path)
        nlist, nprobe = INDEX_IVF_HEADER.unpack_from(head, offset)
    return IndexHeader(dim, vectors, nlist, nprobe)


def retrieve(feats: np.ndarray, index: FeatureIndex, k: int, nprobe: int | None = None) -> np.ndarray:
    """Each feature's k nearest stored features (squared L2 distance d², as faiss's IVF-Flat
    returns it), averaged with weights 1/d⁴ normalised to sum 1: (T, D) -> (T, D). An IVF
    index searches `nprobe` of its lists (None: as many as its file says)."""
    if index.ivf is not None:  # (set for every search: a worker's requests share the index)
        index.ivf.nprobe = index.nprobe if nprobe is None else nprobe
    distances, ids = index.index.search(np.ascontiguousarray(feats, dtype=np.float32), k)
    weights = np.square(1.0 / np.maximum(distances, MIN_SQUARED_DISTANCE))
    weights[ids < 0] = 0  # faiss pads with -1 when a probed list holds fewer than k vectors
    total = weights.sum(axis=1, keepdims=True)
    found = total[:, 0] > 0
    weights[found] /= total[found]
    retrieved = np.sum(index.vectors[np.maximum(ids, 0)] * weights[:, :, None], axis=1)
    retrieved[~found] = feats[~found]  # nothing retrieved: keep the frame as it is
    return retrieved.astype(np.float32)


# =============================================================================
# 11. Pipeline
# =============================================================================

# The conversion, as the reference does it (Converter.stream), disk to disk: the input,
# its conditioned copy and the raw output live in SampleFiles and every step reads or
# writes bounded pieces, so memory does not grow with the input; what stays global (cut
# points, pitch, loudness envelopes) is a few bytes per 10 ms frame.
#   1. condition: attenuate an input louder than INPUT_PEAK, then a zero-phase 48 Hz
#      high-pass; float64 from here on.
#   2. split_points: inputs longer than X_MAX are cut near every X_CENTER seconds, at the
#      quietest 10 ms within X_QUERY of the nominal cut.
#   3. The whole input, reflect-padded by T_PAD on both sides, gets its pitch in one go
#      (Pitch section): p_len = len // HOP frames.
#   4. segments: each segment runs alone with T_PAD of context on both sides: HuBERT
#      features, blended with their nearest neighbours from the index (Retrieval),
#      repeated to the 10 ms frame grid; consonant protection (every segment's features
#      first, into a scratch file, so that HuBERT can go before the synthesizer runs);
#      then segment by segment the synthesizer. Its output is trimmed by the context; the
#      trimmed outputs tile the input. The reference's output ends up to 20 ms before the
#      input does (the frame grid, and HuBERT's 20 ms frames); the last segment decodes on
#      into its context until the input's end, so the output lasts exactly as long as the
#      input, and the reference's samples stay as they are. Non-finite audio, or silence
#      from an audible input, is an UnstableOutput (never written as a success).
#   5. loudness_gain: the output's loudness envelope is moved towards the input's
#      (rms_mix_rate), with the envelopes of the reference's length; optional resampling;
#      int16 (to_int16, with the whole output's peak); cut to the input's duration.

# Segmentation: the WebUI's fp32 values (its fp16 GPU values are longer), used on every
# device so that the result does not depend on the device. They only matter over X_MAX.
X_PAD = 1  # s of context added on each side of every segment (trimmed off after synthesis)
X_QUERY = 6  # s searched on each side of a nominal cut for the quietest point
X_CENTER = 38  # s between nominal cuts
X_MAX = 41  # s: inputs up to this long are converted in one piece
T_PAD = SAMPLE_RATE * X_PAD  # samples at 16 kHz
T_QUERY = SAMPLE_RATE * X_QUERY
T_CENTER = SAMPLE_RATE * X_CENTER
T_MAX = SAMPLE_RATE * X_MAX
HIGHPASS_HZ = 48  # 5th-order Butterworth high-pass, applied forward and backward
HIGHPASS_ORDER = 5
PROTECT_OFF = 0.5  # protect >= 0.5 disables consonant protection
FEATURE_REPEAT = HUBERT_HOP // HOP  # each 20 ms content feature serves two 10 ms frames
RMS_BLOCKS_PER_PIECE = 64  # loudness blocks summed per pass (bounds frame_rms's temporaries)
RMS_FLOOR = 1e-6  # the output envelope is floored here before it divides
MIX_PIECE = 1 << 18  # output samples re-levelled per pass (6.5 s at 40 kHz)
# The sanity guard: a network output below one int16 step throughout (it would be written
# as all zeros) from an input that peaks above -60 dBFS after conditioning is a failure.
SILENT_OUTPUT_PEAK = 1 / INT16_SCALE
AUDIBLE_INPUT_PEAK = 1e-3


@dataclass
class Timings:
    """Seconds spent per stage, reported by --json in this order, with `other` (what no stage
    claims: option checks, the run's own bookkeeping) and `total`, their sum."""

    read: float = 0.0  # decoding the input to 16 kHz mono (soundfile's import included)
    load: float = 0.0
    condition: float = 0.0  # high-pass filter (scipy's import included) and segment cuts
    f0: float = 0.0
    features: float = 0.0  # HuBERT and retrieval
    synthesis: float = 0.0
    postprocess: float = 0.0  # loudness mixing, resampling, int16, writing the output file

    def stages(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


def highpass_coefficients(rate: int = SAMPLE_RATE) -> tuple[np.ndarray, np.ndarray]:
    """The reference's high-pass: a 5th-order Butterworth at 48 Hz (removes DC and rumble)."""
    from scipy.signal import butter

    return butter(N=HIGHPASS_ORDER, Wn=HIGHPASS_HZ, btype="high", fs=rate)


def condition(audio: Signal, peak: float | None = None, directory: Path | None = None,
              block: int = BLOCK) -> SampleFile:
    """Attenuate an input louder than INPUT_PEAK to that peak (`peak`: max |sample|, found
    here when not given), then high-pass it with zero phase, as the reference's
    filtfilt(butter(5, 48 Hz)) with scipy's default odd extension at both ends.

    Computed a block at a time into a float64 SampleFile (the reference works in float64
    from here on): the forward pass runs from the start, the backward pass from the end,
    each carrying the filter state from block to block: the same recursion in the same
    order as the one-piece filtfilt, hence the same samples.
    """
    from scipy.signal import lfilter, lfilter_zi

    n = len(audio)
    gain = (signal_peak(audio, block) if peak is None else peak) / INPUT_PEAK

    def read(start: int, stop: int) -> np.ndarray:  # float32, as the reference's input
        x = np.asarray(audio[start:stop], dtype=np.float32)
        return x / gain if gain > 1 else x

    b, a = highpass_coefficients()
    edge = min(3 * max(len(a), len(b)), n - 1)  # filtfilt's padlen, which needs a longer input
    zi = lfilter_zi(b, a)
    first, last = read(0, 1), read(n - 1, n)
    head = 2 * first - read(1, edge + 1)[::-1]  # odd extensions, computed in float32 as filtfilt
    tail = 2 * last - read(n - edge - 1, n - 1)[::-1]
    out = SampleFile(np.float64, directory)
    try:
        state = zi * first
        if edge:
            _, state = lfilter(b, a, head, zi=zi * head[:1])
        for start in range(0, n, block):
            y, state = lfilter(b, a, read(start, min(start + block, n)), zi=state)
            out.append(y)
        if edge:
            y_tail, _ = lfilter(b, a, tail, zi=state)
            _, state = lfilter(b, a, y_tail[::-1], zi=zi * y_tail[-1:])
        else:
            state = zi * out[n - 1:n]
        for stop in range(n, 0, -block):
            start = max(0, stop - block)
            y, state = lfilter(b, a, out[start:stop][::-1], zi=state)
            out.write_at(start, y[::-1])
    except BaseException:
        out.close()
        raise
    return out


def split_points(audio: Signal) -> list[int]:
    """Cut points of long inputs, each at the quietest 10 ms within T_QUERY of a nominal
    cut every T_CENTER samples. Empty when the input fits in one piece (up to T_MAX)."""
    half = HOP // 2
    if len(audio) + 2 * half <= T_MAX:
        return []
    audio_pad = ReflectPadded(audio, half)
    cuts = []
    for t in range(T_CENTER, len(audio), T_CENTER):
        lo, hi = t - T_QUERY, min(t + T_QUERY, len(audio))
        # The 10 ms moving sum of |x| around each sample, summed in the reference's order
        # (so ties break identically), but only over the window searched.
        window = np.abs(audio_pad[lo: hi + HOP - 1])
        energy = np.zeros(hi - lo)
        for i in range(HOP):
            energy += window[i: i + hi - lo]
        cuts.append(lo + int(np.argmin(energy)))
    return cuts


def segments(n_padded: int, cuts: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(sample start, sample end, frame start, frame end) of each segment of the padded
    signal. A cut is moved down to the 10 ms grid; each segment carries T_PAD of context on
    both sides (and one frame more at its end), so the trimmed outputs tile the input."""
    bounds, start = [], 0
    for cut in cuts:
        t = cut // HOP * HOP
        bounds.append((start, t + 2 * T_PAD + HOP, start // HOP, (t + 2 * T_PAD) // HOP))
        start = t
    bounds.append((start, n_padded, start // HOP, n_padded // HOP))
    return bounds


def frame_rms(y: Signal, hop: int, n: int | None = None) -> np.ndarray:
    """RMS of frames of 2*hop samples centred every `hop` samples, zero-padded at the ends:
    the values of librosa.feature.rms (center=True) for frame_length == 2 * hop, which is
    what the reference's loudness mixing uses, without librosa's seconds of import and JIT start-up. Energies are summed
    per hop-long block in bounded pieces (float64), so an hour of audio needs no full-length
    temporary; frame t covers blocks t-1 and t. n: of the first n samples only (default all)."""
    n = len(y) if n is None else n
    frame_length = 2 * hop
    n_frames = 1 + n // hop
    blocks = np.zeros(n_frames + 1)  # blocks[b + 1] = energy of y[b*hop : (b+1)*hop], b = -1 .. n_frames-1
    step = hop * RMS_BLOCKS_PER_PIECE
    for start in range(0, n, step):
        piece = np.square(y[start: min(start + step, n)], dtype=np.float64)
        sums = np.add.reduceat(piece, np.arange(0, len(piece), hop))
        blocks[1 + start // hop: 1 + start // hop + len(sums)] = sums
    return np.sqrt((blocks[:-1] + blocks[1:]) / frame_length).astype(np.float32)  # float32, as librosa


def resize_linear(values: np.ndarray, size: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Samples [start, stop) of `values` linearly resized to `size` samples: what
    F.interpolate(mode="linear", align_corners=False) gives, one piece at a time."""
    stop = size if stop is None else stop
    n = len(values)
    position = np.maximum((np.arange(start, stop) + 0.5) * (n / size) - 0.5, 0)  # in `values`' frames
    left = np.minimum(position.astype(np.int64), n - 1)
    right = np.minimum(left + 1, n - 1)
    weight = position - left
    return values[left] * (1 - weight) + values[right] * weight


def loudness_gain(rms_in: np.ndarray, rms_out: np.ndarray, size: int, start: int, stop: int,
                  rate: float) -> np.ndarray:
    """The factor moving samples [start, stop) of an output of `size` samples towards the
    input's loudness (rate 0: the input's, 1: unchanged). The envelopes are 1 s RMS frames
    every 0.5 s (frame_rms), linearly interpolated to the output's samples a piece at a
    time: an hour of 48 kHz audio needs no full-length envelope."""
    envelope_in = resize_linear(rms_in, size, start, stop).astype(np.float32)
    envelope_out = np.maximum(resize_linear(rms_out, size, start, stop).astype(np.float32), RMS_FLOOR)
    return envelope_in ** np.float32(1 - rate) * envelope_out ** np.float32(rate - 1)


class Converter:
    """Loaded networks on one device, converting 16 kHz audio to the model's voice.

    One conversion (the command line) can hold less at once: given a loader instead of a
    HuBERT, the converter loads it after the pitch, and when `staged` it drops each network
    once its stage is done (RMVPE after the pitch, HuBERT after every segment's features);
    the networks then share their memory instead of adding it up (RMVPE 362 MB, HuBERT
    379 MB in fp32). Given also a `voice_loader`, a staged converter drops the voice
    model's network until the synthesis and loads it again then (~130 MB less beside
    RMVPE). A service keeps them all loaded.
    """

    def __init__(self, voice: "VoiceModel", hubert: "HubertEncoder | Callable[[], HubertEncoder]",
                 rmvpe: "RMVPE | None" = None, index: FeatureIndex | None = None,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                 staged: bool = False, voice_loader: Callable[[], "VoiceModel"] | None = None):
        self.voice, self.index, self.device, self.dtype = voice, index, device, dtype
        self.staged = staged
        # Mixed precision on a CPU: only the decoder's residual blocks in bf16. HuBERT and
        # RMVPE in bf16 cost the output 10-30 dB of SNR against fp32 (the pitch's voicing
        # flips) for a quarter of their time, a few percent of the whole.
        self.mixed = dtype == torch.bfloat16 and device.type == "cpu"
        self.network_dtype = torch.float32 if self.mixed else dtype
        self._voice_loader = voice_loader if staged else None
        self.net: Synthesizer | None = None
        if self._voice_loader is None:
            self.net = self._placed_synthesizer(voice.net)
        else:
            self.voice = replace(voice, net=None)  # its facts, without the network
        self._hubert = self._placed(hubert) if isinstance(hubert, nn.Module) else hubert
        self._hubert_loader = None if isinstance(hubert, nn.Module) else hubert  # what a drop goes back to
        self.rmvpe = self._placed(rmvpe) if rmvpe is not None else None

    def _placed_synthesizer(self, net: Synthesizer) -> Synthesizer:
        return net.to(self.device).with_low_precision(self.dtype) if self.mixed else net.to(self.device, self.dtype)

    def _reload_voice(self, timings: Timings) -> None:
        """The voice model's network, loaded again for the synthesis (staged, voice_loader)."""
        start = time.perf_counter()
        voice = self._voice_loader()
        facts = ("version", "sample_rate", "has_f0", "n_speakers", "phone_dim")
        if any(getattr(voice, name) != getattr(self.voice, name) for name in facts):
            raise ModelFileError("the voice model changed on disk during the conversion", voice.path)
        self.voice, self.net = voice, self._placed_synthesizer(voice.net)
        timings.load += time.perf_counter() - start

    def _placed(self, module: nn.Module) -> nn.Module:
        """HuBERT or RMVPE on the device in the network dtype; in fp32, the weights that
        StoredLinear layers hold in fp16 stay fp16 (they widen them as they run)."""
        if self.network_dtype == torch.float32:
            return module.to(self.device)
        return module.to(self.device, self.network_dtype)

    def hubert(self, timings: Timings | None = None) -> "HubertEncoder":
        """The content encoder, loaded now if it was given as a loader (counted as load time)."""
        if not isinstance(self._hubert, nn.Module):
            start = time.perf_counter()
            self._hubert = self._placed(self._hubert())
            if timings is not None:
                timings.load += time.perf_counter() - start
        return self._hubert

    @property
    def output_rate(self) -> int:
        return self.voice.sample_rate

    def output_rate_for(self, params: ConversionParams) -> int:
        """The rate of what convert() and stream() give for these parameters."""
        return params.resample_sr or self.output_rate

    def convert(self, audio: Signal, params: ConversionParams, timings: Timings | None = None,
                progress: Progress | None = None,
                trace: list[dict] | None = None) -> tuple[np.ndarray, int]:
        """16 kHz float audio in, (int16 samples, sample rate) out: stream() in one array.

        trace: when given, gets one dict per segment with the intermediate stages
        (features before/after retrieval, pitch, network output), for stage-by-stage tests.
        """
        blocks = list(self.stream(audio, params, timings, progress, trace))
        return (np.concatenate(blocks) if blocks else np.zeros(0, np.int16)), self.output_rate_for(params)

    def stream(self, audio: Signal, params: ConversionParams, timings: Timings | None = None,
               progress: Progress | None = None, trace: list[dict] | None = None, *,
               peak: float | None = None, directory: Path | None = None,
               block: int = BLOCK, length: int | None = None, floats: bool = False) -> Iterator[np.ndarray]:
        """16 kHz float audio in, blocks of int16 samples at output_rate_for(params) out
        (floats: the float samples they round, to_output_floats): steps 1-5 above, disk to
        disk (scratch files in `directory`), `block` samples per pass.

        peak: max |sample| of `audio`, when the caller knows it (else a pass finds it).
        length: the output's samples, the duration of the original input (InputAudio.length_at)
        when `audio` was resampled from it; by default that of `audio` itself.
        """
        timings = timings or Timings()
        if length is None:
            length = output_length(len(audio), SAMPLE_RATE, self.output_rate_for(params))
        raw_length = output_length(len(audio), SAMPLE_RATE, self.output_rate)  # the input's, at the model rate
        with contextlib.ExitStack() as scratch:
            start = time.perf_counter()
            conditioned = scratch.enter_context(condition(audio, peak, directory, block))
            cuts = split_points(conditioned)
            timings.condition += time.perf_counter() - start
            if self.staged:
                release_freed_memory()  # what loading and conditioning left (e.g. the dropped voice network)
            audio_pad = ReflectPadded(conditioned, T_PAD)
            p_len = len(audio_pad) // HOP
            pitch = pitchf = None
            if self.voice.has_f0:
                start = time.perf_counter()
                coarse, f0 = estimate_f0(audio_pad, p_len, params.f0_method, f0_up_key=params.f0_up_key,
                                         filter_radius=params.filter_radius, rmvpe=self.rmvpe,
                                         device=self.device, interp_unvoiced=params.interp_unvoiced,
                                         progress=progress)
                pitch = torch.from_numpy(coarse.astype(np.int64))[None].to(self.device)  # (1, p_len)
                pitchf = torch.from_numpy(f0.astype(np.float32))[None].to(self.device)  # (1, p_len)
                timings.f0 += time.perf_counter() - start
            if self.staged:
                self.rmvpe = None
                release_freed_memory()
            bounds = segments(len(audio_pad), cuts)
            seg_traces = [None if trace is None else {} for _ in bounds]
            if trace is not None:
                trace.extend(seg_traces)
            # Every segment's features first, then every segment's audio: the two networks
            # need not be resident together (staged). The features wait in a scratch file.
            features = scratch.enter_context(SampleFile(np.float32, directory))  # (frames x D), end to end
            rows = [0]  # segment k's features are rows[k]:rows[k + 1]
            if progress is not None:
                progress("features", 0, len(bounds))
            for k, (sample_start, sample_end, frame_start, frame_end) in enumerate(bounds):
                seg_pitchf = None if pitchf is None else pitchf[:, frame_start:frame_end]
                feats = self._segment_features(audio_pad[sample_start:sample_end], seg_pitchf, params, timings,
                                               seg_traces[k])  # (1, T, D)
                features.append(feats[0].float().cpu().numpy().reshape(-1))
                rows.append(rows[-1] + feats.shape[1])
                if progress is not None:
                    progress("features", k + 1, len(bounds))
            if self.staged and self._hubert_loader is not None:
                self._hubert = self._hubert_loader
                release_freed_memory()
            if self.net is None:
                self._reload_voice(timings)
            rng = self._rng(params.seed)
            sid = torch.tensor([params.speaker_id], device=self.device)
            raw = scratch.enter_context(SampleFile(np.float32, directory))  # the trimmed outputs, end to end
            raw_peak, reference_length, dim = 0.0, 0, self.voice.phone_dim
            if progress is not None:
                progress("segment", 0, len(bounds))
            for k, (sample_start, sample_end, frame_start, frame_end) in enumerate(bounds):
                seg_pitch = None if pitch is None else pitch[:, frame_start:frame_end]
                seg_pitchf = None if pitchf is None else pitchf[:, frame_start:frame_end]
                feats = torch.from_numpy(features[rows[k] * dim: rows[k + 1] * dim].reshape(1, -1, dim))
                last = k == len(bounds) - 1
                out, reference = self._synthesize(feats.to(self.device, self.network_dtype), seg_pitch, seg_pitchf,
                                                  sid, params, rng, timings, seg_traces[k],
                                                  extend_to=raw_length - len(raw) if last else 0)
                if not np.isfinite(out).all():
                    raise UnstableOutput("the network produced non-finite audio")
                reference_length += reference
                raw.append(out)
                raw_peak = max(raw_peak, float(np.abs(out).max(initial=0.0)))
                if progress is not None:
                    progress("segment", k + 1, len(bounds))
            del pitch, pitchf
            if raw_peak < SILENT_OUTPUT_PEAK and signal_peak(conditioned, block) >= AUDIBLE_INPUT_PEAK:
                raise UnstableOutput("the network produced silence from an input that is not silent")
            yield from self._postprocess(conditioned, raw, raw_peak, params, directory, block,
                                         reference_length, length, to_output_floats if floats else to_int16)

    def _postprocess(self, conditioned: Signal, raw: SampleFile, raw_peak: float, params: ConversionParams,
                     directory: Path | None, block: int, reference_length: int, length: int,
                     scale: Callable[[np.ndarray, float], np.ndarray] = to_int16) -> Iterator[np.ndarray]:
        """Step 5, a piece at a time: loudness mixing and resampling into another SampleFile
        (the int16 scale needs the final peak), then `length` samples in blocks, as `scale`
        makes them of the final ones (the WebUI's int16, or to_output_floats).
        raw_peak: max |raw|. reference_length: the samples of raw the reference would have
        made; the loudness envelopes are those of that length, held at their last value
        beyond it, so that the reference's samples are mixed exactly as it mixes them."""
        rate, size = self.output_rate, len(raw)
        mix = params.rms_mix_rate != 1 and size > 0
        resampler = Resampler(rate, params.resample_sr) if params.resample_sr and params.resample_sr != rate else None
        with contextlib.ExitStack() as scratch:
            final, peak = raw, raw_peak
            if mix or resampler:
                final, peak = scratch.enter_context(SampleFile(np.float32, directory)), 0.0
                if mix:
                    rms_in = frame_rms(conditioned, hop=SAMPLE_RATE // 2)
                    rms_out = frame_rms(raw, hop=rate // 2, n=reference_length)
                for start in range(0, size, MIX_PIECE):
                    stop = min(start + MIX_PIECE, size)
                    piece = raw[start:stop]
                    if mix:
                        piece *= loudness_gain(rms_in, rms_out, max(reference_length, 1), start, stop,
                                               params.rms_mix_rate)
                    if resampler:
                        piece = resampler(piece)
                    final.append(piece)
                    peak = max(peak, float(np.abs(piece).max(initial=0.0)))
                if resampler:
                    tail = resampler.finish(size)
                    final.append(tail)
                    peak = max(peak, float(np.abs(tail).max(initial=0.0)))
            available = min(length, len(final))
            for start in range(0, available, block):
                yield scale(final[start:min(start + block, available)], peak)
            if available < length:  # never by more than a sample or two of rounding: hold the last
                last = final[available - 1:available] if available else np.zeros(1, np.float32)
                yield scale(np.repeat(last, length - available), peak)

    def _rng(self, seed: int | None) -> torch.Generator:
        """The synthesizer's random numbers: seeded, or from fresh entropy."""
        rng = torch.Generator(device=self.device)
        if seed is None:
            rng.seed()
        else:
            rng.manual_seed(seed)
        return rng

    @torch.no_grad()
    def _segment_features(self, segment: np.ndarray, pitchf: torch.Tensor | None, params: ConversionParams,
                          timings: Timings, trace: dict | None) -> torch.Tensor:
        """One padded segment's content features, blended with the index, on the 10 ms frame
        grid of its pitch and protected: the synthesizer's input (1, T, D)."""
        hubert = self.hubert(timings)  # (its loading is load time, not feature time)
        start = time.perf_counter()
        wave = torch.from_numpy(segment).to(self.device, self.dtype)[None]  # (1, N)
        feats = hubert.extract(wave, self.voice.version)  # (1, T, D)
        protect = self.voice.has_f0 and params.protect < PROTECT_OFF
        raw = feats
        if trace is not None:
            trace["feats_hubert"] = feats[0].float().cpu().numpy()
        if self.index is not None and params.index_rate != 0:
            retrieved = retrieve(feats[0].float().cpu().numpy(), self.index, params.index_k, params.nprobe)
            retrieved = torch.from_numpy(retrieved)[None].to(self.device, feats.dtype)
            feats = retrieved * params.index_rate + (1 - params.index_rate) * feats
            if trace is not None:
                trace["feats_blend"] = feats[0].float().cpu().numpy()
        feats = torch.repeat_interleave(feats, FEATURE_REPEAT, dim=1)  # (1, 2T, D): 20 ms features to 10 ms frames
        p_len = min(len(segment) // HOP, feats.shape[1])
        feats = feats[:, :p_len]
        if pitchf is not None and protect:
            raw = torch.repeat_interleave(raw, FEATURE_REPEAT, dim=1)[:, :p_len]
            feats = self._protect(feats, raw, pitchf[:, :p_len], params.protect)
        timings.features += time.perf_counter() - start
        return feats

    @torch.no_grad()
    def _synthesize(self, feats: torch.Tensor, pitch: torch.Tensor | None, pitchf: torch.Tensor | None,
                    sid: torch.Tensor, params: ConversionParams, rng: torch.Generator,
                    timings: Timings, trace: dict | None, extend_to: int = 0) -> tuple[np.ndarray, int]:
        """One padded segment's features (1, T, D) and pitch to audio at the model's rate
        (float32), trimmed by the padding (X_PAD on both sides), which is not decoded at all
        (the trace gets it all), and the samples of it the reference keeps. extend_to: give
        max(those, extend_to) samples, decoding on into the right-hand padding where the
        reference stops short."""
        start = time.perf_counter()
        p_len = feats.shape[1]
        if pitch is not None:
            pitch, pitchf = pitch[:, :p_len], pitchf[:, :p_len]
        trim = X_PAD * FRAMES_PER_SECOND
        reference_end = max(trim, p_len - trim)  # the frames the reference keeps end here
        end = max(reference_end, min(p_len, trim + -(-extend_to // self.voice.hop)))
        try:
            audio = self.net.infer(feats, pitch, pitchf, sid, noise=params.noise, rng=rng,
                                   keep=None if trace is not None else (trim, end))
        except torch.OutOfMemoryError as exc:
            raise InferenceError(f"out of memory on {self.device}; try --device cpu", "--device") from exc
        audio = audio[0].float().cpu().numpy()
        timings.synthesis += time.perf_counter() - start
        if trace is not None:
            trace.update(pitch=None if pitch is None else pitch[0].cpu().numpy(),
                         pitchf=None if pitchf is None else pitchf[0].cpu().numpy(),
                         phone_lengths=p_len, net_out=audio)
            audio = audio[trim * self.voice.hop: end * self.voice.hop]
        reference = (reference_end - trim) * self.voice.hop
        return audio[:max(reference, extend_to)], reference

    @staticmethod
    def _protect(feats: torch.Tensor, raw: torch.Tensor, pitchf: torch.Tensor, protect: float) -> torch.Tensor:
        """On unvoiced frames mix the retrieved features back towards the raw
        ones (weight `protect`), which keeps consonants and breaths intelligible."""
        weight = pitchf.clone()
        weight[pitchf > 0] = 1
        weight[pitchf < 1] = protect
        weight = weight[..., None]  # (1, T, 1)
        return (feats * weight + raw * (1 - weight)).to(raw.dtype)


# =============================================================================
# 12. Modes
# =============================================================================

PROGRESS_MIN_SECONDS = 30  # inputs at least this long get a progress line on a terminal


def check_name(name: str, option: str, suffix: str) -> str:
    """MODEL and --index_name are base names inside the models folder, never paths; for
    the path of such a file, the error says which name and --models_dir reach it."""
    given = name
    if name.endswith(suffix):
        name = name[: -len(suffix)]
    bad = (not name or "\0" in name or "/" in name or "\\" in name or name.startswith(".")
           or ".." in name or (os.altsep is not None and os.altsep in name))
    if bad:
        message = f"{option} must be a plain name inside the models folder, not a path: {name!r}"
        file = Path(given)
        if "\0" not in given and file.suffix == suffix and file.is_file():
            as_name = f"{option} {file.stem}" if option.startswith("-") else f"{file.stem} as {option}"
            if file.parent.name == VOICE_SUBDIR:
                message += f"; for that file give --models_dir {file.parent.parent} and {as_name}"
            else:
                message += f"; move the file into <models_dir>/{VOICE_SUBDIR}/ and give {as_name}"
        raise UsageError(message, option)
    return name


def close_names(name: str, names: Iterable[str]) -> list[str]:
    """The names a mistyped `name` may have meant: those that differ only in case, then
    difflib's close matches, ignoring case."""
    import difflib

    by_lower: dict[str, list[str]] = {}
    for known in sorted(set(names)):
        by_lower.setdefault(known.lower(), []).append(known)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    return [known for lower in close for known in by_lower[lower]]


def not_found_hint(name: str, folder: Path, suffix: str) -> str:
    """What a not-found error adds: the close names of `folder`'s `suffix` files."""
    names = [p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")] if folder.is_dir() else []
    if not names:
        return f"; {folder} holds no {suffix} files"
    guesses = close_names(name, names)
    listing = "--list_models lists them"
    return f"; did you mean {' or '.join(map(repr, guesses))}? ({listing})" if guesses else f" ({listing})"


@dataclass
class Paths:
    """Where every file of a run is, resolved from options, environment and defaults."""

    models_dir: Path
    model: Path | None = None
    index: Path | None = None
    hubert: Path | None = None
    rmvpe: Path | None = None

    @classmethod
    def resolve(cls, args: argparse.Namespace) -> "Paths":
        models_dir = Path(args.models_dir or os.environ.get(MODELS_DIR_ENV) or DEFAULT_MODELS_DIR)
        paths = cls(models_dir)
        hubert = args.hubert or os.environ.get(HUBERT_ENV)
        if hubert:
            paths.hubert = Path(hubert)
        else:
            file, folder = models_dir / HUBERT_FILE, models_dir / HUBERT_FOLDER
            paths.hubert = folder if folder.is_dir() and not file.exists() else file
        paths.rmvpe = Path(args.rmvpe or os.environ.get(RMVPE_ENV) or models_dir / RMVPE_FILE)
        return paths

    def voice_model(self, name: str, option: str = "MODEL") -> Path:
        name = check_name(name, option, ".pth")
        path = self.models_dir / VOICE_SUBDIR / f"{name}.pth"
        if not path.is_file():
            raise NotFoundError(f"voice model not found{not_found_hint(name, path.parent, '.pth')}", path)
        return path

    def feature_index(self, name: str, warn: Warn = print_warning) -> Path:
        name = check_name(name, "--index_name", ".index")
        path = self.models_dir / VOICE_SUBDIR / f"{name}.index"
        if "trained" in name:  # users often pick the trained_*.index, which holds no vectors
            added = path.with_name(f"{name.replace('trained', 'added')}.index")
            if added.is_file():
                warn(f"using {added.name} instead of {path.name} (a trained_*.index holds no vectors)")
                path = added
        if not path.is_file():
            raise NotFoundError(f"index file not found{not_found_hint(name, path.parent, '.index')}", path)
        return path


def precision_name(dtype: torch.dtype) -> str:
    """--precision's name of a dtype: "fp32", "fp16" or "bf16"."""
    return next(name for name, torch_name in PRECISIONS.items() if getattr(torch, torch_name) == dtype)


def resolve_device(spec: str, precision: str) -> tuple[torch.device, torch.dtype]:
    """--device and --precision to a torch device and dtype, checking both are usable."""
    if spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif spec == "cpu" or re.fullmatch(r"cuda(:\d+)?", spec):
        device = torch.device(spec)
    else:
        raise UsageError(f"--device must be {DEVICES_HELP}, got {spec!r}", "--device")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("no CUDA GPU is visible to torch", "--device")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"there is no {spec}; torch sees {torch.cuda.device_count()} GPU(s)", "--device")
    if precision == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("fp16 needs a CUDA device; use fp32 or bf16 on the CPU", "--precision")
    return device, getattr(torch, PRECISIONS[precision])


# oneDNN (PyTorch's CPU kernels) caches a primitive, with its scratch memory, for every
# shape it sees. Every segment of a long input has a different length, so in fp32 the cache
# only grows (about 100 MB per segment, measured) and saves nothing measurable: off. In
# bf16 a small cache keeps the decoder chunks' convolutions (measured on the v2 40k decoder:
# 8 % faster than none, as fast as 256 entries, which held 100-200 MB more).
ONEDNN_CACHE_LOW_PRECISION = 16


def configure_onednn_cache(dtype: torch.dtype) -> None:
    """oneDNN reads the setting when it first runs, so this must come before any network
    does; a capacity the user set in the environment wins."""
    capacity = 0 if dtype == torch.float32 else ONEDNN_CACHE_LOW_PRECISION
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def choose_f0_method(requested: str | None, rmvpe_path: Path) -> tuple[str, str]:
    """The pitch estimator, and why: rmvpe by default when its weights are there, harvest
    otherwise."""
    if requested is None:
        if rmvpe_path.is_file():
            return "rmvpe", f"the default: {rmvpe_path} is there"
        return "harvest", f"the default without RMVPE weights: no {rmvpe_path}; {where_to_get(RMVPE_FILE)}"
    if requested in F0_OPTIONAL_PACKAGES:
        _import_optional(requested)
    elif requested == "rmvpe" and not rmvpe_path.is_file():
        raise NotFoundError(f"--f0_method rmvpe needs the RMVPE weights, not found; {where_to_get(RMVPE_FILE)}",
                            rmvpe_path)
    return requested, "--f0_method"


class RunState:
    """What one run owns besides its options: a command-line invocation has one, and so
    will each request of a service worker; nothing in it outlives the run.

    warnings: every warning of the run (also reported by --json). committing: set once the
    output is being renamed into place, when it is too late to stop. interrupted_by: the
    signal that ended the run. owned: what the run opened (scratch audio, its private
    folder), closed or removed at its end. said: the warnings printed on stderr, shared by
    the runs of a folder batch, so that a person reads each only once.
    """

    def __init__(self, said: set[str] | None = None) -> None:
        self.started = time.perf_counter()
        self.owned = contextlib.ExitStack()
        self.warnings: list[str] = []
        self.said = set() if said is None else said
        self.committing = False
        self.deferring = False  # a trainer stops at its next step's end, with a checkpoint
        self.interrupted_by: str | None = None
        self._private: Path | None = None

    def private_folder(self) -> Path:
        """A folder of this run's own in the system's temporary folder, removed at its end
        (what stdin and stdout go through)."""
        if self._private is None:
            try:
                self._private = Path(tempfile.mkdtemp(prefix="rvc-"))
            except OSError as exc:
                raise OutputError(f"cannot create a temporary folder ({exc.strerror})", tempfile.gettempdir()) from exc
            self.owned.callback(shutil.rmtree, self._private, ignore_errors=True)
        return self._private

    def warn(self, message: str) -> None:
        """A warning, given once however often the run comes upon it."""
        if message not in self.warnings:
            self.warnings.append(message)
        if message not in self.said:
            self.said.add(message)
            print_warning(message)

    def begin_commit(self) -> None:
        self.committing = True

    def on_signal(self, signum: int, frame: Any) -> None:
        """SIGINT/SIGTERM unwind like Ctrl-C (a BaseException that no `except Exception`
        swallows), so every cleanup on the way out runs and no partial output remains."""
        self.interrupted_by = signal.Signals(signum).name  # a worker stops after this request
        if not (self.committing or self.deferring):
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM interrupt this run while the block runs; the previous
        handlers are restored after it."""
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def file_stamp(path: Path) -> tuple | None:
    """What tells that a model file changed on disk: its size and modification time (for
    a folder, those of every file in it); None when it cannot be read."""
    try:
        if path.is_dir():
            return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()))
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
    except OSError:
        return None


class ModelCache:
    """What a worker keeps loaded between requests: the last `size` voice models and as
    many indexes, and one HuBERT and one RMVPE (their paths are the worker's). An entry is
    reloaded when its file changed (file_stamp). The warnings a model gave when it loaded
    are given again on every use, as a fresh load would give them."""

    KEEP_ONE = ("hubert", "rmvpe")

    def __init__(self, size: int = DEFAULT_CACHE_MODELS):
        self.size = size
        self._tables: dict[str, dict[Any, tuple[tuple | None, Any, list[str]]]] = {}

    def get(self, kind: str, key: Any, path: Path, load: Callable[[Warn], Any], warn: Warn) -> Any:
        table = self._tables.setdefault(kind, {})
        stamp = file_stamp(path)
        entry = table.pop(key, None)  # re-inserted last: the dict's order is the LRU order
        if entry is None or stamp is None or entry[0] != stamp:
            messages: list[str] = []
            entry = (stamp, load(messages.append), messages)
        table[key] = entry
        while len(table) > (1 if kind in self.KEEP_ONE else self.size):
            del table[next(iter(table))]
        for message in entry[2]:
            warn(message)
        return entry[1]


@dataclass
class Run:
    """One conversion job: parsed options, resolved paths, its state, and what --json
    reports; `models`: a worker's ModelCache (None: load everything afresh)."""

    args: argparse.Namespace
    paths: Paths
    state: RunState = field(default_factory=RunState)
    report: dict = field(default_factory=dict)
    models: ModelCache | None = None
    _progress_shown: bool = field(default=False, repr=False)  # a progress_line awaits its newline

    def warn(self, message: str) -> None:
        self.state.warn(message)

    def load(self, kind: str, path: Path, load: Callable[[Warn], Any], key: Any = None) -> Any:
        """load(warn) of the file at `path`, or its cached result in a worker."""
        if self.models is None:
            return load(self.warn)
        return self.models.get(kind, path if key is None else key, path, load, self.warn)

    def output_file(self) -> Path:
        """Where the output is written: OUTPUT, or for "-" a file that goes to stdout when done."""
        if self.args.output == STDIO:
            return self.state.private_folder() / "stdout.wav"
        return Path(self.args.output)

    def say(self, message: str) -> None:
        """Information for a person at a terminal: stderr, silenced by --quiet."""
        if not self.args.quiet:
            print(("\n" if self._progress_shown else "") + message, file=sys.stderr, flush=True)
            self._progress_shown = False

    def progress_line(self, message: str) -> None:
        """A line of progress that the next one overwrites: on a terminal only."""
        if not self.args.quiet and sys.stderr.isatty():
            print(f"\r{message}\x1b[K", end="", file=sys.stderr, flush=True)
            self._progress_shown = True

    def detail(self, message: str) -> None:
        if self.args.verbose and not self.args.quiet:
            print(message, file=sys.stderr, flush=True)


def _model_summary(voice: "VoiceModel", name: str) -> dict:
    return {"name": name, "version": voice.version, "sample_rate": voice.sample_rate, "f0": voice.has_f0,
            "speakers": voice.n_speakers, "info": voice.info, **{k: v for k, v in voice.metadata.items()
                                                                   if k not in ("version", "sample_rate", "f0")}}


def matching_indexes(model_name: str, index_names: Iterable[str]) -> list[str]:
    """Index files that belong to a model, by the WebUI's pairing rules: the model's own
    name, or (its name less an _e<epoch>_s<step> suffix) `<name>_added_*` or `*_<name>_v1|v2*`,
    never a trained_* file (it holds no vectors)."""
    exp = re.sub(r"_e\d+_s\d+$", "", model_name)
    return sorted(n for n in index_names if "trained" not in n and (
        n == model_name or n == exp or n.startswith(f"{exp}_added_") or f"_{exp}_v1" in n or f"_{exp}_v2" in n))


def choose_index(run: Run, model_path: Path) -> Path | None:
    """The index a conversion uses: --index_name's; for `auto` the model's one matching
    index (matching_indexes: several are a usage error, none a warning). Without
    --index_name none is used, and a matching one gets a warning, never used silently
    (but for --index_rate 0, which asks for no retrieval)."""
    args, folder, model = run.args, model_path.parent, model_path.stem
    if args.index_name and args.index_name != AUTO_INDEX:
        return run.paths.feature_index(args.index_name, run.warn)
    matches = matching_indexes(model, [p.stem for p in folder.glob("*.index")])
    if args.index_name is None:
        if matches and args.index_rate != 0:
            files = ", ".join(f"{m}.index" for m in matches)
            run.warn(f"{model}'s index {files} is not used: give --index_name {matches[0]} "
                     f"(or --index_name auto) to use it" if len(matches) == 1 else
                     f"{model}'s indexes {files} are not used: give --index_name NAME to use one")
        return None
    if len(matches) > 1:
        raise UsageError(f"{AUTO_INDEX} finds {len(matches)} indexes for {model} ({', '.join(matches)}): "
                         f"give one's name", "--index_name")
    if not matches:
        run.warn(f"--index_name {AUTO_INDEX} found no index for {model} in {folder}: converting without one")
        return None
    return folder / f"{matches[0]}.index"


def index_summaries(folder: Path) -> list[dict]:
    """Every index file in a folder, from its header: name, dim, vectors, nlist (or an error)."""
    entries = []
    for path in sorted(folder.glob("*.index")):
        try:
            header = read_index_header(path)
            entries.append({"name": path.stem, "dim": header.dim, "vectors": header.vectors, "nlist": header.nlist})
        except RVCError as exc:
            entries.append({"name": path.stem, "error": str(exc)})
    return entries


def list_models(run: Run) -> int:
    """Every voice model with the indexes named for it (`indexes`, the WebUI's pairing) and
    every index it can use (`fitting_indexes`: its feature size, not empty), whatever their
    names; and every index file, from its header."""
    folder = run.paths.models_dir / VOICE_SUBDIR
    if not folder.is_dir():
        raise NotFoundError("no voice model folder", folder)
    indexes = index_summaries(folder)
    models = []
    for path in sorted(folder.glob("*.pth")):
        try:
            voice = run.load("voice", path, partial(load_voice_model, path))
            entry = _model_summary(voice, path.stem)
            entry["fitting_indexes"] = [i["name"] for i in indexes
                                        if i.get("dim") == voice.phone_dim and i.get("vectors")]
        except RVCError as exc:
            entry = {"name": path.stem, "error": str(exc)}
        entry["indexes"] = matching_indexes(path.stem, [i["name"] for i in indexes])
        models.append(entry)
    run.report.update(models_dir=str(run.paths.models_dir), models=models, indexes=indexes)
    if not run.args.json:
        for m in models:
            if "error" in m:
                print(f"{m['name']}\tunusable: {m['error']}")
            else:
                print(f"{m['name']}\t{m['version']}\t{m['sample_rate']} Hz\t{'f0' if m['f0'] else 'no-f0'}\t"
                      f"{m['speakers']} speaker(s)\tindex: {', '.join(m['indexes']) or '-'}")
        for i in indexes:
            facts = (f"unusable: {i['error']}" if "error" in i else
                     f"{i['dim']}-dim\t{i['vectors']} vectors\t{i['nlist'] or '-'} lists")
            print(f"{i['name']}.index\t{facts}")
    return EXIT_OK


def model_info(run: Run) -> int:
    path = run.paths.voice_model(run.args.info, "--info")
    folder = path.parent
    entry = _model_summary(run.load("voice", path, partial(load_voice_model, path)), path.stem)
    entry["indexes"] = matching_indexes(path.stem, [p.stem for p in folder.glob("*.index")])
    entry["path"] = str(path)
    run.report["model"] = entry
    if not run.args.json:
        for key, value in entry.items():
            print(f"{key}: {value}")
    return EXIT_OK


@dataclass
class Networks:
    """What a conversion loads for its voice model (through the run's cache, when it has one)."""

    voice: "VoiceModel"
    f0_method: str | None  # None: the model takes no pitch
    f0_reason: str  # why this method (choose_f0_method)
    index: FeatureIndex | None
    hubert: "HubertEncoder | Callable[[], HubertEncoder]"  # a loader: loaded when the features need it
    rmvpe: "RMVPE | None"


def warn_no_effect(run: Run, voice: "VoiceModel", method: str | None, index_path: Path | None) -> None:
    """One warning for each option given (unlike its default) that changes nothing here."""
    args, defaults = run.args, ConversionParams()
    protect_given = args.protect != defaults.protect
    if not voice.has_f0:
        given = {"--f0_up_key": args.f0_up_key != defaults.f0_up_key, "--f0_method": args.f0_method is not None,
                 "--filter_radius": args.filter_radius != defaults.filter_radius,
                 "--interp_unvoiced": args.interp_unvoiced, "--protect": protect_given}
        for option in (option for option, is_given in given.items() if is_given):
            run.warn(f"{option} has no effect: {args.model} is a model without pitch")
    elif args.filter_radius != defaults.filter_radius and method != "harvest":
        run.warn(f"--filter_radius has no effect with --f0_method {method}: it filters harvest's pitch")
    retrieving = index_path is not None and args.index_rate != 0
    if voice.has_f0 and protect_given and not retrieving:
        run.warn("--protect has no effect without retrieval: it keeps consonants from the retrieved features")
    elif voice.has_f0 and protect_given and args.interp_unvoiced:
        run.warn("--protect has no effect with --interp_unvoiced: no frame is left unvoiced to protect")
    if index_path is None and args.index_rate not in (None, 0):
        run.warn("--index_rate has no effect without --index_name")


@contextlib.contextmanager
def incomplete_download_hint(path: Path, name: str) -> Iterator[None]:
    """A base file under its published name that fails to load, and is smaller than every
    published release of it, is most likely a download cut short: its error says so."""
    try:
        yield
    except ModelFileError as exc:
        try:
            size = path.stat().st_size if path.is_file() and path.name == name else None
        except OSError:
            size = None
        if size is not None and size < min(PUBLISHED_FILES[name]):
            exc.message += (f"; it holds {size} of the published {max(PUBLISHED_FILES[name])} bytes: "
                            f"an incomplete download? ({where_to_get(name)})")
        raise


# An IVF index searched in one list of many misses most near neighbours: measured on an
# Applio-built index, 69 % of the true 8 nearest at nprobe 1 against 97 % at nprobe 8.
NPROBE_HINT_LISTS = 64  # indexes with at least this many lists get the hint
NPROBE_SUGGESTED = 8


def hint_nprobe(run: Run, index: FeatureIndex | None, params: ConversionParams) -> None:
    """Information (not a warning: the WebUI searches so too) when a large IVF index is
    searched in a single list."""
    if index is None or index.nlist is None or params.index_rate == 0:
        return
    nprobe = index.nprobe if params.nprobe is None else params.nprobe
    if nprobe == 1 and index.nlist >= NPROBE_HINT_LISTS:
        run.say(f"note: {index.path.name} has {index.nlist} lists and is searched in 1; "
                f"--nprobe {NPROBE_SUGGESTED} finds closer features (slower)")


def load_networks(run: Run, model_path: Path, index_path: Path | None, device: torch.device,
                  staged: bool) -> Networks:
    """The voice model, its index, HuBERT and (for rmvpe) RMVPE, checked against the options.
    staged: HuBERT is given as a loader (a single conversion loads it after the pitch, in
    the memory RMVPE leaves: Converter), but its file is checked now (inspect_hubert)."""
    args, paths = run.args, run.paths
    voice = run.load("voice", model_path, partial(load_voice_model, model_path))
    if args.speaker_id >= voice.n_speakers:
        raise UsageError(f"speaker {args.speaker_id} does not exist: the model has {voice.n_speakers} speaker(s)",
                         "--speaker_id")
    method, reason = choose_f0_method(args.f0_method, paths.rmvpe) if voice.has_f0 else (None, "a model without pitch")
    if method == "crepe" and device.type == "cpu":  # measured: 34.6 s of pitch for 3 s of audio
        run.warn("--f0_method crepe is slow on a CPU (about ten times the rest of the conversion); "
                 "rmvpe or harvest are much faster")
    warn_no_effect(run, voice, method, index_path)
    index = None
    if index_path:
        index = run.load("index", index_path, lambda _: load_index(index_path, voice.phone_dim),
                         key=(index_path, voice.phone_dim))
    with incomplete_download_hint(paths.hubert, HUBERT_FILE):
        if staged:
            config = inspect_hubert(paths.hubert)  # its errors, before any work
            hubert: HubertEncoder | Callable[[], HubertEncoder] = partial(load_hubert, paths.hubert)
        else:
            hubert = run.load("hubert", paths.hubert, lambda _: load_hubert(paths.hubert))
            config = hubert.config
    check_hubert_fits(config, voice.version, voice.phone_dim, paths.hubert)
    rmvpe = None
    if method == "rmvpe":
        with incomplete_download_hint(paths.rmvpe, RMVPE_FILE):
            rmvpe = run.load("rmvpe", paths.rmvpe, lambda _: load_rmvpe(paths.rmvpe))
    return Networks(voice, method, reason, index, hubert, rmvpe)


def use_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """--device, --precision and --threads, applied before any network runs."""
    device, dtype = resolve_device(args.device, args.precision)
    configure_onednn_cache(dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device, dtype


def prepare(run: Run, audio: InputAudio | None = None) -> tuple[Converter, InputAudio, ConversionParams]:
    """Everything before the conversion itself: also the whole of --check. `audio`: the
    input, when it was read already (a second try); the timings then go on adding up."""
    args, paths = run.args, run.paths
    if not (args.input and args.output and args.model):
        raise UsageError("INPUT, OUTPUT and MODEL are required")
    model_path = paths.voice_model(args.model)
    index_path = choose_index(run, model_path)
    spec = output_spec(args.output, args.output_format, args.bit_depth)
    timings = run.report.get("timings") or Timings()
    start = time.perf_counter()
    check_output_writable(Path(args.output), spec)  # imports soundfile: the audio I/O's time is read time
    timings.read += time.perf_counter() - start
    if args.output_format and spec.name != args.output_format:
        run.warn(f"--output_format {args.output_format} has no effect: OUTPUT's extension makes it {spec.name}")
    if args.bit_depth and None in OUTPUT_FORMATS[spec.name][1]:
        run.warn(f"--bit_depth has no effect on {spec.name.upper()}: a lossy format has no bit depth")
    scratch = run.output_file().parent  # the scratch audio goes beside the output
    device, dtype = use_device(args)
    if audio is None:
        start = time.perf_counter()
        stdin = args.input == STDIO
        source = spool_stdin(run.state.private_folder()) if stdin else Path(args.input)
        try:
            audio = read_input_audio(source, run.warn, directory=scratch, start=args.start, duration=args.duration)
        except InputAudioError as exc:
            exc.subject = "stdin" if stdin else exc.subject
            raise
        run.state.owned.enter_context(audio.samples)
        timings.read += time.perf_counter() - start

    start = time.perf_counter()
    staged = run.models is None  # a single conversion (or its --check): each network only while it works
    nets = load_networks(run, model_path, index_path, device, staged)
    voice, method = nets.voice, nets.f0_method
    timings.load += time.perf_counter() - start
    run.detail(f"loaded models in {timings.load:.2f} s")

    params = ConversionParams(
        f0_up_key=args.f0_up_key, f0_method=method or "none",
        index_rate=ConversionParams.index_rate if args.index_rate is None else args.index_rate,
        filter_radius=args.filter_radius, rms_mix_rate=args.rms_mix_rate, protect=args.protect,
        resample_sr=args.resample_sr, speaker_id=args.speaker_id, noise=not args.no_noise, seed=args.seed,
        interp_unvoiced=args.interp_unvoiced, index_k=args.index_k, nprobe=args.nprobe)
    hint_nprobe(run, nets.index, params)
    reload = partial(load_voice_model, model_path, warn=lambda _: None)  # its warnings were given
    converter = Converter(voice, nets.hubert, nets.rmvpe, nets.index, device, dtype, staged=staged,
                          voice_loader=reload)
    rate = converter.output_rate_for(params)
    if spec.format == "MP3" and rate not in MP3_RATES:
        if args.resample_sr:
            raise UsageError(f"MP3 has no {rate} Hz audio; its rates are {', '.join(map(str, MP3_RATES))}",
                             "--resample_sr")
        params = replace(params, resample_sr=next(r for r in MP3_RATES if r >= rate))
        run.say(f"MP3 has no {rate} Hz audio: the output is resampled to {params.resample_sr} Hz")
    run.report.update(
        output=args.output, model=model_path.stem, index=index_path.stem if index_path else None,
        model_version=voice.version, model_sample_rate=voice.sample_rate, model_f0=voice.has_f0,
        f0_method=method, device=str(device), threads=torch.get_num_threads(), precision=precision_name(dtype),
        input_duration=round(audio.duration, 6), input_sample_rate=audio.source_rate,
        input_channels=audio.source_channels, output_format=spec.name, output_subtype=spec.subtype,
        f0_reason=nets.f0_reason, timings=timings)
    if args.check:  # what was found where, and what the conversion would use
        run.report["resolved"] = {
            "model": str(model_path), "hubert": str(paths.hubert),
            "rmvpe": str(paths.rmvpe) if method == "rmvpe" else None, "f0_method": method,
            "f0_reason": nets.f0_reason, "index": str(index_path) if index_path else None,
            "device": str(device), "precision": precision_name(dtype),
            "sample_rate": converter.output_rate_for(params)}
    if args.start or args.duration is not None:  # the region converted, to the input's sample
        run.report["region"] = {"start": round(round(args.start * audio.source_rate) / audio.source_rate, 6),
                                "duration": round(audio.duration, 6)}
    return converter, audio, params


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (a worker's: over all its requests)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_published(run: Run, path: Path, name: str) -> str | None:
    """--check: a base file of a published release's size is checked against its SHA-256;
    a mismatch (a damaged download) is a warning. What was found, or None (no such size)."""
    try:
        expected = PUBLISHED_FILES[name].get(path.stat().st_size) if path.is_file() else None
    except OSError:
        return None
    if expected is None:
        return None
    if file_sha256(path) == expected:
        return f"the published {name}: SHA-256 verified"
    run.warn(f"{path} has the size of the published {name} but not its SHA-256: a damaged download? "
             f"({where_to_get(name)})")
    return f"not the published {name}: SHA-256 differs"


def write_conversion(run: Run, converter: Converter, audio: InputAudio,
                     params: ConversionParams) -> tuple[int, int, str]:
    """Convert the input into the output file (atomically): (frames written, their rate,
    the file's SHA-256)."""
    timings: Timings = run.report["timings"]
    long_input = audio.duration >= PROGRESS_MIN_SECONDS and sys.stderr.isatty() and not run.args.quiet

    def progress(stage: str, done: int, total: int) -> None:
        print(f"\rconverting: {stage} {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    output = run.output_file()
    rate = converter.output_rate_for(params)
    spec = output_spec(run.args.output, run.args.output_format, run.args.bit_depth)
    blocks = converter.stream(audio.samples, params, timings, progress if long_input else None,
                              peak=audio.peak, directory=output.parent, length=audio.length_at(rate),
                              floats=spec.float_samples)
    start, counted = time.perf_counter(), timings.stages()
    try:
        frames = write_audio_atomic(output, blocks, rate, before_commit=run.state.begin_commit, spec=spec)
        sha256 = file_sha256(output)
        if run.args.output == STDIO:
            copy_to_stdout(output)
    except (RuntimeError, MemoryError) as exc:
        raise InferenceError(f"inference failed: {_first_line(exc)}") from exc
    finally:  # the stream ran inside the write and timed its own stages; the rest of the write is post-processing
        timings.postprocess += time.perf_counter() - start - (timings.stages() - counted)
    return frames, rate, sha256


def say_resolved(run: Run, converter: Converter) -> None:
    """--check's account of what a conversion would use, a line each."""
    report, resolved = run.report, run.report["resolved"]
    index = converter.index.index if converter.index is not None else None
    lines = {
        "voice model": f"{resolved['model']} ({report['model_version']}, {report['model_sample_rate']} Hz, "
                       f"{'with' if report['model_f0'] else 'without'} pitch)",
        "HuBERT": resolved["hubert"] + (f" ({resolved['hubert_release']})" if resolved["hubert_release"] else ""),
        "pitch": f"{resolved['f0_method'] or 'none'} ({resolved['f0_reason']})",
        **({"RMVPE": f"{resolved['rmvpe']} ({resolved['rmvpe_release']})"} if resolved["rmvpe_release"] else {}),
        "index": f"{resolved['index']} ({index.d}-dim, {index.ntotal} vectors)" if index is not None else "none",
        "device": f"{resolved['device']}, {resolved['precision']}, {report['threads']} thread(s)",
        "output": f"{report['output_format']} {report['output_subtype']} at {resolved['sample_rate']} Hz",
    }
    for name, value in lines.items():
        run.say(f"{name + ':':13} {value}")


def convert(run: Run) -> int:
    converter, audio, params = prepare(run)
    if run.args.check:
        resolved = run.report["resolved"]
        for kind, name in (("hubert", HUBERT_FILE), ("rmvpe", RMVPE_FILE)):
            resolved[f"{kind}_release"] = resolved[kind] and verify_published(run, Path(resolved[kind]), name)
        run.report["check"] = "ok"
        say_resolved(run, converter)
        run.say(f"ok: {run.args.model} is ready to convert {run.args.input}")
        return EXIT_OK
    unstable = None
    try:
        frames, rate, sha256 = write_conversion(run, converter, audio, params)
    except UnstableOutput as exc:  # the sanity guard: reduced precision gets one more try, in fp32
        if converter.dtype == torch.float32:
            raise
        unstable = f"{exc.message} in {precision_name(converter.dtype)}"
    if unstable is not None:  # (outside the except: its traceback would keep the networks alive)
        run.warn(f"{unstable}; converting again in fp32")
        run.args.precision = "fp32"
        del converter  # its networks, before the next ones load
        converter, audio, params = prepare(run, audio)
        frames, rate, sha256 = write_conversion(run, converter, audio, params)
    timings: Timings = run.report["timings"]
    total = time.perf_counter() - run.state.started
    run.report.update(sample_rate=rate, output_duration=round(frames / rate, 6),
                      rtf=round((total - timings.load) / audio.duration, 6), peak_rss_mb=peak_rss_mb(),
                      output_sha256=sha256)
    if converter.index is not None:
        run.report.update(index_vectors=int(converter.index.index.ntotal), index_dim=int(converter.index.index.d),
                          index_nprobe=getattr(converter.index.index, "nprobe", None))
    where = "stdout" if run.args.output == STDIO else run.args.output
    run.say(f"wrote {where}: {frames / rate:.2f} s at {rate} Hz in {total:.1f} s "
            f"({converter.device}, {run.report['precision']}, f0 {run.report['f0_method'] or 'none'}; "
            f"from {describe_input(audio)})")
    return EXIT_OK


def report_object(state: RunState, run: Run | None, code: int, error: RVCError | None) -> dict[str, Any]:
    """What --json prints for a run (and a worker answers to a request)."""
    report: dict[str, Any] = {"ok": code == EXIT_OK, "exit_code": code}
    if run is not None:
        report.update(run.report)
        if isinstance(report.get("timings"), Timings):
            t: Timings = report["timings"]
            total = time.perf_counter() - state.started
            report["timings"] = {**asdict(t), "other": max(0.0, total - t.stages()), "total": total}
    if error is not None:
        report.update(error=error.kind, message=str(error))
    report["warnings"] = list(state.warnings)
    return report


def print_json(obj: Mapping[str, Any], file: Any = None) -> None:
    """One JSON object as one line on stdout (or `file`)."""
    print(json.dumps(obj, default=str), file=file or sys.stdout, flush=True)


def execute(state: RunState, start: Callable[[], Run], mode: Callable[[Run], int],
            verbose: bool) -> tuple[Run | None, int, RVCError | None]:
    """start() a run and run `mode` on it. Any failure becomes its exit code and an
    RVCError, printed as one line on stderr (after its traceback with --verbose)."""
    run: Run | None = None
    error: RVCError | None = None
    failure: BaseException | None = None
    try:
        run = start()
        code = mode(run)
    except RVCError as exc:
        error, failure, code = exc, exc, exc.exit_code
    except KeyboardInterrupt as exc:
        error, failure = Interrupted(f"interrupted by {state.interrupted_by or 'SIGINT'}"), exc
        code = error.exit_code
    except Exception as exc:  # a bug: say so in one line, the traceback with --verbose
        error = RVCError(f"internal error: {type(exc).__name__}: {_first_line(exc)}")
        failure, code = exc, EXIT_INTERNAL
        if not verbose:
            error.message += " (run with --verbose for the traceback)"
    if error is not None:
        if verbose:
            import traceback

            traceback.print_exception(failure, file=sys.stderr)
        print(f"error: {error}", file=sys.stderr, flush=True)
    return run, code, error


# -----------------------------------------------------------------------------
# 12b. Folder batches: INPUT and OUTPUT folders
# -----------------------------------------------------------------------------

def batch_inputs(folder: Path) -> list[Path]:
    """The audio files of a folder, by name, not recursing into subfolders; hidden files
    (a conversion's own temporaries among them) are not inputs."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS)


def batch_outputs(inputs: Sequence[Path], folder: Path, extension: str) -> list[Path]:
    """Each input's output in `folder`: its name with `extension`; inputs that share a stem
    (a.wav and a.flac) keep their whole names (a.wav.wav, a.flac.wav) instead of colliding."""
    stems = [p.stem for p in inputs]
    return [folder / f"{p.stem if stems.count(p.stem) == 1 else p.name}{extension}" for p in inputs]


def batch(run: Run) -> int:
    """INPUT a folder: every audio file in it converted into the OUTPUT folder (made when
    missing) with the models loaded once. A file's failure is its own: the others go on,
    and the batch exits EXIT_PARTIAL. What every file needs (the models, the options) is
    checked before the first, and a failure there is the batch's."""
    args, paths = run.args, run.paths
    if not (args.output and args.model):
        raise UsageError("INPUT, OUTPUT and MODEL are required")
    source, target = Path(args.input), Path(args.output)
    if args.output == STDIO or (target.exists() and not target.is_dir()):
        raise UsageError("INPUT is a folder, so OUTPUT must be a folder too", args.output)
    if target.exists() and target.resolve() == source.resolve():
        raise UsageError("OUTPUT must be another folder than INPUT", args.output)
    inputs = batch_inputs(source)
    if not inputs:
        raise InputAudioError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in the folder", source)
    extension = f".{args.output_format or DEFAULT_OUTPUT_FORMAT}"
    check_format_writable(output_spec(f"output{extension}", bit_depth=args.bit_depth), target)
    model_path = paths.voice_model(args.model)
    index_path = choose_index(run, model_path)
    args.index_name = index_path.stem if index_path else None  # each file's, as resolved for all
    device, _ = use_device(args)
    if run.models is None:
        run.models = ModelCache()
    load_networks(run, model_path, index_path, device, staged=False)  # into the cache, for every file
    try:
        target.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder ({exc.strerror})", target) from exc
    files: list[dict] = []
    run.report.update(input=str(source), output=str(target), model=model_path.stem, files=files)
    for k, (path, output) in enumerate(zip(inputs, batch_outputs(inputs, target, extension)), 1):
        run.say(f"[{k}/{len(inputs)}] {path.name}")
        state = RunState(said=run.state.said)
        file_args = argparse.Namespace(**{**vars(args), "input": str(path), "output": str(output)})
        file_run = Run(file_args, paths, state, models=run.models)
        with state.signals(), state.owned:  # a failure is printed, and is this file's alone
            _, code, error = execute(state, lambda: file_run, convert, args.verbose)
        files.append({"input": str(path), "output": str(output), **report_object(state, file_run, code, error)})
        if state.interrupted_by is not None:
            run.state.interrupted_by = state.interrupted_by
            raise KeyboardInterrupt
    failed = [f for f in files if not f["ok"]]
    elapsed = time.perf_counter() - run.state.started
    run.report["summary"] = {"files": len(files), "succeeded": len(files) - len(failed), "failed": len(failed),
                             "audio_seconds": round(sum(f.get("input_duration", 0) for f in files if f["ok"]), 6),
                             "seconds": round(elapsed, 3)}
    done = "checked" if args.check else "converted"
    run.say(f"{done} {len(files) - len(failed)} of {len(files)} files into {target} in {elapsed:.1f} s"
            + (f"; failed: {', '.join(Path(f['input']).name for f in failed)}" if failed else ""))
    return EXIT_PARTIAL if failed else EXIT_OK


def job_mode(run: Run) -> int:
    """The mode one job asks for (a conversion, a check, a listing, a model's info, a
    folder batch); its exit code."""
    if run.args.list_models:
        return list_models(run)
    if run.args.info:
        return model_info(run)
    if run.args.input and run.args.input != STDIO and Path(run.args.input).is_dir():
        return batch(run)
    return convert(run)  # also --check


# -----------------------------------------------------------------------------
# 12c. The service worker: --serve
# -----------------------------------------------------------------------------

# A long-lived worker for a service (the Go AIService): models load once; requests come one
# JSON object per line on stdin, and each gets exactly one JSON line on stdout, in order:
# the object --json prints for the same work, plus the request's "id". Nothing else is
# written to stdout. A bad request fails alone; the end of stdin ends the worker (exit 0);
# SIGTERM or SIGINT abandons the running request (answered "interrupted") and exits 130.
SERVE_PROTOCOL = 1
SERVE_OPS = ("convert", "check", "list_models", "info")
SERVE_REQUEST_FIELDS = ("id", "op", "input", "output", "model")  # besides conversion options
# The worker's own options, given when it starts: a request may not set them.
SERVE_GLOBAL_OPTIONS = ("models_dir", "hubert", "rmvpe", "device", "precision", "threads", "quiet", "verbose",
                        "cache_models")
SERVE_MODE_OPTIONS = ("json", "check", "list_models", "info", "serve",  # "op" says these
                      "prepare_dataset", "build_index", "extract_model", "merge_models", "train")  # (not a worker's)


def parse_request(line: str) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"request is not JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise UsageError("a request must be a JSON object")
    return request


def request_args(request: Mapping[str, Any], worker: argparse.Namespace) -> argparse.Namespace:
    """A request's options, checked exactly as the command line checks them (same parser,
    same ranges and messages), with the worker's own options."""
    op = request.get("op", "convert")
    if op not in SERVE_OPS:
        raise UsageError(f"unknown op {op!r}; expected one of {', '.join(SERVE_OPS)}")
    parser = build_parser()
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")}
    argv: list[str] = []
    for key, value in request.items():
        if key in SERVE_REQUEST_FIELDS:
            continue
        if key in SERVE_GLOBAL_OPTIONS:
            raise UsageError(f"{key} belongs to the worker: give it when the worker starts")
        if key not in options or key in SERVE_MODE_OPTIONS:
            raise UsageError(f"unknown request field {key!r}")
        if isinstance(options[key], argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"{key} must be true or false")
            argv += [f"--{key}"] if value else []
        elif isinstance(value, (dict, list)):
            raise UsageError(f"{key} must be a string or a number")
        elif value is not None:
            argv += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    args = parser.parse_args(argv)
    for name in ("input", "output", "model"):
        value = request.get(name)
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{name} must be a string")
        if value == STDIO and name != "model":  # the worker's stdin and stdout are the protocol's
            raise UsageError(f"{name} \"-\" (stdin/stdout) is for the command line; a request names files")
        setattr(args, name, value)
    for name in SERVE_GLOBAL_OPTIONS:
        setattr(args, name, getattr(worker, name))
    args.json, args.check, args.list_models = True, op == "check", op == "list_models"
    if op == "info":
        args.info, args.model = args.model, None
        if not args.info:
            raise UsageError("an info request needs a model")
    return args


def serve(run: Run) -> int:
    """--serve: answer the requests on stdin until it ends."""
    args = run.args
    if args.input or args.output or args.model:
        raise UsageError("--serve takes no INPUT, OUTPUT or MODEL: each request names its own")
    device, dtype = resolve_device(args.device, args.precision)
    cache = ModelCache(args.cache_models)
    print_json({"ready": True, "version": __version__, "device": str(device), "precision": precision_name(dtype),
                "protocol": SERVE_PROTOCOL})
    for line in sys.stdin:
        if not line.strip():
            continue
        state = RunState()
        request_id = None

        def start(line: str = line, state: RunState = state) -> Run:
            nonlocal request_id
            request = parse_request(line)
            request_id = request.get("id")
            request_run = request_args(request, args)
            return Run(request_run, Paths.resolve(request_run), state, models=cache)

        with state.signals(), state.owned:
            request_run, code, error = execute(state, start, job_mode, args.verbose)
        print_json({"id": request_id, **report_object(state, request_run, code, error)})
        if state.interrupted_by is not None:
            return EXIT_INTERRUPTED
    return EXIT_OK


# -----------------------------------------------------------------------------
# 12d. Training tools: a dataset prepared, an index built, a model extracted or merged
# -----------------------------------------------------------------------------

# Everything a user does with a folder of recordings and with training checkpoints besides
# the training loop, as the WebUI does it (train/preprocess.py, train/dataset/slicer2.py,
# extract_f0.py and extract_hubert_feature.py, train/train_index.py, train/process_ckpt.py
# at 4338f12), in the WebUI's own layout, so that its trainer can go on from ours:
#   WORK_DIR/0_gt_wavs/I_J.wav       the chunks at the model's rate, 32-bit float
#            1_16k_wavs/I_J.wav      the same at 16 kHz
#            2a_f0/I_J.wav.npy       coarse pitch (int64, 1..255) per 10 ms frame
#            2b-f0nsf/I_J.wav.npy    pitch in Hz (float64), unvoiced frames interpolated
#            3_feature768/I_J.npy    HuBERT features per 20 ms (v2; v1: 3_feature256)
# I is the recording's place in the folder's sorted listing, J the chunk's number within
# it, with the WebUI's gaps (the last chunk of every slice skips a number).

SLICE_THRESHOLD_DB = -42.0  # frames with an RMS below this are silence
SLICE_MIN_LENGTH_MS = 1500  # a slice is at least this long ...
SLICE_MIN_INTERVAL_MS = 400  # ... and is cut at a silence at least this long
SLICE_HOP_MS = 15  # RMS frame hop
SLICE_MAX_KEPT_MS = 500  # silence kept at either side of a cut
CHUNK_SECONDS = 3.7  # slices are cut into chunks this long (the WebUI's with a GPU; 3.0 on a CPU-only machine)
CHUNK_OVERLAP = 0.3  # s shared by consecutive chunks; a slice's tail up to CHUNK_SECONDS + this stays whole
CHUNK_MAX_PEAK = 2.5  # a chunk peaking above this is broken audio: skipped
LEVEL_PEAK, LEVEL_ALPHA = 0.9, 0.75  # a chunk x becomes x / peak · LEVEL_PEAK · LEVEL_ALPHA + (1 − LEVEL_ALPHA) · x
GT_WAVS, WAVS_16K, F0_COARSE_DIR, F0_HZ_DIR = "0_gt_wavs", "1_16k_wavs", "2a_f0", "2b-f0nsf"
FEATURE_DIRS = {"v1": "3_feature256", "v2": "3_feature768"}


@dataclass(frozen=True)
class Slicer:
    """The WebUI's silence slicer (slicer2.py, after openvpi's audio-slicer): cuts a
    recording at its silences, in frames of `hop` samples, keeping up to `max_kept` frames
    of silence at each side of a cut."""

    threshold: float  # RMS of silence (linear)
    hop: int  # samples per frame
    window: int  # samples per RMS window
    min_length: int  # frames
    min_interval: int  # frames
    max_kept: int  # frames

    @classmethod
    def at(cls, rate: int) -> "Slicer":
        interval = rate * SLICE_MIN_INTERVAL_MS / 1000  # samples
        hop = round(rate * SLICE_HOP_MS / 1000)
        return cls(10 ** (SLICE_THRESHOLD_DB / 20), hop, min(round(interval), 4 * hop),
                   round(rate * SLICE_MIN_LENGTH_MS / 1000 / hop), round(interval / hop),
                   round(rate * SLICE_MAX_KEPT_MS / 1000 / hop))

    def rms(self, x: np.ndarray) -> np.ndarray:
        """RMS of windows centred on every hop-th sample, zero-padded: (1 + len(x) // hop,)."""
        padded = np.pad(x, self.window // 2)
        frames = np.lib.stride_tricks.sliding_window_view(padded, self.window)[::self.hop]  # (F, window)
        return np.sqrt(np.mean(np.abs(frames) ** 2, axis=-1))

    @staticmethod
    def _quietest(rms: np.ndarray, start: int, stop: int) -> int:
        return start + int(rms[start:stop].argmin())

    def cuts(self, rms: np.ndarray) -> list[tuple[int, int]]:
        """The silences to remove, as (first, end) frames, in order. A silence is cut when it
        is long enough and the slice before it too (a leading one always); what of it is kept
        depends on its length: a short one is cut at its quietest frame, a longer one keeps
        up to max_kept frames at each side."""
        quietest = partial(self._quietest, rms)
        cuts: list[tuple[int, int]] = []
        silence: int | None = None  # where the present silence began
        clip_start = 0
        for i, level in enumerate(rms):
            if level < self.threshold:
                silence = i if silence is None else silence
                continue
            if silence is None:
                continue
            leading = silence == 0 and i > self.max_kept
            due = i - silence >= self.min_interval and i - clip_start >= self.min_length
            if not leading and not due:
                silence = None
                continue
            length = i - silence
            if length <= self.max_kept:
                pos = quietest(silence, i + 1)
                cuts.append((0, pos) if silence == 0 else (pos, pos))
                clip_start = pos
            else:
                left = quietest(silence, silence + self.max_kept + 1)
                right = quietest(i - self.max_kept, i + 1)
                if length <= 2 * self.max_kept:  # the kept halves overlap: mind the quietest frame between
                    pos = quietest(i - self.max_kept, silence + self.max_kept + 1)
                    left, right = min(left, pos), max(right, pos)
                cuts.append((0, right) if silence == 0 else (left, right))
                clip_start = right
            silence = None
        total = len(rms)
        if silence is not None and total - silence >= self.min_interval:  # trailing silence
            cuts.append((quietest(silence, min(total, silence + self.max_kept) + 1), total + 1))
        return cuts

    def slices(self, x: np.ndarray) -> list[np.ndarray]:
        """The recording's pieces between its cut silences."""
        if len(x) <= self.min_length:  # (the WebUI compares samples with frames here)
            return [x]
        rms = self.rms(x)
        cuts = self.cuts(rms)
        if not cuts:
            return [x]
        total = len(rms)
        bounds = [(0, cuts[0][0])] if cuts[0][0] > 0 else []
        bounds += [(a[1], b[0]) for a, b in zip(cuts, cuts[1:])]
        bounds += [(cuts[-1][1], total)] if cuts[-1][1] < total else []
        return [x[a * self.hop: min(len(x), b * self.hop)] for a, b in bounds]


def slice_chunks(pieces: Iterable[np.ndarray], rate: int) -> Iterator[tuple[int, np.ndarray]]:
    """(J, chunk) for the chunks of a recording's slices: CHUNK_SECONDS long, one every
    CHUNK_SECONDS − CHUNK_OVERLAP, the tail whole. J counts on through the recording and,
    as in the WebUI, skips a number before each slice's tail."""
    number = 0
    length, tail = int(CHUNK_SECONDS * rate), (CHUNK_SECONDS + CHUNK_OVERLAP) * rate
    for piece in pieces:
        for i in itertools.count():
            start = int(rate * (CHUNK_SECONDS - CHUNK_OVERLAP) * i)
            if len(piece) - start > tail:
                yield number, piece[start: start + length]
                number += 1
            else:
                yield number + 1, piece[start:]
                number += 1
                break


def level_chunk(chunk: np.ndarray) -> np.ndarray | None:
    """The WebUI's levelling of a chunk, or None for a silent or broken one."""
    peak = float(np.abs(chunk).max()) if len(chunk) else 0.0
    if not np.isfinite(peak) or peak <= 0 or peak > CHUNK_MAX_PEAK:
        return None
    return chunk / peak * (LEVEL_PEAK * LEVEL_ALPHA) + (1 - LEVEL_ALPHA) * chunk


def read_recording(path: Path, rate: int) -> np.ndarray:
    """A recording as the WebUI's preparation reads it: mono float32 at `rate`. (The WebUI
    decodes and resamples with ffmpeg; soxr's resampling differs from ffmpeg's in detail.)"""
    blocks, source_rate, _, _ = _decoded_blocks(path)
    mono = [downmix(block) for block in blocks]
    audio = np.concatenate(mono) if mono else np.zeros(0, np.float32)
    if not len(audio):
        raise InputAudioError("the recording is empty", path)
    return resample(audio, source_rate, rate).astype(np.float32, copy=False)


def write_wav_float(path: Path, audio: np.ndarray, rate: int) -> None:
    """A 32-bit float WAV as the WebUI writes it (scipy's writer: the same bytes)."""
    from scipy.io import wavfile

    with atomic_file(path) as tmp:
        wavfile.write(tmp, rate, audio.astype(np.float32))


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


@dataclass
class DatasetReport:
    """What a preparation did: chunks written or found done, and each recording skipped."""

    recordings: int = 0
    chunks: list[str] = field(default_factory=list)  # every chunk's name (I_J), in order
    written: int = 0  # chunks written by this run (the rest were there)
    skipped_chunks: list[str] = field(default_factory=list)  # silent or broken chunks
    skipped_files: list[str] = field(default_factory=list)


def voice_target(run: Run, name: str, suffix: str) -> Path:
    """<models_dir>/rvc/NAME<suffix>, checked writable (the folder made when missing)."""
    folder = run.paths.models_dir / VOICE_SUBDIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the voice model folder ({exc.strerror})", folder) from exc
    target = folder / f"{check_name(name, 'NAME', suffix)}{suffix}"
    check_path_writable(target)
    return target


def dataset_files(folder: Path) -> list[Path]:
    """The folder's entries in the order the WebUI numbers them (sorted by name); a folder
    without a file named as audio is refused before any network loads."""
    if not folder.is_dir():
        raise NotFoundError("dataset folder not found", folder)
    entries = [folder / name for name in sorted(os.listdir(folder))]
    if not any(p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file() for p in entries):
        raise InputAudioError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) in the dataset folder", folder)
    return entries


def slice_dataset(run: Run, dataset: Path, work: Path, rate: int) -> DatasetReport:
    """0_gt_wavs/ and 1_16k_wavs/ of a folder of recordings: high-passed (causally, as the
    WebUI: no pre-ringing), sliced at silences, chunked and levelled. Chunks whose two files
    exist are not written again."""
    import soundfile as sf
    from scipy.signal import lfilter

    report = DatasetReport()
    gt_dir, wav16_dir = work / GT_WAVS, work / WAVS_16K
    done = next(gt_dir.glob("*.wav"), None) if gt_dir.is_dir() else None
    done_rate = sf.info(str(done)).samplerate if done is not None else rate
    if done_rate != rate:
        raise UsageError(f"the work folder was prepared at {done_rate} Hz, not {rate}: "
                         "give that --sample_rate, or another folder", work)
    for folder in (gt_dir, wav16_dir):
        folder.mkdir(parents=True, exist_ok=True)
    b, a = highpass_coefficients(rate)
    slicer = Slicer.at(rate)
    entries = dataset_files(dataset)
    for i, path in enumerate(entries):
        if not path.is_file() or path.suffix.lower() not in AUDIO_EXTENSIONS:
            what = "a folder" if path.is_dir() else "not an audio file"
            run.warn(f"skipped {path.name}: {what}")
            report.skipped_files.append(path.name)
            continue
        try:
            audio = lfilter(b, a, read_recording(path, rate))  # float64
        except InputAudioError as exc:
            run.warn(f"skipped {path.name}: {exc.message}")
            report.skipped_files.append(path.name)
            continue
        report.recordings += 1
        for j, chunk in slice_chunks(slicer.slices(audio), rate):
            name = f"{i}_{j}"
            if (gt_dir / f"{name}.wav").is_file() and (wav16_dir / f"{name}.wav").is_file():
                report.chunks.append(name)
                continue
            levelled = level_chunk(chunk)
            if levelled is None:
                report.skipped_chunks.append(name)
                continue
            write_wav_float(gt_dir / f"{name}.wav", levelled, rate)
            write_wav_float(wav16_dir / f"{name}.wav", resample(levelled, rate, SAMPLE_RATE), SAMPLE_RATE)
            report.chunks.append(name)
            report.written += 1
        run.progress_line(f"slicing: {i + 1}/{len(entries)} files")
    if not report.recordings:
        raise InputAudioError("no readable audio files in the dataset folder", dataset)
    if not report.chunks:
        raise InputAudioError("the recordings hold no usable audio (silent?)", dataset)
    return report


def read_wav16(path: Path) -> np.ndarray:
    import soundfile as sf

    audio, rate = sf.read(str(path), dtype="float32")
    if rate != SAMPLE_RATE or audio.ndim != 1:
        raise InputAudioError(f"expected a mono {SAMPLE_RATE} Hz WAV, found {rate} Hz", path)
    return audio


def chunk_names(work: Path) -> list[str]:
    """The chunks of a prepared folder, by their 16 kHz WAVs."""
    return sorted(p.stem for p in (work / WAVS_16K).glob("*.wav"))


def extract_dataset_features(run: Run, work: Path, hubert: "HubertEncoder", version: str,
                             device: torch.device) -> int:
    """3_feature768/ (v2) or 3_feature256/ (v1): HuBERT features of every 16 kHz chunk;
    returns how many were computed (the rest were there)."""
    folder = work / FEATURE_DIRS[version]
    folder.mkdir(exist_ok=True)
    names, done = chunk_names(work), 0
    for k, name in enumerate(names):
        target = folder / f"{name}.npy"
        if target.is_file():
            continue
        wave = torch.from_numpy(read_wav16(work / WAVS_16K / f"{name}.wav")).to(device)[None]  # (1, N)
        feats = hubert.extract(wave, version)[0].float().cpu().numpy()  # (T, D)
        if not np.isfinite(feats).all():
            run.warn(f"skipped the features of {name}: not finite")
            continue
        save_npy(target, feats)
        done += 1
        run.progress_line(f"features: {k + 1}/{len(names)}")
    return done


def extract_dataset_pitch(run: Run, work: Path, method: str, rmvpe: "RMVPE | None", device: torch.device) -> int:
    """2a_f0/ and 2b-f0nsf/: pitch of every 16 kHz chunk, its unvoiced frames filled by
    interpolation (as this WebUI version does), and its coarse bins; a chunk without a
    voiced frame gets neither (the WebUI skips it too). Returns how many were computed."""
    coarse_dir, hz_dir = work / F0_COARSE_DIR, work / F0_HZ_DIR
    for folder in (coarse_dir, hz_dir):
        folder.mkdir(exist_ok=True)
    names, done = chunk_names(work), 0
    for k, name in enumerate(names):
        coarse_path, hz_path = coarse_dir / f"{name}.wav.npy", hz_dir / f"{name}.wav.npy"
        if coarse_path.is_file() and hz_path.is_file():
            continue
        audio = read_wav16(work / WAVS_16K / f"{name}.wav")
        coarse, f0 = estimate_f0(audio, 1 + len(audio) // HOP, method, rmvpe=rmvpe, device=device,
                                 interp_unvoiced=True)
        if not (f0 > 0).any():
            run.warn(f"skipped the pitch of {name}: no voiced frame")
            continue
        save_npy(hz_path, f0)
        save_npy(coarse_path, coarse.astype(np.int64))
        done += 1
        run.progress_line(f"pitch: {k + 1}/{len(names)}")
    return done


def load_dataset_hubert(run: Run, version: str, device: torch.device) -> "HubertEncoder":
    path = run.paths.hubert
    with incomplete_download_hint(path, HUBERT_FILE):
        hubert = run.load("hubert", path, lambda _: load_hubert(path))
    check_hubert_fits(hubert.config, version, VERSION_PHONE_DIMS[version], path)
    return hubert.to(device)


def prepare_dataset(run: Run) -> int:
    """--prepare_dataset DATASET_DIR WORK_DIR: the WebUI's layout of a training set."""
    args = run.args
    dataset, work = (Path(p) for p in args.prepare_dataset)
    version, rate = args.model_version or "v2", args.sample_rate or DEFAULT_DATASET_RATE
    dataset_files(dataset)  # (its errors before the networks load)
    device, _ = use_device(args)
    method, _ = choose_f0_method(args.f0_method, run.paths.rmvpe)
    hubert = load_dataset_hubert(run, version, device)  # (its errors before any work)
    rmvpe = None
    if method == "rmvpe":
        with incomplete_download_hint(run.paths.rmvpe, RMVPE_FILE):
            rmvpe = run.load("rmvpe", run.paths.rmvpe, lambda _: load_rmvpe(run.paths.rmvpe)).to(device)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the work folder ({exc.strerror})", work) from exc
    sliced = slice_dataset(run, dataset, work, rate)
    features = extract_dataset_features(run, work, hubert, version, device)
    pitch = extract_dataset_pitch(run, work, method, rmvpe, device)
    elapsed = time.perf_counter() - run.state.started
    run.report.update(dataset=str(dataset), work_dir=str(work), sample_rate=rate, version=version, f0_method=method,
                      recordings=sliced.recordings, chunks=len(sliced.chunks), written=sliced.written,
                      features_computed=features, pitch_computed=pitch, skipped_chunks=sliced.skipped_chunks,
                      skipped_files=sliced.skipped_files, seconds=round(elapsed, 3))
    run.say(f"prepared {len(sliced.chunks)} chunks of {sliced.recordings} recordings in {work} "
            f"({sliced.written} new; {version} features, {method} pitch) in {elapsed:.1f} s")
    return EXIT_OK


# The index (train/train_index.py): every feature of the dataset, shuffled (the k-means that
# trains the inverted lists samples its input in order), reduced to INDEX_CENTRES k-means
# centres when there are more than INDEX_MAX_VECTORS, in an IVF-Flat index of
# min(16·√N, N // 39) lists searched with nprobe 1, added in batches.
INDEX_MAX_VECTORS = 200_000
INDEX_CENTRES = 10_000
INDEX_ADD_BATCH = 8192
INDEX_DEFAULT_SEED = 0  # of the shuffle, when --seed is not given (the WebUI's is unseeded)
INDEX_KMEANS_ITERATIONS = 20  # faiss's k-means stands in for the WebUI's sklearn MiniBatchKMeans


def index_lists(n_vectors: int) -> int:
    return max(1, min(int(16 * np.sqrt(n_vectors)), n_vectors // 39))


def webui_index_names(n_lists: int, name: str, version: str) -> tuple[str, str]:
    """The WebUI's names of the trained (lists only) and added (with the vectors) index."""
    tail = f"IVF{n_lists}_Flat_nprobe_1_{name}_{version}.index"
    return f"trained_{tail}", f"added_{tail}"


def read_features(folder: Path) -> np.ndarray:
    """All the features of a prepared folder, chunk after chunk by name: (N, D) float32."""
    paths = sorted(folder.glob("*.npy"))
    if not paths:
        raise InputAudioError("no features to index (prepare the dataset first)", folder)
    try:
        arrays = [np.load(p, allow_pickle=False) for p in paths]
    except (OSError, ValueError) as exc:
        raise InputAudioError(f"unreadable feature file ({_first_line(exc)})", folder) from exc
    if any(a.ndim != 2 or a.shape[1] != arrays[0].shape[1] for a in arrays):
        raise InputAudioError("the feature files differ in shape", folder)
    return np.concatenate(arrays).astype(np.float32, copy=False)


def train_feature_index(features: np.ndarray, seed: int, say: Callable[[str], None]) -> tuple[Any, Any]:
    """The WebUI's index of (N, D) features: (trained index without vectors, index with them)."""
    import faiss

    vectors = features[np.random.RandomState(seed).permutation(len(features))]
    if len(vectors) > INDEX_MAX_VECTORS:
        say(f"clustering {len(vectors)} features to {INDEX_CENTRES} centres")
        kmeans = faiss.Kmeans(vectors.shape[1], INDEX_CENTRES, niter=INDEX_KMEANS_ITERATIONS, seed=seed)
        kmeans.train(vectors)
        vectors = kmeans.centroids
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], f"IVF{index_lists(len(vectors))},Flat")
    faiss.extract_index_ivf(index).nprobe = 1
    index.train(vectors)
    trained = faiss.clone_index(index)
    for start in range(0, len(vectors), INDEX_ADD_BATCH):
        index.add(vectors[start: start + INDEX_ADD_BATCH])
    return trained, index


def write_index_atomic(index: Any, path: Path) -> None:
    import faiss

    with atomic_file(path) as tmp:
        faiss.write_index(index, str(tmp))


def feature_folder(work: Path, version: str | None) -> tuple[Path, str] | None:
    """A prepared folder's features for `version` (None: the one kind it holds)."""
    kinds = [v for v, sub in FEATURE_DIRS.items() if (work / sub).is_dir() and any((work / sub).glob("*.npy"))]
    if version is None and len(kinds) > 1:
        raise UsageError("the folder holds v1 and v2 features; say which with --model_version", work)
    version = version or (kinds[0] if kinds else None)
    return (work / FEATURE_DIRS[version], version) if version in kinds else None


def faiss_lists(index: Any) -> int:
    import faiss

    return int(faiss.extract_index_ivf(index).nlist)


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a second name of `source` (an index can be large), else a copy."""
    with atomic_file(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def build_index(run: Run) -> int:
    """--build_index DIR NAME: <models_dir>/rvc/NAME.index from a prepared folder's features
    (computed where they are missing; the index is also left there under the WebUI's
    names), or from a folder of recordings, prepared for it in a temporary folder."""
    args = run.args
    source, target = Path(args.build_index[0]), voice_target(run, args.build_index[1], ".index")
    name = target.stem
    found = feature_folder(source, args.model_version) if source.is_dir() else None
    prepared = found is not None or (source / WAVS_16K).is_dir()
    work = source if prepared else run.state.private_folder() / "dataset"
    if found is None:  # the features first
        if not prepared:
            dataset_files(source)  # (its errors before the networks load)
        version = args.model_version or "v2"
        device, _ = use_device(args)
        hubert = load_dataset_hubert(run, version, device)
        if not prepared:
            slice_dataset(run, source, work, args.sample_rate or DEFAULT_DATASET_RATE)
        extract_dataset_features(run, work, hubert, version, device)
        found = (work / FEATURE_DIRS[version], version)
    folder, version = found
    features = read_features(folder)
    if features.shape[1] != VERSION_PHONE_DIMS[version]:
        raise InputAudioError(f"the features are {features.shape[1]}-dim, {version} needs "
                              f"{VERSION_PHONE_DIMS[version]}", folder)
    seed = INDEX_DEFAULT_SEED if args.seed is None else args.seed
    trained, index = train_feature_index(features, seed, run.say)
    n_lists = faiss_lists(index)
    write_index_atomic(index, target)
    written = [str(target)]
    if prepared:
        trained_name, added_name = webui_index_names(n_lists, name, version)
        write_index_atomic(trained, work / trained_name)
        link_or_copy(target, work / added_name)
        written += [str(work / trained_name), str(work / added_name)]
    elapsed = time.perf_counter() - run.state.started
    run.report.update(index=str(target), files=written, version=version, dim=index.d, vectors=index.ntotal,
                      features=len(features), nlist=n_lists, nprobe=1, seed=seed, seconds=round(elapsed, 3))
    run.say(f"built {target.name}: {index.ntotal} {index.d}-dim vectors of {len(features)} features in "
            f"{n_lists} lists, in {elapsed:.1f} s")
    return EXIT_OK


# A training checkpoint (G_<step>.pth, train/utils.save_checkpoint) holds `model` (the
# training generator's state dict: the synthesizer plus the posterior encoder enc_q, fp32,
# weight norm as weight_g/weight_v), `optimizer`, `learning_rate` and `iteration` (the
# epoch). The small model the WebUI extracts from it (process_ckpt.extract_small_model)
# is the state dict without enc_q in fp16, with `config`, `info`, `version`, `sr`, `f0`.
# The WebUI writes a full-size config chosen by rate and version whatever the weights are;
# ours is read from the weights, and from the WebUI's configs only where the shapes say
# nothing: the strides of the upsampling (WEBUI_UPSAMPLING) and the resblocks' dilations.
WEBUI_UPSAMPLING = {  # (version, rate) -> spec channels, upsample rates, upsample kernels
    ("v1", 32000): (513, (10, 4, 2, 2, 2), (16, 16, 4, 4, 4)),
    ("v1", 40000): (1025, (10, 10, 2, 2), (16, 16, 4, 4)),
    ("v1", 48000): (1025, (10, 6, 2, 2, 2), (16, 16, 4, 4, 4)),
    ("v2", 32000): (513, (10, 8, 2, 2), (20, 16, 4, 4)),
    ("v2", 40000): (1025, (10, 10, 2, 2), (16, 16, 4, 4)),  # (v2 40k trains with v1's 40k config)
    ("v2", 48000): (1025, (12, 10, 2, 2), (24, 20, 4, 4)),
}
WEBUI_DILATIONS = (1, 3, 5)  # of every resblock's three convolutions
WEBUI_SEGMENT_FRAMES = 32  # config[1]: the training segment in frames, as the WebUI writes it (unused here)
WEBUI_TEXT_KERNEL = 3  # config[7], when the shapes do not say
MODEL_FILE_ORDER = ("weight", "config", "info", "version", "sr", "f0")  # extract_small_model's key order
MERGED_FILE_ORDER = ("weight", "config", "sr", "f0", "version", "info")  # merge's


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """The shape of layer `name`'s weight, plain or weight-normed (its direction `weight_v`)."""
    for key in (f"{name}.weight", f"{name}.weight_v"):
        if key in state:
            return tuple(state[key].shape)
    raise KeyError(f"{name}.weight")


def _count(state: Mapping[str, Any], pattern: str) -> int:
    """How many consecutive indices N have a key starting with pattern.format(N)."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in state):
        n += 1
    return n


def _upsampling(state: Mapping[str, torch.Tensor], version: str, kernels: tuple[int, ...], spec: int | None,
                has_f0: bool, rate: int | None) -> tuple[int, tuple[int, ...]]:
    """(sample rate, upsample rates) of a generator: the WebUI config its shapes fit (the
    noise convolutions of a pitch model also give every stride but the first)."""
    strides = None
    if has_f0:  # noise conv i brings the excitation down by prod(rates[i+1:]): kernel 2s (1 for s = 1)
        strides = [(_shape(state, f"dec.noise_convs.{i}")[-1] + 1) // 2 for i in range(len(kernels))]
    fits = [(r, rates) for (v, r), (channels, rates, kern) in WEBUI_UPSAMPLING.items()
            if v == version and kern == kernels and (spec is None or spec == channels)
            and (rate is None or rate == r)
            and (strides is None or strides == [math.prod(rates[i + 1:]) for i in range(len(rates))])]
    if len(fits) == 1:
        return fits[0]
    if strides is not None and rate is not None and rate % (100 * strides[0]) == 0:  # a non-standard size
        first = rate // 100 // strides[0]
        return rate, (first, *(a // b for a, b in zip(strides, strides[1:])))
    if fits:
        raise UsageError(f"the checkpoint's shapes fit {' and '.join(f'{r} Hz' for r, _ in fits)}: "
                         "say which with --sample_rate")
    raise ModelFileError("cannot tell the upsampling of this checkpoint from its shapes (not a WebUI size)"
                         + ("" if rate else "; give --sample_rate"))


def _config_from_weights(state: Mapping[str, torch.Tensor], rate: int | None) -> list:
    phone_dim = _shape(state, "enc_p.emb_phone")[1]
    version = PHONE_DIM_VERSIONS.get(phone_dim)
    if version is None:
        raise ModelFileError(f"unsupported content feature size {phone_dim} (enc_p.emb_phone.weight)")
    if _count(state, "dec.resblocks.{}.convs.") and not _count(state, "dec.resblocks.{}.convs1."):
        raise ModelFileError('resblock type "2" is not supported (only "1")')
    hidden = _shape(state, "enc_p.emb_phone")[0]
    filter_channels, _, kernel = _shape(state, "enc_p.encoder.ffn_layers.0.conv_1")
    n_ups = _count(state, "dec.ups.{}.")
    up_kernels = tuple(_shape(state, f"dec.ups.{i}")[-1] for i in range(n_ups))
    n_kernels = _count(state, "dec.resblocks.{}.") // max(1, n_ups)
    rb_kernels = [_shape(state, f"dec.resblocks.{j}.convs1.0")[-1] for j in range(n_kernels)]
    dilations = [list(WEBUI_DILATIONS[:_count(state, f"dec.resblocks.{j}.convs1.{{}}.")]) for j in range(n_kernels)]
    spec = state["enc_q.pre.weight"].shape[1] if "enc_q.pre.weight" in state else None  # (H, spec, 1)
    has_f0 = "enc_p.emb_pitch.weight" in state
    rate, rates = _upsampling(state, version, up_kernels, spec, has_f0, rate)
    if spec is None:
        spec = WEBUI_UPSAMPLING.get((version, rate), (1025,))[0]
    speakers, gin = _shape(state, "emb_g")
    return [spec, WEBUI_SEGMENT_FRAMES, _shape(state, "enc_p.proj")[0] // 2, hidden, filter_channels,
            hidden // state["enc_p.encoder.attn_layers.0.emb_rel_k"].shape[-1],  # (1, 2W+1, hidden // heads)
            _count(state, "enc_p.encoder.attn_layers.{}."), kernel or WEBUI_TEXT_KERNEL, 0, "1", rb_kernels,
            dilations, list(rates), _shape(state, "dec.conv_pre")[0], list(up_kernels), speakers, gin, rate]


def config_from_weights(state: Mapping[str, torch.Tensor], path: Path, rate: int | None = None) -> list:
    """The WebUI's 18-element config list that describes a generator's state dict (from
    the file at `path`, which its errors name)."""
    try:
        return _config_from_weights(state, rate)
    except KeyError as exc:
        raise ModelFileError(f"not a complete generator: missing tensor {exc.args[0]!r}", path) from exc
    except ModelFileError as exc:
        exc.subject = exc.subject or str(path)
        raise


def rate_name(rate: int) -> str:
    """The WebUI's name of a sample rate: 40000 -> "40k"."""
    return f"{rate // 1000}k"


CHECKPOINT_KINDS = {"G": "a generator (G_*.pth)", "D": "a discriminator (D_*.pth)"}


def read_training_checkpoint(path: Path, kind: str = "G") -> Mapping[str, Any]:
    """A WebUI training checkpoint of `kind` (G or D): its dict, `model` a dict of named
    tensors (and `iteration`, the epoch it was saved at; `optimizer`, `learning_rate`)."""
    if not path.is_file():
        raise NotFoundError("checkpoint not found", path)
    ckpt = load_torch_file(path)
    model = ckpt.get("model") if isinstance(ckpt, Mapping) else None
    if not isinstance(model, Mapping):
        if isinstance(ckpt, Mapping) and "weight" in ckpt:
            raise ModelFileError("this is already a small voice model (it has 'weight'), not a training "
                                 "checkpoint", path)
        keys = [str(k) for k in ckpt] if isinstance(ckpt, Mapping) else []
        raise ModelFileError(f"not a training checkpoint: it has no 'model' state dict{_guess_contents(keys)}", path)
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise ModelFileError("not a training checkpoint: 'model' is not a dict of named tensors", path)
    found = "D" if any(k.startswith("discriminators.") for k in model) else "G"
    if found != kind:
        raise ModelFileError(f"expected {CHECKPOINT_KINDS[kind]}, this is {CHECKPOINT_KINDS[found]}", path)
    if kind == "G" and not any(k.startswith("enc_p.") for k in model):
        raise ModelFileError("not a generator checkpoint: it has no text encoder (enc_p)"
                             + _guess_contents(list(model)), path)
    return ckpt


def checked_small_model(weight: Mapping[str, torch.Tensor], config: list, path: Path) -> SynthConfig:
    """The config of a small model's weights, once the synthesizer it describes has taken
    every one of them (every key and shape checked)."""
    try:
        cfg = SynthConfig.from_list(config)
    except ValueError as exc:
        raise ModelFileError(f"unsupported generator: {exc}", path) from exc
    phone_dim = weight["enc_p.emb_phone.weight"].shape[1]
    has_f0 = "enc_p.emb_pitch.weight" in weight
    checked_on_meta(lambda: Synthesizer(cfg, phone_dim, has_f0, weight["emb_g.weight"].shape[0]),
                    fold_weight_norm(weight), path)
    return cfg


def small_model(state: Mapping[str, torch.Tensor], config: list, info: str) -> dict[str, Any]:
    """The small voice model of a training generator's (WebUI-named) state dict, as the
    WebUI's extract_small_model writes it, in its key order (MODEL_FILE_ORDER): fp16, without
    enc_q (the WebUI's test, on the whole name)."""
    weight = {k: v.half() for k, v in state.items() if "enc_q" not in k}
    model = {"weight": weight, "config": config, "info": info,
             "version": PHONE_DIM_VERSIONS[weight["enc_p.emb_phone.weight"].shape[1]],
             "sr": rate_name(config[-1]), "f0": int("enc_p.emb_pitch.weight" in weight)}
    return {key: model[key] for key in MODEL_FILE_ORDER}


def save_model_atomic(model: Mapping[str, Any], path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(model, tmp)


def _say_model(run: Run, verb: str, target: Path, model: Mapping[str, Any]) -> None:
    config = model["config"]
    run.report.update(model=str(target), version=model["version"], sr=model["sr"], sample_rate=config[-1],
                      f0=model["f0"], info=model["info"], config=config, tensors=len(model["weight"]),
                      seconds=round(time.perf_counter() - run.state.started, 3))
    run.say(f"{verb} {target.name}: {model['version']} {model['sr']} {'with' if model['f0'] else 'without'} "
            f"pitch, {len(model['weight'])} tensors; use it as MODEL {target.stem}")


def extract_model(run: Run) -> int:
    """--extract_model CHECKPOINT NAME: the small voice model <models_dir>/rvc/NAME.pth."""
    args = run.args
    source, target = Path(args.extract_model[0]), voice_target(run, args.extract_model[1], ".pth")
    ckpt = read_training_checkpoint(source)
    rate = args.sample_rate
    beside = source.parent / "config.json"  # the WebUI's training folder keeps its config there
    if rate is None and beside.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            rate = int(json.loads(beside.read_text())["data"]["sampling_rate"])
    config = config_from_weights(ckpt["model"], source, rate)
    epoch = ckpt.get("iteration")
    info = args.comment if args.comment is not None else f"extracted from {source.name}" + (
        f", epoch {epoch}" if isinstance(epoch, int) else "")
    model = small_model(ckpt["model"], config, info)
    checked_small_model(model["weight"], config, source)
    save_model_atomic(model, target)
    _say_model(run, "extracted", target, model)
    return EXIT_OK


def merge_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float,
                  subject: str) -> dict[str, torch.Tensor]:
    """α·a + (1 − α)·b of every tensor, in fp32, stored in fp16 (process_ckpt.merge). The
    speaker tables may differ in rows: the first rows both have are merged."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ModelFileError(f"the models cannot be merged: their tensors differ ({', '.join(only[:3])}"
                             f"{', ...' if len(only) > 3 else ''} in one only)", subject)
    merged = {}
    for key, x in a.items():
        y = b[key]
        if key == "emb_g.weight" and x.shape[1:] == y.shape[1:]:
            rows = min(len(x), len(y))
            x, y = x[:rows], y[:rows]
        if x.shape != y.shape:
            raise ModelFileError(f"the models cannot be merged: {key} is {list(x.shape)} in one and "
                                 f"{list(y.shape)} in the other (another size of network)", subject)
        merged[key] = (alpha * x.float() + (1 - alpha) * y.float()).half()
    return merged


def merge_models(run: Run) -> int:
    """--merge_models MODEL_A MODEL_B NAME --alpha A: <models_dir>/rvc/NAME.pth, the weights
    A·a + (1 − A)·b, with A's config; both must be the same kind of model."""
    args = run.args
    path_a = run.paths.voice_model(args.merge_models[0], "MODEL_A")
    path_b = run.paths.voice_model(args.merge_models[1], "MODEL_B")
    target = voice_target(run, args.merge_models[2], ".pth")
    a, b = (load_voice_model(p, run.warn) for p in (path_a, path_b))
    subject = f"{path_a.name}, {path_b.name}"
    for fact, say in (("version", str), ("sample_rate", lambda r: f"{r} Hz"),
                      ("has_f0", lambda f: "with pitch" if f else "without pitch")):
        if getattr(a, fact) != getattr(b, fact):
            raise ModelFileError(f"the models cannot be merged: {path_a.stem} is {say(getattr(a, fact))}, "
                                 f"{path_b.stem} {say(getattr(b, fact))}", subject)
    ckpt_a, ckpt_b = (_read_voice_checkpoint(p) for p in (path_a, path_b))
    weight = merge_weights(ckpt_a["weight"], ckpt_b["weight"], args.alpha, subject)
    config = list(ckpt_a["config"])
    config[15] = weight["emb_g.weight"].shape[0]  # spk_embed_dim: the speakers merged
    checked_small_model(weight, config, path_a)
    sr = ckpt_a.get("sr") if ckpt_a.get("sr") in SAMPLE_RATE_NAMES else rate_name(a.sample_rate)
    info = args.comment if args.comment is not None else (
        f"merged: {args.alpha:g} × {path_a.stem} + {1 - args.alpha:g} × {path_b.stem}")
    model = {"weight": weight, "config": config, "sr": sr, "f0": int(a.has_f0), "version": a.version, "info": info}
    save_model_atomic({key: model[key] for key in MERGED_FILE_ORDER}, target)
    _say_model(run, "merged", target, model)
    return EXIT_OK


# -----------------------------------------------------------------------------
# 12e. Training: the WebUI's training step (train/train.py train_and_evaluate)
# -----------------------------------------------------------------------------

# The networks of training: the synthesizer of section 8 with the posterior encoder enc_q
# (linear spectrogram -> z) and the weight norm the WebUI trains through (its weight_g and
# weight_v are the parameters), and the multi-period discriminator. One step: the generator
# runs on a batch and decodes a random slice of its posterior z; the discriminator learns
# from the real and the decoded slice; then the generator learns from the updated
# discriminator (adversarial, feature matching), the mel spectrogram (L1 × c_mel) and the
# KL divergence between posterior and prior (× c_kl). Read for facts: train/train.py,
# train/losses.py, train/mel_processing.py, infer/module/models.py and commons.py (4338f12).

@dataclass(frozen=True)
class TrainingRecipe:
    """The WebUI's training config of a version and rate (configs/v1|v2/<rate>.json)."""

    sample_rate: int
    filter_length: int  # n_fft of the linear spectrogram enc_q reads; spec channels = filter_length // 2 + 1
    hop: int  # samples per frame (= the decoder's upsampling)
    window: int
    n_mels: int  # of the mel loss
    segment: int  # samples of each item decoded per step
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.8, 0.99)
    eps: float = 1e-9
    lr_decay: float = 0.999875  # per epoch
    batch_size: int = 4
    c_mel: float = 45.0
    c_kl: float = 1.0

    @property
    def segment_frames(self) -> int:
        return self.segment // self.hop


TRAINING_RECIPES = {
    ("v1", 32000): TrainingRecipe(32000, 1024, 320, 1024, 80, 12800),
    ("v1", 40000): TrainingRecipe(40000, 2048, 400, 2048, 125, 12800),
    ("v1", 48000): TrainingRecipe(48000, 2048, 480, 2048, 128, 11520),
    ("v2", 32000): TrainingRecipe(32000, 1024, 320, 1024, 80, 12800),
    ("v2", 40000): TrainingRecipe(40000, 2048, 400, 2048, 125, 12800),  # (v2 40k trains with v1's config)
    ("v2", 48000): TrainingRecipe(48000, 2048, 480, 2048, 128, 17280),
}
POSTERIOR_KERNEL, POSTERIOR_DILATION, POSTERIOR_LAYERS = 5, 1, 16  # enc_q's WaveNet
SPECTROGRAM_EPS = 2e-7  # |STFT| = sqrt(re² + im² + eps)
MEL_FLOOR = 2e-6  # log(max(mel, floor))
FEATURE_MATCHING_SCALE = 2.0
# The convolutions the WebUI wraps in weight norm: the decoder's upsampling and residual
# blocks, and every WaveNet (flow and enc_q); in the discriminators, every convolution.
WEIGHT_NORMED = re.compile(r"(dec\.ups\.\d+|dec\.resblocks\.\d+\.convs[12]\.\d+"
                           r"|(flow\.flows\.\d+|enc_q)\.enc\.(in_layers\.\d+|res_skip_layers\.\d+|cond_layer)"
                           r"|discriminators\.\d+\.(convs\.\d+|conv_post))")
WEIGHT_NORM_NAMES = tuple(zip(*_WEIGHT_NORM_SUFFIXES))  # (the WebUI's, torch's) for g, then v


def sequence_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) lengths -> (B, 1, size) float mask, 1 on each item's first `length` frames."""
    return (torch.arange(size, device=lengths.device)[None] < lengths[:, None]).unsqueeze(1).float()


def slice_segments(x: torch.Tensor, starts: torch.Tensor, size: int) -> torch.Tensor:
    """x[b, ..., starts[b]: starts[b] + size] for every item b of (B, ..., T)."""
    return torch.stack([x[b, ..., int(s): int(s) + size] for b, s in enumerate(starts)])


def weight_normed(module: nn.Module) -> nn.Module:
    """`module` with the WebUI's convolutions under weight norm (in place)."""
    for name, layer in list(module.named_modules()):
        if WEIGHT_NORMED.fullmatch(name):
            nn.utils.parametrizations.weight_norm(layer)
    return module


def _renamed_suffixes(state: Mapping[str, torch.Tensor], pairs: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """`state` with each key ending in a pair's first suffix ending in its second instead."""
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            key = key[: -len(old)] + new if key.endswith(old) else key
        out[key] = value
    return out


def to_webui_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A weight-normed module's state dict under the WebUI's names (weight_g, weight_v)."""
    return _renamed_suffixes(state, [(ours, webui) for webui, ours in WEIGHT_NORM_NAMES])


def from_webui_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The WebUI's names of a training state dict as torch's weight-norm parametrizations call them."""
    return _renamed_suffixes(state, WEIGHT_NORM_NAMES)


class PosteriorEncoder(nn.Module):
    """The WebUI's PosteriorEncoder (enc_q): linear spectrogram -> posterior sample z."""

    def __init__(self, spec_channels: int, cfg: SynthConfig):
        super().__init__()
        self.inter = cfg.inter_channels
        self.pre = nn.Conv1d(spec_channels, cfg.hidden_channels, 1)
        self.enc = SynthWaveNet(cfg.hidden_channels, POSTERIOR_KERNEL, POSTERIOR_DILATION, POSTERIOR_LAYERS,
                                cfg.gin_channels)
        self.proj = nn.Conv1d(cfg.hidden_channels, 2 * cfg.inter_channels, 1)

    def forward(self, spec: torch.Tensor, mask: torch.Tensor, g: torch.Tensor,
                rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """spec (B, F, T), mask (B, 1, T), g (B, gin, 1) -> z, m_q, logs_q (B, inter, T)."""
        stats = self.proj(self.enc(self.pre(spec) * mask, g, mask)) * mask
        m, logs = stats.split(self.inter, dim=1)
        return (m + standard_normal(m.shape, m, rng) * torch.exp(logs)) * mask, m, logs


@dataclass
class TrainingBatch:
    """A padded batch as the WebUI's collate makes it (TextAudioCollateMultiNSFsid)."""

    phone: torch.Tensor  # (B, T, D) content features, repeated to 100 frames/s
    phone_lengths: torch.Tensor  # (B,)
    pitch: torch.Tensor | None  # (B, T) coarse pitch (None: a model without pitch)
    pitchf: torch.Tensor | None  # (B, T) Hz
    spec: torch.Tensor  # (B, F, T) linear spectrogram
    spec_lengths: torch.Tensor  # (B,)
    wave: torch.Tensor  # (B, 1, T * hop)
    sid: torch.Tensor  # (B,) speaker

    def to(self, device: torch.device) -> "TrainingBatch":
        return TrainingBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                for f in fields(self)})


class TrainingSynthesizer(Synthesizer):
    """The WebUI's training generator (SynthesizerTrnMs*NSFsid*): the synthesizer, enc_q, and
    weight norm where the WebUI trains through it."""

    def __init__(self, cfg: SynthConfig, phone_dim: int, has_f0: bool, n_speakers: int, spec_channels: int,
                 segment_frames: int):
        super().__init__(cfg, phone_dim, has_f0, n_speakers)
        self.spec_channels, self.segment_frames = spec_channels, segment_frames
        self.enc_q = PosteriorEncoder(spec_channels, cfg)
        weight_normed(self)

    def webui_parameters(self) -> list[nn.Parameter]:
        """The parameters in the WebUI's order (its optimizer state is kept by position): v2
        re-creates enc_p after the rest, so it comes last there."""
        rest = ["dec", "enc_q", "flow", "emb_g"]
        tops = ["enc_p", *rest] if self.phone_dim == VERSION_PHONE_DIMS["v1"] else [*rest, "enc_p"]
        return [p for top in tops for p in getattr(self, top).parameters()]

    def train_forward(self, batch: TrainingBatch, rng: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The WebUI's training forward: y_hat (B, 1, segment) decoded from a random slice of
        the posterior z, with what the losses need. Random numbers are drawn from `rng` in
        the WebUI's order: enc_q's noise, the slice starts, the sine's (unused) initial
        phase and its noise."""
        g = self.emb_g(batch.sid).unsqueeze(-1)  # (B, gin, 1)
        x_mask = sequence_mask(batch.phone_lengths, batch.phone.shape[1])
        m_p, logs_p = self.enc_p(batch.phone, batch.pitch, x_mask)
        z_mask = sequence_mask(batch.spec_lengths, batch.spec.shape[2])
        z, m_q, logs_q = self.enc_q(batch.spec, z_mask, g, rng)
        z_p = self.flow(z, g, z_mask)
        u = torch.rand(len(batch.sid), generator=rng).to(z.device)
        starts = (u * (batch.spec_lengths - self.segment_frames + 1)).long()  # rand_slice_segments
        z_slice = slice_segments(z, starts, self.segment_frames)
        if self.has_f0:
            f0 = slice_segments(batch.pitchf, starts, self.segment_frames)
            torch.rand((len(batch.sid), 1), generator=rng)  # (the initial phase of harmonics: none here)
            noise = standard_normal((len(batch.sid), self.segment_frames * self.hop, 1), f0, rng)
            y_hat = self.dec(z_slice, g, f0, noise)
        else:
            y_hat = self.dec(z_slice, g)
        return {"y_hat": y_hat, "starts": starts, "z": z, "z_p": z_p, "m_p": m_p, "logs_p": logs_p,
                "m_q": m_q, "logs_q": logs_q, "z_mask": z_mask}


# The discriminators (infer/module/models.py): a scale discriminator on the waveform and
# one period discriminator per period, on the waveform folded into rows of that period.
# Kernels, strides and paddings are the WebUI's; the channel counts (and the scale one's
# groups) are read from the weights when there are pretrained ones.
SCALE_LAYERS = ((15, 1, 7), (41, 4, 20), (41, 4, 20), (41, 4, 20), (41, 4, 20), (5, 1, 2))  # kernel, stride, pad
SCALE_CHANNELS = ((16, 1), (64, 4), (256, 16), (1024, 64), (1024, 256), (1024, 1))  # WebUI: (out, groups)
PERIOD_STRIDES = (3, 3, 3, 3, 1)  # kernel (5, 1), padding (2, 0)
PERIOD_CHANNELS = (32, 128, 512, 1024, 1024)
PERIOD_KERNEL = 5
POST_KERNEL = 3
DISCRIMINATOR_PERIODS = {"v1": (2, 3, 5, 7, 11, 17), "v2": (2, 3, 5, 7, 11, 17, 23, 37)}


def discriminate(convs: nn.ModuleList, post: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A discriminator's stack: each convolution and a leaky ReLU, then conv_post; returns
    the flattened score and every layer's output (the feature maps of feature matching)."""
    fmap = []
    for conv in convs:
        x = F.leaky_relu(conv(x), LRELU_SLOPE)
        fmap.append(x)
    x = post(x)
    fmap.append(x)
    return torch.flatten(x, 1), fmap


class ScaleDiscriminator(nn.Module):
    """The WebUI's DiscriminatorS: strided grouped convolutions over the waveform."""

    def __init__(self, channels: Sequence[tuple[int, int]]):
        super().__init__()
        ins = [1] + [out for out, _ in channels[:-1]]
        self.convs = nn.ModuleList(nn.Conv1d(c_in, out, k, s, groups=groups, padding=p)
                                   for c_in, (out, groups), (k, s, p) in zip(ins, channels, SCALE_LAYERS))
        self.conv_post = nn.Conv1d(channels[-1][0], 1, POST_KERNEL, 1, padding=POST_KERNEL // 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # (B, 1, N)
        return discriminate(self.convs, self.conv_post, x)


class PeriodDiscriminator(nn.Module):
    """The WebUI's DiscriminatorP: 2-d convolutions over the waveform folded into rows of
    `period` samples (reflect-padded to a whole number of rows)."""

    def __init__(self, period: int, channels: Sequence[int]):
        super().__init__()
        self.period = period
        ins = [1] + list(channels[:-1])
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, out, (PERIOD_KERNEL, 1), (stride, 1), padding=(PERIOD_KERNEL // 2, 0))
            for c_in, out, stride in zip(ins, channels, PERIOD_STRIDES))
        self.conv_post = nn.Conv2d(channels[-1], 1, (POST_KERNEL, 1), 1, padding=(POST_KERNEL // 2, 0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # (B, 1, N)
        b, c, n = x.shape
        if n % self.period:
            x = F.pad(x, (0, self.period - n % self.period), "reflect")
        x = x.view(b, c, -1, self.period)  # (B, 1, N / period, period)
        return discriminate(self.convs, self.conv_post, x)


class MultiPeriodDiscriminator(nn.Module):
    """The WebUI's MultiPeriodDiscriminator (v1) / MultiPeriodDiscriminatorV2 (v2)."""

    def __init__(self, periods: Sequence[int], scale: Sequence[tuple[int, int]] | None = None,
                 period_channels: Sequence[Sequence[int]] | None = None):
        """Without channel counts: the WebUI's (SCALE_CHANNELS, PERIOD_CHANNELS)."""
        super().__init__()
        scale = scale or SCALE_CHANNELS
        period_channels = period_channels or [PERIOD_CHANNELS] * len(periods)
        self.discriminators = nn.ModuleList(
            [ScaleDiscriminator(scale)] + [PeriodDiscriminator(p, c) for p, c in zip(periods, period_channels)])
        weight_normed(self)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], path: Path) -> "MultiPeriodDiscriminator":
        """The discriminator a D_*.pth's tensors describe (WebUI names)."""
        count = _count(state, "discriminators.{}.")
        periods = next((p for p in DISCRIMINATOR_PERIODS.values() if len(p) + 1 == count), None)
        if periods is None:
            raise ModelFileError(f"not a WebUI discriminator: {count} discriminators (v1 has 7, v2 9)", path)
        try:
            outs = [_shape(state, f"discriminators.0.convs.{i}") for i in range(len(SCALE_LAYERS))]
            ins = [1] + [o[0] for o in outs[:-1]]
            scale = [(o[0], c_in // o[1]) for c_in, o in zip(ins, outs)]
            period_channels = [[_shape(state, f"discriminators.{d}.convs.{i}")[0] for i in range(len(PERIOD_STRIDES))]
                               for d in range(1, count)]
        except KeyError as exc:
            raise ModelFileError(f"not a complete discriminator: missing tensor {exc.args[0]!r}", path) from exc
        return cls(periods, scale, period_channels)

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor) -> tuple[list, list, list, list]:
        """Real and generated waveforms (B, 1, N) -> each discriminator's outputs on both,
        and its feature maps on both."""
        real, fake, fmap_real, fmap_fake = [], [], [], []
        for d in self.discriminators:
            r, fr = d(y)
            g, fg = d(y_hat)
            real.append(r)
            fake.append(g)
            fmap_real.append(fr)
            fmap_fake.append(fg)
        return real, fake, fmap_real, fmap_fake


def linear_spectrogram(y: torch.Tensor, recipe: TrainingRecipe) -> torch.Tensor:
    """(B, N) -> (B, filter_length // 2 + 1, frames) magnitudes, as the WebUI's
    spectrogram_torch: reflect-padded by (n_fft − hop) / 2, not centred, periodic Hann."""
    pad = int((recipe.filter_length - recipe.hop) / 2)
    y = F.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    window = torch.hann_window(recipe.window, dtype=y.dtype, device=y.device)
    spec = torch.stft(y, recipe.filter_length, hop_length=recipe.hop, win_length=recipe.window, window=window,
                      center=False, normalized=False, onesided=True, return_complex=True)
    return torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + SPECTROGRAM_EPS)


@lru_cache(maxsize=8)
def _mel_basis(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=None)  # Slaney, as the WebUI


def spec_to_mel(spec: torch.Tensor, recipe: TrainingRecipe) -> torch.Tensor:
    """(B, F, T) magnitudes -> (B, n_mels, T) log mel (the WebUI's spec_to_mel_torch)."""
    basis = torch.from_numpy(_mel_basis(recipe.sample_rate, recipe.filter_length, recipe.n_mels)).to(spec)
    return torch.log(torch.clamp(torch.matmul(basis, spec), min=MEL_FLOOR))


def discriminator_loss(real: Sequence[torch.Tensor], fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Least squares: real outputs towards 1, generated ones towards 0."""
    return sum(torch.mean((1 - r.float()) ** 2) + torch.mean(g.float() ** 2) for r, g in zip(real, fake))


def generator_loss(fake: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(torch.mean((1 - g.float()) ** 2) for g in fake)


FeatureMaps = Sequence[Sequence[torch.Tensor]]  # per discriminator, per layer


def feature_loss(fmap_real: FeatureMaps, fmap_fake: FeatureMaps) -> torch.Tensor:
    """Feature matching: the mean |difference| of every feature map, summed, × 2."""
    total = sum(torch.mean(torch.abs(r.float().detach() - g.float()))
                for dr, dg in zip(fmap_real, fmap_fake) for r, g in zip(dr, dg))
    return total * FEATURE_MATCHING_SCALE


def kl_loss(z_p: torch.Tensor, logs_q: torch.Tensor, m_p: torch.Tensor, logs_p: torch.Tensor,
            z_mask: torch.Tensor) -> torch.Tensor:
    """KL(posterior ‖ prior) per valid frame (summed over channels, divided by frames)."""
    kl = logs_p - logs_q - 0.5
    kl += 0.5 * ((z_p - m_p) ** 2) * torch.exp(-2.0 * logs_p)
    return torch.sum(kl * z_mask) / torch.sum(z_mask)


def grad_norm(parameters: Iterable[nn.Parameter]) -> float:
    """The total 2-norm of the gradients, as the WebUI logs it (commons.clip_grad_value_)."""
    return sum(p.grad.norm(2).item() ** 2 for p in parameters if p.grad is not None) ** 0.5


@dataclass
class StepReport:
    """The losses of one step (floats) and the gradients' norms."""

    loss_disc: float
    loss_gen: float
    loss_fm: float
    loss_mel: float
    loss_kl: float
    loss_gen_all: float
    grad_norm_d: float
    grad_norm_g: float


@dataclass
class MixedPrecision:
    """train.py's autocast and GradScaler: fp16 (scaled) or bf16 on a GPU; off (fp32) on the
    CPU, where the scaler passes everything through."""

    dtype: torch.dtype | None = None  # None: fp32
    scaler: Any = None  # torch.amp.GradScaler

    def __post_init__(self) -> None:
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self, device: torch.device, enabled: bool = True) -> Any:
        return torch.autocast(device.type, dtype=self.dtype or torch.float32,
                              enabled=enabled and self.dtype is not None)


def train_step(net_g: TrainingSynthesizer, net_d: MultiPeriodDiscriminator, optim_g: torch.optim.Optimizer,
               optim_d: torch.optim.Optimizer, batch: TrainingBatch, recipe: TrainingRecipe,
               rng: torch.Generator | None = None,
               precision: MixedPrecision | None = None) -> tuple[StepReport, dict[str, torch.Tensor]]:
    """One step of the WebUI's train_and_evaluate: the discriminator's update, then the
    generator's against the updated discriminator. Returns the losses and the forward's
    tensors. The losses are taken in fp32 whatever the autocast."""
    precision = precision or MixedPrecision()
    device, scaler = batch.spec.device, precision.scaler
    with precision.autocast(device):
        out = net_g.train_forward(batch, rng)
        y_hat, starts = out["y_hat"], out["starts"]
        y_mel = slice_segments(spec_to_mel(batch.spec, recipe), starts, recipe.segment_frames)
        with precision.autocast(device, enabled=False):
            y_hat_mel = spec_to_mel(linear_spectrogram(y_hat.float().squeeze(1), recipe), recipe)
        wave = slice_segments(batch.wave, starts * recipe.hop, recipe.segment)
        real, fake, _, _ = net_d(wave, y_hat.detach())
        with precision.autocast(device, enabled=False):
            loss_disc = discriminator_loss(real, fake)
    optim_d.zero_grad()
    scaler.scale(loss_disc).backward()
    scaler.unscale_(optim_d)
    grad_norm_d = grad_norm(net_d.parameters())
    scaler.step(optim_d)

    with precision.autocast(device):
        real, fake, fmap_real, fmap_fake = net_d(wave, y_hat)
        with precision.autocast(device, enabled=False):
            loss_mel = F.l1_loss(y_mel.float(), y_hat_mel) * recipe.c_mel
            loss_kl = kl_loss(*(out[k].float() for k in ("z_p", "logs_q", "m_p", "logs_p", "z_mask"))) * recipe.c_kl
            loss_fm = feature_loss(fmap_real, fmap_fake)
            loss_gen = generator_loss(fake)
            loss_gen_all = loss_gen + loss_fm + loss_mel + loss_kl
    optim_g.zero_grad()
    scaler.scale(loss_gen_all).backward()
    scaler.unscale_(optim_g)
    grad_norm_g = grad_norm(net_g.webui_parameters())  # (the WebUI's order: the same float sum)
    scaler.step(optim_g)
    scaler.update()
    report = StepReport(loss_disc.item(), loss_gen.item(), loss_fm.item(), loss_mel.item(), loss_kl.item(),
                        loss_gen_all.item(), grad_norm_d, grad_norm_g)
    return report, {**out, "y_mel": y_mel, "y_hat_mel": y_hat_mel, "wave": wave}


def webui_adamw(parameters: Sequence[nn.Parameter], recipe: TrainingRecipe) -> torch.optim.AdamW:
    """train.py's optimizer: AdamW with the config's rate, betas and eps (weight decay
    torch's default, 0.01, which train.py does not set)."""
    return torch.optim.AdamW(parameters, recipe.learning_rate, betas=recipe.betas, eps=recipe.eps)


# -----------------------------------------------------------------------------
# 12f. The trainer: --train DATASET_DIR NAME
# -----------------------------------------------------------------------------

# train/train.py's loop on a prepared folder (12d): the items present in every folder, in
# length buckets (DistributedBucketSampler: items "longer" than each boundary, their length
# estimated from the file size as the WebUI does; each epoch shuffled by its number), one
# step per batch (12e), the learning rate decayed per epoch, checkpoints in the WebUI's
# format (G_<step>.pth, D_<step>.pth: model, optimizer, learning_rate, iteration = epoch)
# every --save_every epochs and at the end, then the small model and the index.
TRAIN_BUCKETS = (100, 200, 300, 400, 500, 600, 700, 800, 900)  # train.py's boundaries
MAX_PHONE_FRAMES = 900  # the loader's cut (get_labels)
BUCKET_LENGTH_BYTES = 3  # length estimate: file bytes // (3 · hop)
DEFAULT_EPOCHS, DEFAULT_SAVE_EVERY, DEFAULT_KEEP_CHECKPOINTS = 200, 10, 2
LOG_LINES_PER_EPOCH = 4  # --log_every's default: about this many step events per epoch (every step of small runs)
WEBUI_SPEAKERS = 109  # spk_embed_dim of the WebUI's configs (one speaker is trained: 0)
WEBUI_FULL_SIZE = dict(inter=192, hidden=192, filter=768, heads=2, layers=6, initial=512, gin=256)
DECODER_INIT_STD = 0.01  # the WebUI's init_weights of the decoder's convolutions (from random)


@dataclass(frozen=True)
class TrainingItem:
    name: str
    wav: Path
    phone: Path
    pitch: Path | None
    pitchf: Path | None


def training_items(work: Path, version: str, has_f0: bool) -> list[TrainingItem]:
    """The chunks a prepared folder has every file of (the WebUI's filelist)."""
    items = []
    for wav in sorted((work / GT_WAVS).glob("*.wav")):
        name = wav.stem
        phone = work / FEATURE_DIRS[version] / f"{name}.npy"
        pitch, pitchf = (work / F0_COARSE_DIR / f"{name}.wav.npy", work / F0_HZ_DIR / f"{name}.wav.npy")
        if phone.is_file() and (not has_f0 or (pitch.is_file() and pitchf.is_file())):
            items.append(TrainingItem(name, wav, phone, pitch if has_f0 else None, pitchf if has_f0 else None))
    return items


def load_training_item(item: TrainingItem, recipe: TrainingRecipe) -> tuple:
    """(spec, wav, phone, pitch, pitchf) as the WebUI's loader makes them: features repeated
    to 100 frames/s and cut at MAX_PHONE_FRAMES; all cut to the shorter of phone and spec."""
    from scipy.io import wavfile

    rate, audio = wavfile.read(item.wav)
    if rate != recipe.sample_rate:
        raise InputAudioError(f"a {rate} Hz chunk in a {recipe.sample_rate} Hz training", item.wav)
    wav = torch.from_numpy(audio.astype(np.float32))[None]  # (1, N)
    spec = linear_spectrogram(wav, recipe)[0]  # (F, T)
    phone = np.repeat(np.load(item.phone), 2, axis=0)
    n = min(len(phone), MAX_PHONE_FRAMES)
    phone = torch.from_numpy(phone[:n]).float()
    pitch = None if item.pitch is None else torch.from_numpy(np.load(item.pitch)[:n]).long()
    pitchf = None if item.pitchf is None else torch.from_numpy(np.load(item.pitchf)[:n]).float()
    if len(phone) != spec.shape[-1]:
        n = min(len(phone), spec.shape[-1])
        spec, wav, phone = spec[:, :n], wav[:, :n * recipe.hop], phone[:n]
        pitch = None if pitch is None else pitch[:n]
        pitchf = None if pitchf is None else pitchf[:n]
    return spec, wav, phone, pitch, pitchf


def collate(rows: Sequence[tuple], sid: int = 0) -> TrainingBatch:
    """Zero-padded, longest first (TextAudioCollateMultiNSFsid)."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i][0].shape[1])  # (stable: as torch.sort on CPU here)
    rows = [rows[i] for i in order]
    b, frames, samples = len(rows), max(r[0].shape[1] for r in rows), max(r[1].shape[1] for r in rows)
    phones = max(r[2].shape[0] for r in rows)
    spec = torch.zeros(b, rows[0][0].shape[0], frames)
    wave = torch.zeros(b, 1, samples)
    phone = torch.zeros(b, phones, rows[0][2].shape[1])
    has_f0 = rows[0][3] is not None
    pitch = torch.zeros(b, phones, dtype=torch.long) if has_f0 else None
    pitchf = torch.zeros(b, phones) if has_f0 else None
    for i, (s, w, p, c, f) in enumerate(rows):
        spec[i, :, : s.shape[1]], wave[i, :, : w.shape[1]], phone[i, : len(p)] = s, w, p
        if has_f0:
            pitch[i, : len(c)], pitchf[i, : len(f)] = c, f
    lengths = partial(torch.tensor, dtype=torch.long)
    return TrainingBatch(phone, lengths([len(r[2]) for r in rows]), pitch, pitchf, spec,
                         lengths([r[0].shape[1] for r in rows]), wave, torch.full((b,), sid, dtype=torch.long))


def bucket_batches(lengths: Sequence[int], batch_size: int, epoch: int) -> list[list[int]]:
    """The WebUI's DistributedBucketSampler (one process): items by length bucket, each
    bucket filled up to whole batches by repeating it, shuffled by `epoch`."""
    buckets = [[i for i, n in enumerate(lengths) if lo < n <= hi] for lo, hi in zip(TRAIN_BUCKETS, TRAIN_BUCKETS[1:])]
    buckets = [b for b in buckets if b]
    g = torch.Generator().manual_seed(epoch)
    orders = [torch.randperm(len(b), generator=g).tolist() for b in buckets]
    batches = []
    for bucket, order in zip(buckets, orders):
        missing = -len(bucket) % batch_size
        order = order + order * (missing // len(bucket)) + order[: missing % len(bucket)]
        batches += [[bucket[k] for k in order[j: j + batch_size]] for j in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def webui_training_config(cfg: list, recipe: TrainingRecipe) -> dict:
    """The experiment's config.json as the WebUI writes it (so that it can resume ours)."""
    (_, _, inter, hidden, filt, heads, layers, kernel, dropout, resblock, rb_kernels, rb_dilations, rates,
     initial, up_kernels, speakers, gin, rate) = cfg
    return {
        "train": {"log_interval": 200, "seed": 1234, "epochs": 20000, "learning_rate": recipe.learning_rate,
                  "betas": list(recipe.betas), "eps": recipe.eps, "batch_size": recipe.batch_size,
                  "lr_decay": recipe.lr_decay, "segment_size": recipe.segment, "init_lr_ratio": 1,
                  "warmup_epochs": 0, "c_mel": recipe.c_mel, "c_kl": recipe.c_kl},
        "data": {"max_wav_value": 32768.0, "sampling_rate": rate, "filter_length": recipe.filter_length,
                 "hop_length": recipe.hop, "win_length": recipe.window, "n_mel_channels": recipe.n_mels,
                 "mel_fmin": 0.0, "mel_fmax": None},
        "model": {"inter_channels": inter, "hidden_channels": hidden, "filter_channels": filt, "n_heads": heads,
                  "n_layers": layers, "kernel_size": kernel, "p_dropout": dropout, "resblock": resblock,
                  "resblock_kernel_sizes": rb_kernels, "resblock_dilation_sizes": rb_dilations,
                  "upsample_rates": rates, "upsample_initial_channel": initial,
                  "upsample_kernel_sizes": up_kernels, "use_spectral_norm": False, "gin_channels": gin,
                  "spk_embed_dim": speakers},
    }


def default_generator_config(version: str, rate: int) -> list:
    """The WebUI's full-size generator of a version and rate (for training from random weights)."""
    spec, rates, kernels = WEBUI_UPSAMPLING[(version, rate)]
    s = WEBUI_FULL_SIZE
    return [spec, WEBUI_SEGMENT_FRAMES, s["inter"], s["hidden"], s["filter"], s["heads"], s["layers"],
            WEBUI_TEXT_KERNEL, 0, "1", [3, 7, 11], [list(WEBUI_DILATIONS)] * 3, list(rates), s["initial"],
            list(kernels), WEBUI_SPEAKERS, s["gin"], rate]


def load_into(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """WebUI-named weights into a training net; every key and shape must fit."""
    ours = from_webui_names(state)
    expected = net.state_dict()
    missing = [k for k in expected if k not in ours]
    if missing or any(k not in expected for k in ours):
        extra = [k for k in ours if k not in expected]
        raise ModelFileError(f"the checkpoint does not fit this training: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}", path)
    for key, value in ours.items():
        if value.shape != expected[key].shape:
            raise ModelFileError(f"the checkpoint does not fit: {key} is {list(value.shape)}, the network's "
                                 f"{list(expected[key].shape)}", path)
    net.load_state_dict({k: v.float() for k, v in ours.items()})


def latest_checkpoints(work: Path) -> tuple[Path, Path] | None:
    """The newest G_<step>.pth with its D_<step>.pth in the work folder."""
    steps = sorted(int(m.group(1)) for p in work.glob("G_*.pth") if (m := re.fullmatch(r"G_(\d+)\.pth", p.name))
                   and (work / f"D_{m.group(1)}.pth").is_file())
    return (work / f"G_{steps[-1]}.pth", work / f"D_{steps[-1]}.pth") if steps else None


def save_checkpoint(net: nn.Module, optim: torch.optim.Optimizer, recipe: TrainingRecipe, epoch: int,
                    path: Path) -> None:
    state = to_webui_names(net.state_dict())
    save_model_atomic({"model": state, "iteration": epoch, "optimizer": optim.state_dict(),
                       "learning_rate": recipe.learning_rate}, path)


def prune_checkpoints(work: Path, keep: int) -> None:
    steps = sorted(int(m.group(1)) for p in work.glob("G_*.pth") if (m := re.fullmatch(r"G_(\d+)\.pth", p.name)))
    for step in steps[:-keep] if keep > 0 else []:
        for kind in "GD":
            (work / f"{kind}_{step}.pth").unlink(missing_ok=True)


def init_from_random(net: TrainingSynthesizer) -> None:
    """What the WebUI's constructors give a generator that no pretrained file fills: normal
    embeddings and the decoder's convolutions drawn with DECODER_INIT_STD."""
    for embedding in (net.emb_g, net.enc_p.emb_pitch):
        if embedding is not None:
            nn.init.normal_(embedding.weight)
    with torch.no_grad():
        for name, module in net.dec.named_modules():
            if name.startswith(("ups.", "resblocks.")) and isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                direction = module.parametrizations.weight.original1
                direction.normal_(0.0, DECODER_INIT_STD)
                module.parametrizations.weight.original0.copy_(
                    torch.linalg.vector_norm(direction, dim=tuple(range(1, direction.dim())), keepdim=True))


def training_networks(run: Run, version: str, rate: int, recipe: TrainingRecipe, work: Path,
                      seed: int) -> dict[str, Any]:
    """The generator and discriminator to train: the latest checkpoints of the work folder
    (a resumption), else the pretrained files, else random weights (with a warning)."""
    args = run.args
    resume = latest_checkpoints(work) if work.is_dir() else None
    sources = resume or (None if args.pretrained_g is None else Path(args.pretrained_g),
                         None if args.pretrained_d is None else Path(args.pretrained_d))
    g_ckpt = read_training_checkpoint(sources[0], "G") if sources[0] else None
    d_ckpt = read_training_checkpoint(sources[1], "D") if sources[1] else None
    if g_ckpt is None or d_ckpt is None:
        run.warn("training starts from random weights (no --pretrained_g/--pretrained_d): on a small dataset "
                 "the voice will be poor; the WebUI's pretrained_v2/f0G40k.pth and f0D40k.pth are the usual start")
    torch.manual_seed(seed)  # (train.py seeds before it builds the networks)
    if g_ckpt is not None:
        config = config_from_weights(g_ckpt["model"], sources[0], rate)
        if PHONE_DIM_VERSIONS[g_ckpt["model"]["enc_p.emb_phone.weight"].shape[1]] != version:
            raise UsageError(f"{sources[0].name} is not a {version} generator; give its --model_version", sources[0])
        if config[-1] != rate:
            raise UsageError(f"{sources[0].name} is a {config[-1]} Hz generator; give --sample_rate {config[-1]}",
                             sources[0])
        has_f0, speakers = "enc_p.emb_pitch.weight" in g_ckpt["model"], g_ckpt["model"]["emb_g.weight"].shape[0]
    else:
        config, has_f0, speakers = default_generator_config(version, rate), True, WEBUI_SPEAKERS
    if config[0] != recipe.filter_length // 2 + 1:
        raise ModelFileError(f"the generator reads {config[0]} spectrogram channels, a {rate} Hz training "
                             f"makes {recipe.filter_length // 2 + 1}", sources[0])
    net_g = TrainingSynthesizer(SynthConfig.from_list(config), VERSION_PHONE_DIMS[version], has_f0, speakers,
                                config[0], recipe.segment_frames)
    if g_ckpt is not None:
        load_into(net_g, g_ckpt["model"], sources[0])
    else:
        init_from_random(net_g)
    if d_ckpt is not None:
        net_d = MultiPeriodDiscriminator.from_state(d_ckpt["model"], sources[1])
        load_into(net_d, d_ckpt["model"], sources[1])
    else:
        net_d = MultiPeriodDiscriminator(DISCRIMINATOR_PERIODS[version])
    device, dtype = use_device(args)
    if device.type != "cuda" and dtype != torch.float32:
        run.warn(f"--precision {precision_name(dtype)} has no effect on training on the {device.type}: it is fp32")
    precision = MixedPrecision(dtype if device.type == "cuda" and dtype != torch.float32 else None)
    net_g.to(device).train()
    net_d.to(device).train()
    optim_g, optim_d = webui_adamw(net_g.webui_parameters(), recipe), webui_adamw(list(net_d.parameters()), recipe)
    epoch, step = 1, 0
    if resume:
        optim_g.load_state_dict(g_ckpt["optimizer"])
        optim_d.load_state_dict(d_ckpt["optimizer"])
        epoch, step = int(g_ckpt["iteration"]) + 1, int(resume[0].stem.split("_")[1])
    return dict(net_g=net_g, net_d=net_d, optim_g=optim_g, optim_d=optim_d, config=config, has_f0=has_f0,
                epoch=epoch, step=step, device=device, precision=precision,
                resumed=str(resume[0]) if resume else None)


def train(run: Run) -> int:
    """--train DATASET_DIR NAME: prepare the dataset (12d), train (the WebUI's recipe),
    then write <models_dir>/rvc/NAME.pth and NAME.index."""
    args = run.args
    dataset = Path(args.train[0])
    model_path, index_path = (voice_target(run, args.train[1], suffix) for suffix in (".pth", ".index"))
    name = model_path.stem
    version, rate = args.model_version or "v2", args.sample_rate or DEFAULT_DATASET_RATE
    recipe = TRAINING_RECIPES[(version, rate)]
    recipe = replace(recipe, batch_size=args.batch_size or recipe.batch_size)
    work = Path(args.work_dir) if args.work_dir else run.paths.models_dir / "training" / name
    seed = 1234 if args.seed is None else args.seed  # (the WebUI's configs' seed)
    dataset_files(dataset)
    nets = training_networks(run, version, rate, recipe, work, seed)
    net_g, net_d, optim_g, optim_d, device = (nets[k] for k in ("net_g", "net_d", "optim_g", "optim_d", "device"))
    epochs = args.epochs or DEFAULT_EPOCHS

    hubert = load_dataset_hubert(run, version, device)
    method, rmvpe = choose_f0_method(args.f0_method, run.paths.rmvpe)[0], None
    if nets["has_f0"] and method == "rmvpe":
        with incomplete_download_hint(run.paths.rmvpe, RMVPE_FILE):
            rmvpe = run.load("rmvpe", run.paths.rmvpe, lambda _: load_rmvpe(run.paths.rmvpe)).to(device)
    work.mkdir(parents=True, exist_ok=True)
    slice_dataset(run, dataset, work, rate)
    extract_dataset_features(run, work, hubert, version, device)
    if nets["has_f0"]:
        extract_dataset_pitch(run, work, method, rmvpe, device)
    del hubert, rmvpe  # (half a gigabyte at full size that training does not need)
    release_freed_memory()
    items = training_items(work, version, nets["has_f0"])
    lengths = [item.wav.stat().st_size // (BUCKET_LENGTH_BYTES * recipe.hop) for item in items]
    steps_per_epoch = len(bucket_batches(lengths, recipe.batch_size, 1))  # (the same in every epoch)
    if not steps_per_epoch:
        raise InputAudioError("no chunk is long enough to train on (each must be about a second or more)", dataset)
    with atomic_file(work / "config.json") as tmp:  # (the WebUI's, so that it can resume from here)
        tmp.write_text(json.dumps(webui_training_config(nets["config"], recipe), indent=4))

    log_every = args.log_every or max(1, steps_per_epoch // LOG_LINES_PER_EPOCH)
    epoch, step, saved_step = nets["epoch"], nets["step"], nets["step"]
    checkpoints: list[str] = []  # (in the report as they are written: an interrupted run names its last)
    run.report.update(work_dir=str(work), checkpoints=checkpoints, resumed_from=nets["resumed"])

    def save(at_epoch: int) -> None:
        nonlocal saved_step
        for kind, net, optim in (("G", net_g, optim_g), ("D", net_d, optim_d)):
            save_checkpoint(net, optim, recipe, at_epoch, work / f"{kind}_{step}.pth")
        saved_step = step
        checkpoints.append(str(work / f"G_{step}.pth"))
        if args.save_models:  # (the WebUI's save_every_weights, under its names)
            save_model_atomic(small_model(to_webui_names(net_g.state_dict()), nets["config"], f"{at_epoch}epoch"),
                              model_path.with_name(f"{name}_e{at_epoch}_s{step}.pth"))
        prune_checkpoints(work, DEFAULT_KEEP_CHECKPOINTS if args.keep_checkpoints is None else args.keep_checkpoints)

    started, last = time.perf_counter(), None
    run.state.deferring = True  # SIGINT/SIGTERM: stop after the step, with a checkpoint
    try:
        for epoch in range(epoch, epochs + 1):
            lr = recipe.learning_rate * recipe.lr_decay ** (epoch - 1)  # ExponentialLR, stepped per epoch
            for optim in (optim_g, optim_d):
                for group in optim.param_groups:
                    group["lr"] = lr
            for ids in bucket_batches(lengths, recipe.batch_size, epoch):
                batch = collate([load_training_item(items[i], recipe) for i in ids]).to(device)
                last, _ = train_step(net_g, net_d, optim_g, optim_d, batch, recipe,
                                     torch.Generator().manual_seed(seed + step), nets["precision"])
                step += 1
                losses = {k: v for k, v in asdict(last).items() if k.startswith("loss_")}
                if not all(math.isfinite(v) for v in losses.values()):
                    raise InferenceError(f"the losses stopped being finite at step {step} (epoch {epoch}); the last "
                                         f"checkpoint is kept ({checkpoints[-1] if checkpoints else 'none yet'})")
                seconds = time.perf_counter() - started
                if args.json and (step % log_every == 0 or step == 1):
                    losses.pop("loss_gen_all")
                    print_json({"event": "step", "epoch": epoch, "step": step, **losses, "lr": lr,
                                "seconds": round(seconds, 3)})
                done, total = step - nets["step"], (epochs - nets["epoch"] + 1) * steps_per_epoch  # (this run's)
                rate_now = done / max(seconds, 1e-9)
                eta = (total - done) / max(rate_now, 1e-9)
                run.progress_line(f"epoch {epoch}/{epochs} step {step}: mel {last.loss_mel:.2f} kl {last.loss_kl:.2f} "
                                  f"gen {last.loss_gen:.2f} disc {last.loss_disc:.2f}, {rate_now:.2f} steps/s, "
                                  f"ETA {eta / 60:.0f} min")
                if run.state.interrupted_by is not None:
                    raise KeyboardInterrupt
            if epoch % (args.save_every or DEFAULT_SAVE_EVERY) == 0 or epoch == epochs:
                save(epoch)
    except KeyboardInterrupt:
        if step > saved_step:
            save(epoch)
        raise
    finally:
        run.state.deferring = False

    save_model_atomic(small_model(to_webui_names(net_g.state_dict()), nets["config"], f"{epochs}epoch"), model_path)
    _, index = train_feature_index(read_features(work / FEATURE_DIRS[version]), seed, run.say)
    write_index_atomic(index, index_path)
    elapsed = time.perf_counter() - run.state.started
    run.report.update(model=str(model_path), index=str(index_path), epochs=epochs, steps=step, chunks=len(items),
                      losses=None if last is None else asdict(last), seconds=round(elapsed, 3))
    run.say(f"trained {name} for {epochs} epochs ({step} steps) in {elapsed / 60:.1f} min: {model_path} and "
            f"{index_path.name}")
    return EXIT_OK


# -----------------------------------------------------------------------------
# 12g. The mode a command line asks for
# -----------------------------------------------------------------------------

TRAINING_TOOLS = ("prepare_dataset", "build_index", "extract_model", "merge_models", "train")


def training_tool(run: Run) -> Callable[[Run], int] | None:
    """The training tool the command line asks for, if any."""
    chosen = [name for name in TRAINING_TOOLS if getattr(run.args, name)]
    if len(chosen) > 1:
        raise UsageError(f"--{chosen[0]} and --{chosen[1]} cannot be combined")
    if chosen and (run.args.input or run.args.output or run.args.model):
        raise UsageError(f"--{chosen[0]} takes no INPUT, OUTPUT or MODEL: {run.args.input!r} is extra")
    return {"prepare_dataset": prepare_dataset, "build_index": build_index, "extract_model": extract_model,
            "merge_models": merge_models, "train": train}[chosen[0]] if chosen else None


def run_mode(run: Run) -> int:
    """The mode the command line asks for: a worker, a training tool, or one job."""
    tool = training_tool(run)
    if tool is not None:
        return tool(run)
    return serve(run) if run.args.serve else job_mode(run)


# =============================================================================
# 13. Command line
# =============================================================================

# torch's oneDNN convolutions (through ideep) keep every primitive they build in an LRU of
# LRU_CACHE_CAPACITY entries, 1024 by default, keyed by shape. Segments differ in length,
# so every segment added ~30 new entries that were never used again: the heap grew with the
# input until the cache was full (+32 MB live over 50 segments with the tests' tiny
# networks). A small cache still holds every shape a segment repeats (the decoder's chunks);
# measured, 60 s and 10 s conversions ran as fast with 1 entry as with 1024 (a primitive is
# cheap to rebuild against the convolution it runs), and the outputs are identical.
CONV_CACHE_ENTRIES = 128


def bound_convolution_cache() -> None:
    """Cap the oneDNN primitive cache (read once, at torch's first convolution; a user's own
    LRU_CACHE_CAPACITY wins)."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(CONV_CACHE_ENTRIES))


def main(argv: Sequence[str] | None = None) -> int:
    """One run of the command line: its exit code; one line on stderr for a failure (and
    its traceback with --verbose), one JSON object on stdout with --json."""
    keep_freed_memory()
    bound_convolution_cache()
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    verbose = "--verbose" in argv
    state = RunState()

    def start() -> Run:
        args = build_parser().parse_args(argv)
        return Run(args, Paths.resolve(args), state)

    with contextlib.nullcontext() if verbose else quiet_library_warnings(), state.signals(), state.owned:
        run, code, error = execute(state, start, run_mode, verbose)
    if want_json and not (run is not None and run.args.serve):
        # With OUTPUT "-" stdout is the audio: the report is stderr's last line.
        audio_on_stdout = run.args.output == STDIO if run is not None else STDIO in argv
        print_json(report_object(state, run, code, error), file=sys.stderr if audio_on_stdout else None)
    return code


if __name__ == "__main__":
    exit_code = main()
    # main() has closed, published or removed every file of the run. What Python's own
    # shutdown would add is torch's teardown (0.6 s after every run, measured) and, after an
    # interruption, a wait for an F0 worker thread inside WORLD's C code: exit at once.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: nothing more to say
            pass
    os._exit(exit_code)
