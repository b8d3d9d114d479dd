#!/usr/bin/env python3
"""How long one training step takes, and the memory it takes, with the full-size networks.

Builds the WebUI's full-size v2 40k generator (with enc_q) and v2 discriminator from random
weights in a fresh process, and times --steps steps of the WebUI's recipe (batch
--batch_size of 3 s items, the 40k segment of 32 frames) on --device. The first step pays
for the allocations and is reported apart.

    python bench/bench_train.py [--steps 4] [--batch_size 4] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import sys

from _harness import REPO, measure, python_with_peak, table

STEPPER = """
import json, sys, time
sys.path.insert(0, {repo!r})
import torch
import rvc_modulator as rvc
steps, batch_size, device = int(sys.argv[1]), int(sys.argv[2]), torch.device(sys.argv[3])
torch.manual_seed(0)
recipe = rvc.TRAINING_RECIPES[("v2", 40000)]
config = rvc.default_generator_config("v2", 40000)
net_g = rvc.TrainingSynthesizer(rvc.SynthConfig.from_list(config), 768, True, rvc.WEBUI_SPEAKERS, config[0],
                                recipe.segment_frames)
rvc.init_from_random(net_g)
net_d = rvc.MultiPeriodDiscriminator(rvc.DISCRIMINATOR_PERIODS["v2"])
net_g.to(device).train()
net_d.to(device).train()
optim_g = rvc.webui_adamw(net_g.webui_parameters(), recipe)
optim_d = rvc.webui_adamw(list(net_d.parameters()), recipe)
precision = rvc.MixedPrecision(torch.float16 if device.type == "cuda" else None)
frames = 300  # 3 s items
batch = rvc.TrainingBatch(torch.randn(batch_size, frames, 768), torch.full((batch_size,), frames),
                          torch.randint(1, 256, (batch_size, frames)), 100 + 200 * torch.rand(batch_size, frames),
                          torch.rand(batch_size, 1025, frames), torch.full((batch_size,), frames),
                          0.1 * torch.randn(batch_size, 1, frames * recipe.hop),
                          torch.zeros(batch_size, dtype=torch.long)).to(device)
times = []
for step in range(steps):
    start = time.perf_counter()
    rvc.train_step(net_g, net_d, optim_g, optim_d, batch, recipe, torch.Generator().manual_seed(step), precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
print(json.dumps({{"first_s": times[0], "steady_s": sum(times[1:]) / max(1, len(times) - 1),
                  "threads": torch.get_num_threads()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    script = out / "train_steps.py"
    script.write_text(STEPPER.format(repo=str(REPO)))
    run = measure(python_with_peak(script, args.steps, args.batch_size, args.device))
    if run.returncode != 0:
        sys.exit(f"failed\n{run.stderr}")
    facts = json.loads(run.stdout)
    print(table([{"device": args.device, "batch": args.batch_size, "threads": facts["threads"],
                  "first step s": f"{facts['first_s']:.2f}", "step s": f"{facts['steady_s']:.2f}",
                  "process s": f"{run.wall:.1f}", "peak RSS MB": f"{run.peak_rss_mb:.0f}"}]))


if __name__ == "__main__":
    main()
