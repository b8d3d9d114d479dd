#!/usr/bin/env python3
"""How long the real-size weights take to load, and the memory it takes.

Builds full-size random models with the real configurations (a v2 40k voice model,
HuBERT base in fairseq format, RMVPE) once under bench/out/, then loads each in a fresh
process and reports the load time (in-process) and the process's peak RSS.

    python bench/bench_load.py
"""
from __future__ import annotations

import json
import sys

from _harness import REPO, build_models, measure, python_with_peak, table

LOADER = """
import json, sys, time
sys.path.insert(0, {repo!r})
import_start = time.perf_counter()
import rvc_modulator as rvc
imported = time.perf_counter()
model = getattr(rvc, sys.argv[1])(rvc.Path(sys.argv[2]))
loaded = time.perf_counter()
params = sum(p.numel() for p in (model.net if hasattr(model, "net") else model).parameters())
print(json.dumps({{"import_s": imported - import_start, "load_s": loaded - imported, "params": params}}))
"""


def main() -> None:
    out = REPO / "bench" / "out"
    models = build_models(out / "models_full")
    script = out / "load_one.py"
    script.write_text(LOADER.format(repo=str(REPO)))
    rows = []
    for what, loader, path in [("voice model v2 40k", "load_voice_model", models / "rvc" / "bench.pth"),
                               ("HuBERT base (fairseq)", "load_hubert", models / "hubert_base.pt"),
                               ("RMVPE", "load_rmvpe", models / "rmvpe.pt")]:
        run = measure(python_with_peak(script, loader, path))
        if run.returncode != 0:
            sys.exit(f"{what}: failed\n{run.stderr}")
        facts = json.loads(run.stdout)
        rows.append({"model": what, "file MB": f"{path.stat().st_size / 2**20:.0f}",
                     "params M": f"{facts['params'] / 1e6:.1f}", "import s": f"{facts['import_s']:.2f}",
                     "load s": f"{facts['load_s']:.2f}", "process s": f"{run.wall:.2f}",
                     "peak RSS MB": f"{run.peak_rss_mb:.0f}"})
    print(table(rows))


if __name__ == "__main__":
    main()
