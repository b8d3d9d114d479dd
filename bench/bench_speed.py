#!/usr/bin/env python3
"""Speed in one run: the synthesizer against the machine's GEMM/convolution peak, then whole
conversions in fp32 and bf16 with the full-size random models, and bf16's SNR against fp32.

    python bench/bench_speed.py                          # 10 s and 60 s
    python bench/bench_speed.py --baseline OLD.py        # also an older rvc_modulator.py, same inputs
    python bench/bench_speed.py --compare DRIVER.py ARG... {input} {output}   # another converter

1. In this process: torch.mm 2048^3 and a large conv1d in fp32 and bf16 (the faster of the
   two is the peak), and the full-size v2 40k synthesizer on 10 s of frames, fp32 and
   mixed bf16; its FLOPs are counted from the layers it runs (2 x output elements x inputs
   per output, for every conv and linear).
2. Each conversion is a fresh `rvc_modulator.py ... --json` process, as a service pays it:
   wall time, RTF (conversion time / audio duration) and the child's own peak RSS.
3. SNR of the bf16 output against the fp32 output of the same input and --seed.
4. With --compare, another converter's Python script runs on the same inputs, measured the
   same way ({input} and {output} in its arguments are replaced by the WAV paths; it gets
   bench/out/models_full, whose files it may read, through $BENCH_MODELS), and each of our
   rows gets "x compare": its process time over ours. This is how the official RVC WebUI
   is timed beside us: a driver script that calls its VC.get_vc and VC.vc_single, kept
   outside this repository like the WebUI itself.
Compare figures only within one run: machines and their load differ.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import soundfile as sf

from _harness import REPO, build_models, measure, python_with_peak, table

SR = 16000
SEED = 7


def best_of(fn, runs: int = 2) -> float:
    fn()  # warm-up: kernels are built on first use
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def counted_flops(net, *inputs) -> float:
    """FLOPs of one forward pass, from every Conv1d, ConvTranspose1d and Linear it runs.
    The decoder's matrix-product paths for its transposed and one-channel convolutions
    bypass the layers' forward (and so the hooks): for the count, the layers run instead."""
    import torch

    import rvc_modulator as rvc

    total = [0.0]

    def hook(module, args, output):
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            per_output = module.in_channels // module.groups * module.kernel_size[0]
            if isinstance(module, torch.nn.ConvTranspose1d):  # each input meets every tap once
                per_output = module.in_channels * module.kernel_size[0] / module.stride[0]
        else:
            per_output = module.in_features
        total[0] += 2.0 * output.numel() * per_output

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear))]
    fast_paths = rvc.conv_transpose1d_gemm, rvc.conv1d_one_channel
    rvc.conv_transpose1d_gemm = rvc.conv1d_one_channel = lambda x, layer: layer(x)
    try:
        net.infer(*inputs, noise=False)
    finally:
        rvc.conv_transpose1d_gemm, rvc.conv1d_one_channel = fast_paths
        for h in handles:
            h.remove()
    return total[0]


def synthesizer_figures(models) -> list[dict]:
    import torch

    import rvc_modulator as rvc

    rvc.keep_freed_memory()
    rows = []
    # The peak per dtype: the faster of torch.mm and a large convolution (on some CPUs, e.g.
    # AMD Zen 5, oneDNN's fp32 convolution runs well above the fp32 matrix product).
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        x, w = torch.randn(1, 256, 65536, dtype=dtype), torch.randn(256, 256, 3, dtype=dtype)
        for what, fn, flop in ((f"torch.mm 2048^3 {name}", lambda: a @ b, 2 * 2048 ** 3),
                               (f"conv1d 256->256 k3 x 65536 {name}",
                                lambda: torch.nn.functional.conv1d(x, w, padding=1), 2 * 256 * 256 * 3 * 65536)):
            seconds = best_of(fn, 3)
            peaks[name] = max(peaks.get(name, 0.0), flop / seconds / 1e9)
            rows.append({"what": what, "seconds": f"{seconds:.3f}", "GFLOP/s": f"{flop / seconds / 1e9:.0f}",
                         "share of peak": ""})
    voice = rvc.load_voice_model(models / "rvc" / "bench.pth")
    frames = 10 * rvc.FRAMES_PER_SECOND
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, frames, voice.phone_dim, generator=g), torch.randint(2, 255, (1, frames), generator=g),
              100 + 200 * torch.rand(1, frames, generator=g), torch.tensor([0]))
    flops = counted_flops(voice.net, *inputs)
    mixed = voice.net.with_low_precision(torch.bfloat16)
    for name, net, peak in (("fp32", voice.net, peaks["fp32"]), ("mixed bf16", mixed, peaks["bf16"])):
        seconds = best_of(lambda: net.infer(*inputs, noise=False))
        achieved = flops / seconds / 1e9
        rows.append({"what": f"synthesizer, 10 s of audio, {name} ({flops / 1e9:.0f} GFLOP)",
                     "seconds": f"{seconds:.2f}", "GFLOP/s": f"{achieved:.0f}",
                     "share of peak": f"{achieved / peak:.0%}"})
    return rows


def print_last_row(rows: list[dict]) -> None:
    """The newest row as it will stand in the final table (with the header, for the first)."""
    print(table(rows[-1:]) if len(rows) == 1 else table(rows).splitlines()[-1], flush=True)


def compare_run(command: list | None, source, target, models, seconds: float) -> dict | None:
    """One run of the --compare converter on `source`, as a row of the results table."""
    if not command:
        return None
    script, *rest = command
    argv = [a.replace("{input}", str(source)).replace("{output}", str(target)) for a in rest]
    run = measure(python_with_peak(script, *argv), env={"BENCH_MODELS": str(models)})
    if run.returncode != 0 or not target.exists():
        sys.exit(f"--compare failed on {seconds:g} s:\n{run.stderr[-2000:]}")
    return {"audio s": f"{seconds:g}", "script": "compare", "precision": "its own",
            "process s": f"{run.wall:.2f}", "RTF": "", "f0 s": "", "features s": "", "synthesis s": "",
            "peak RSS MB": f"{run.peak_rss_mb:.0f}", "bf16 SNR dB": "", "x compare": ""}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 60])
    parser.add_argument("--baseline", help="another rvc_modulator.py to run on the same inputs")
    parser.add_argument("--compare", nargs="+", metavar="SCRIPT_AND_ARGS",
                        help="another converter: a Python script and its arguments, with {input} and {output}")
    parser.add_argument("--skip_synthesizer", action="store_true")
    args = parser.parse_args()

    from conftest import snr_db, speech_like

    out = REPO / "bench" / "out"
    models = build_models(out / "models_full", "full")
    if not args.skip_synthesizer:
        print(table(synthesizer_figures(models)), "\n", flush=True)

    scripts = [("ours", REPO / "rvc_modulator.py")] + ([("baseline", args.baseline)] if args.baseline else [])
    rows = []
    for seconds in args.seconds:
        source = out / f"speech_{seconds:g}s.wav"
        if not source.exists():
            sf.write(source, speech_like(seconds), SR, subtype="PCM_16")
        outputs = {}
        compared = compare_run(args.compare, source, out / f"speed_compare_{seconds:g}s.wav", models, seconds)
        if compared:
            rows.append(compared)
            print_last_row(rows)
        for label, script in scripts:
            for precision in ("fp32", "bf16"):
                target = out / f"speed_{label}_{precision}_{seconds:g}s.wav"
                run = measure(python_with_peak(script, source, target, "bench", "--models_dir", models,
                                               "--f0_method", "rmvpe", "--precision", precision, "--seed", SEED,
                                               "--device", "cpu", "--json", "--quiet"))
                if run.returncode != 0:
                    sys.exit(f"{label} {precision} {seconds:g} s failed:\n{run.stderr}")
                t = json.loads(run.stdout)["timings"]
                outputs[label, precision] = sf.read(target, dtype="float32")[0]
                rows.append({"audio s": f"{seconds:g}", "script": label, "precision": precision,
                             "process s": f"{run.wall:.2f}", "RTF": f"{(t['total'] - t['load']) / seconds:.3f}",
                             "f0 s": f"{t['f0']:.2f}", "features s": f"{t['features']:.2f}",
                             "synthesis s": f"{t['synthesis']:.2f}", "peak RSS MB": f"{run.peak_rss_mb:.0f}",
                             "bf16 SNR dB": ""})
                if compared:
                    rows[-1]["x compare"] = f"{float(compared['process s']) / run.wall:.2f}"
                if precision == "bf16":
                    rows[-1]["bf16 SNR dB"] = f"{snr_db(outputs[label, 'fp32'], outputs[label, 'bf16']):.1f}"
                print_last_row(rows)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
