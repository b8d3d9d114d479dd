"""Shared benchmark plumbing: full-size random models with the real configurations, and
whole-process measurements (wall time and peak RSS of a child process)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


@dataclass
class Measured:
    wall: float  # seconds, the whole process
    peak_rss_mb: float  # the child's peak resident memory
    returncode: int
    stdout: str
    stderr: str


def measure(argv: list, env: dict | None = None) -> Measured:
    """Run a child process (built by python_with_peak); its wall time and peak RSS."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    return Measured(wall, _reported_peak_mb(stderr), proc.returncode, stdout, stderr)


def _reported_peak_mb(stderr: str) -> float:
    for line in reversed(stderr.splitlines()):
        if line.startswith("PEAK_RSS_KB="):
            return int(line.split("=", 1)[1]) / 1024
    return float("nan")


# The child reports its own peak from /proc (VmHWM): getrusage's ru_maxrss would carry over
# the high-water mark of the forked parent across exec, and this parent holds big models.
# It reports also when the script ends with os._exit (rvc_modulator.py does, after main()).
PEAK_WRAPPER = (
    "import os, re, runpy, sys;"
    "sys.argv = sys.argv[1:]\n"
    "def report():\n"
    "    hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
    "    print(f'PEAK_RSS_KB={hwm}', file=sys.stderr, flush=True)\n"
    "exit_now = os._exit\n"
    "def reported_exit(code):\n    report()\n    exit_now(code)\n"
    "os._exit = reported_exit\n"
    "code = 0\n"
    "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as e:\n    code = e.code if isinstance(e.code, int) else 0\n"
    "report()\n"
    "sys.exit(code)"
)


def python_with_peak(script: Path, *args) -> list:
    """argv running `script args` in a Python that reports its own peak RSS on exit."""
    return [sys.executable, "-c", PEAK_WRAPPER, script, *args]


def build_models(root: Path, size: str = "full") -> Path:
    """models/ with random models of the real architectures: size "full" is a v2 40k voice
    model, HuBERT base (fairseq) and RMVPE at their real sizes; "tiny" the tests' small ones
    (a v1 40k voice, as the tiny HuBERT is 64 wide), for long runs that test the pipeline's
    own memory rather than the networks'."""
    from factories import make_hubert_fairseq, make_rmvpe_file, make_voice_model_file

    (root / "rvc").mkdir(parents=True, exist_ok=True)
    if not (root / "rvc" / "bench.pth").exists():
        make_voice_model_file(root / "rvc" / "bench.pth", version="v2" if size == "full" else "v1",
                              sample_rate=40000, f0=True, size=size, seed=0)
    if not (root / "hubert_base.pt").exists():
        make_hubert_fairseq(root / "hubert_base.pt", size=size, seed=0)
    if not (root / "rmvpe.pt").exists():
        make_rmvpe_file(root / "rmvpe.pt", size=size, seed=0)
    return root


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    line = lambda r: "  ".join(str(r[k]).rjust(widths[k]) for k in keys)  # noqa: E731
    return "\n".join([line({k: k for k in keys}), *map(line, rows)])
