#!/usr/bin/env python3
"""Whole conversions on full-size random models: start-up, load, conversion, real-time
factor and peak RSS, for 10 s and 60 s of speech-like audio with harvest and with rmvpe.

    python bench/bench_convert.py                   # the table of the issue
    python bench/bench_convert.py --seconds 60 300 --methods rmvpe     # memory vs duration
    python bench/bench_convert.py --size tiny --seconds 3600           # an hour through the pipeline

Each run is a fresh `rvc_modulator.py ... --json` process (what a service pays per call).
Real-time factor = conversion time / audio duration (below 1: faster than real time).
"""
from __future__ import annotations

import argparse
import json
import sys

import soundfile as sf

from _harness import REPO, build_models, measure, python_with_peak, table

SR = 16000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--methods", nargs="+", default=["harvest", "rmvpe"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=["full", "tiny"], default="full",
                        help="full: the real architectures' sizes; tiny: the tests' small models")
    args = parser.parse_args()

    from conftest import speech_like

    out = REPO / "bench" / "out"
    models = build_models(out / f"models_{args.size}", args.size)
    rows = []
    for seconds in args.seconds:
        source = out / f"speech_{seconds:g}s.wav"
        if not source.exists():
            sf.write(source, speech_like(seconds), SR, subtype="PCM_16")
        for method in args.methods:
            run = measure(python_with_peak(REPO / "rvc_modulator.py", source, out / "converted.wav", "bench",
                                           "--models_dir", models, "--f0_method", method, "--device", args.device,
                                           "--json", "--quiet"))
            if run.returncode != 0:
                sys.exit(f"{seconds:g} s {method}: failed\n{run.stderr}")
            report = json.loads(run.stdout)
            t = report["timings"]
            convert = t["total"] - t["load"]  # read, f0, features, synthesis, post-processing, write
            rows.append({"audio s": f"{seconds:g}", "f0": method, "device": report["device"],
                         "start-up s": f"{run.wall - t['total']:.2f}", "load s": f"{t['load']:.2f}",
                         "f0 s": f"{t['f0']:.2f}", "features s": f"{t['features']:.2f}",
                         "synthesis s": f"{t['synthesis']:.2f}", "convert s": f"{convert:.2f}",
                         "RTF": f"{convert / seconds:.3f}", "process s": f"{run.wall:.2f}",
                         "peak RSS MB": f"{run.peak_rss_mb:.0f}"})
            print(table(rows[-1:]) if len(rows) == 1 else table(rows).splitlines()[-1], flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
