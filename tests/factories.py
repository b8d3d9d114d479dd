"""Small random models of the real architectures, written in the real file formats.

The tests build these themselves, so the loaders and the whole pipeline are exercised
on a clone without the shared fixtures.
"""
from __future__ import annotations

# --- voice models (.pth, WebUI format) ---------------------------------------

# [factories: voice models]


# --- HuBERT (fairseq .pt and transformers folder) ----------------------------

# [factories: HuBERT]


# --- RMVPE (rmvpe.pt) --------------------------------------------------------

import math
from collections import OrderedDict
from pathlib import Path

import torch

# rmvpe.pt is a bare state dict of RVC's E2E(n_blocks, n_gru, (2, 2), en_de_layers,
# inter_layers, in_channels, en_out_channels). The key list is spelled out here from the
# reference layout (SPEC §4.5), independently of rvc_modulator, so the loader is tested
# against the format and not against itself.
RMVPE_SIZES = {
    "tiny": dict(n_blocks=1, n_gru=1, en_de_layers=5, inter_layers=4, in_channels=1, en_out_channels=2),
    "full": dict(n_blocks=4, n_gru=1, en_de_layers=5, inter_layers=4, in_channels=1, en_out_channels=16),
}


def rmvpe_shapes(n_blocks: int, n_gru: int, en_de_layers: int, inter_layers: int, in_channels: int,
                 en_out_channels: int) -> dict[str, tuple[int, ...]]:
    """Every key of an E2E state dict (BatchNorm counters included) with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def batch_norm(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def res_stack(prefix: str, c_in: int, c_out: int) -> None:  # n_blocks ConvBlockRes
        for j in range(n_blocks):
            c = c_in if j == 0 else c_out
            shapes[f"{prefix}.{j}.conv.0.weight"] = (c_out, c, 3, 3)
            batch_norm(f"{prefix}.{j}.conv.1", c_out)
            shapes[f"{prefix}.{j}.conv.3.weight"] = (c_out, c_out, 3, 3)
            batch_norm(f"{prefix}.{j}.conv.4", c_out)
            if c != c_out:
                shapes[f"{prefix}.{j}.shortcut.weight"] = (c_out, c, 1, 1)
                shapes[f"{prefix}.{j}.shortcut.bias"] = (c_out,)

    batch_norm("unet.encoder.bn", in_channels)
    c_in, c = in_channels, en_out_channels
    for i in range(en_de_layers):
        res_stack(f"unet.encoder.layers.{i}.conv", c_in, c)
        c_in, c = c, 2 * c
    for i in range(inter_layers):
        res_stack(f"unet.intermediate.layers.{i}.conv", c_in if i == 0 else c, c)
    for i in range(en_de_layers):
        shapes[f"unet.decoder.layers.{i}.conv1.0.weight"] = (c, c // 2, 3, 3)  # ConvTranspose2d
        batch_norm(f"unet.decoder.layers.{i}.conv1.1", c // 2)
        res_stack(f"unet.decoder.layers.{i}.conv2", c, c // 2)
        c //= 2
    shapes["cnn.weight"], shapes["cnn.bias"] = (3, en_out_channels, 3, 3), (3,)
    for layer in range(n_gru):
        for suffix in ("", "_reverse"):
            shapes[f"fc.0.gru.weight_ih_l{layer}{suffix}"] = (768, 384 if layer == 0 else 512)
            shapes[f"fc.0.gru.weight_hh_l{layer}{suffix}"] = (768, 256)
            shapes[f"fc.0.gru.bias_ih_l{layer}{suffix}"] = (768,)
            shapes[f"fc.0.gru.bias_hh_l{layer}{suffix}"] = (768,)
    shapes["fc.1.weight"], shapes["fc.1.bias"] = (360, 512), (360,)
    return shapes


# Shift of the output bias (logits): with it, about half of the frames of speech-like
# test signals exceed the 0.03 decoding threshold, so both voiced and unvoiced frames occur.
RMVPE_BIAS_SHIFT = {"tiny": -4.2, "full": -4.1}


def make_rmvpe_state(size: str = "tiny", seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """A random RMVPE state dict: PyTorch's default init ranges, randomised BatchNorm."""
    generator = torch.Generator().manual_seed(seed)
    shapes = rmvpe_shapes(**RMVPE_SIZES[size])
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in shapes.items():
        module, name = key.rsplit(".", 1)
        if name == "num_batches_tracked":
            state[key] = torch.tensor(0)
        elif name == "running_mean":
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif name == "running_var":
            state[key] = 1 + 0.5 * torch.rand(shape, generator=generator)
        elif module + ".running_mean" in shapes:  # BatchNorm affine: around (1, 0)
            state[key] = (name == "weight") + 0.1 * torch.randn(shape, generator=generator)
        else:  # U(±1/sqrt(fan_in)); nn.GRU uses U(±1/sqrt(hidden size)) throughout
            fan_in = 256 if key.startswith("fc.0.gru.") else math.prod(shapes[module + ".weight"][1:])
            state[key] = (2 * torch.rand(shape, generator=generator) - 1) / math.sqrt(fan_in)
    state["fc.1.bias"] += RMVPE_BIAS_SHIFT[size]
    return state


def make_rmvpe_file(path: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random rmvpe.pt ("tiny": E2E(1, 1, (2,2), 5, 4, 1, 2); "full": the real
    E2E(4, 1, (2,2)), 90.5 M values, ~360 MB) in the reference format; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_rmvpe_state(size, seed), path)
    return path
