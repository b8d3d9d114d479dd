#!/usr/bin/env python3
"""The service worker's latency: one short conversion as a fresh process, against the same
conversion as a request to a running `--serve` worker (models already loaded).

    python bench/bench_serve.py                    # full-size models, 3 s of audio
    python bench/bench_serve.py --size tiny --seconds 1 --requests 10

Per request it prints the wall time from writing the request to reading its response, the
request's own `timings.total` (what the conversion itself took inside the worker) and the
difference: the worker's per-request overhead (JSON, option parsing, cache lookups, pipes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import soundfile as sf

from _harness import REPO, build_models, measure, table

SR = 16000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    args = parser.parse_args()

    from conftest import speech_like

    out = REPO / "bench" / "out"
    models = build_models(out / f"models_{args.size}", args.size)
    source = out / f"speech_{args.seconds:g}s.wav"
    if not source.exists():
        sf.write(source, speech_like(args.seconds), SR, subtype="PCM_16")
    script = REPO / "rvc_modulator.py"
    common = ["--models_dir", str(models), "--f0_method", "rmvpe", "--device", "cpu", "--seed", "1"]

    one_shot = measure([sys.executable, script, source, out / "serve_cli.wav", "bench", *common, "--json", "--quiet"])
    if one_shot.returncode != 0:
        sys.exit(one_shot.stderr)

    worker = subprocess.Popen([sys.executable, str(script), "--serve", "--models_dir", str(models), "--device", "cpu",
                               "--quiet"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    started = time.perf_counter()
    assert json.loads(worker.stdout.readline())["ready"]
    ready = time.perf_counter() - started
    rows = []
    for i in range(args.requests):
        request = {"id": i, "input": str(source), "output": str(out / "serve_worker.wav"), "model": "bench",
                   "f0_method": "rmvpe", "seed": 1}
        start = time.perf_counter()
        worker.stdin.write(json.dumps(request) + "\n")
        worker.stdin.flush()
        response = json.loads(worker.stdout.readline())
        wall = time.perf_counter() - start
        if not response["ok"]:
            sys.exit(response)
        total = response["timings"]["total"]
        rows.append({"request": i, "wall s": f"{wall:.3f}", "timings.total s": f"{total:.3f}",
                     "overhead ms": f"{(wall - total) * 1000:.1f}", "load s": f"{response['timings']['load']:.3f}"})
    worker.stdin.close()
    worker.wait()
    print(table(rows))
    warm = [float(r["wall s"]) for r in rows[1:]] or [float(rows[0]["wall s"])]
    overhead = [float(r["overhead ms"]) for r in rows]
    print()
    print(table([{"audio s": f"{args.seconds:g}", "one-shot process s": f"{one_shot.wall:.2f}",
                  "worker ready s": f"{ready:.2f}", "worker request s (median, warm)": f"{statistics.median(warm):.3f}",
                  "overhead ms (median)": f"{statistics.median(overhead):.1f}",
                  "identical output": (out / "serve_cli.wav").read_bytes()
                  == (out / "serve_worker.wav").read_bytes()}]))


if __name__ == "__main__":
    main()
