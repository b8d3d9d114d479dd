"""Small random models of the real architectures, written in the real file formats.

The tests build these themselves, so the loaders and the whole pipeline are exercised
on a clone without the shared fixtures.
"""
from __future__ import annotations

# --- voice models (.pth, WebUI format) ---------------------------------------

import re
from collections import OrderedDict
from pathlib import Path

import torch

# Official per-rate decoder settings (SPEC §1.3): (spec_channels, upsample_rates, upsample_kernel_sizes).
WEBUI_RATE_CONFIGS = {
    ("v1", 32000): (513, [10, 4, 2, 2, 2], [16, 16, 4, 4, 4]),
    ("v1", 40000): (1025, [10, 10, 2, 2], [16, 16, 4, 4]),
    ("v1", 48000): (1025, [10, 6, 2, 2, 2], [16, 16, 4, 4, 4]),
    ("v2", 32000): (513, [10, 8, 2, 2], [20, 16, 4, 4]),
    ("v2", 40000): (1025, [10, 10, 2, 2], [16, 16, 4, 4]),  # v2 40k reuses the v1 40k config
    ("v2", 48000): (1025, [12, 10, 2, 2], [24, 20, 4, 4]),
}
# (inter, hidden, filter, heads, layers, upsample_initial_channel, gin): the fixtures' tiny
# hyper-parameters, and the real ones.
VOICE_MODEL_SIZES = {"tiny": (16, 16, 32, 2, 2, 32, 16), "full": (192, 192, 768, 2, 6, 512, 256)}
PHONE_DIMS = {"v1": 256, "v2": 768}
OFFICIAL_SPK_EMBED_DIM = 109  # what the WebUI writes into config[15] (readers use emb_g's rows)
# The convolutions the WebUI wraps in weight norm (SPEC §1.5), by their folded key.
WEIGHT_NORMED = re.compile(r"^(dec\.ups\.\d+|dec\.resblocks\.\d+\.convs[12]\.\d+"
                           r"|flow\.flows\.\d+\.enc\.(in_layers\.\d+|res_skip_layers\.\d+|cond_layer))\.weight$")
WEIGHT_NORM_NAMES = {"legacy": (".weight_g", ".weight_v"),
                     "parametrizations": (".parametrizations.weight.original0",
                                          ".parametrizations.weight.original1")}


def voice_model_config(version: str = "v2", sample_rate: int = 40000, size: str = "tiny",
                       upsample: tuple[list[int], list[int]] | None = None) -> list:
    """The 18-element WebUI config list; `upsample` = (rates, kernels) overrides the per-rate table."""
    spec_channels, rates, kernels = WEBUI_RATE_CONFIGS.get((version, sample_rate), (513, None, None))
    if upsample is not None:
        rates, kernels = upsample
    inter, hidden, filter_channels, heads, layers, initial, gin = VOICE_MODEL_SIZES[size]
    return [spec_channels, 32, inter, hidden, filter_channels, heads, layers, 3, 0, "1", [3, 7, 11],
            [[1, 3, 5], [1, 3, 5], [1, 3, 5]], list(rates), initial, list(kernels),
            OFFICIAL_SPK_EMBED_DIM, gin, sample_rate]


def synth_inputs(phone_dim: int, frames: int = 60, seed: int = 0, sid: int = 0) -> dict:
    """Inputs for Synthesizer.infer: phone ~ N(0,1), coarse pitch, F0 80..480 Hz with an unvoiced stretch."""
    gen = torch.Generator().manual_seed(seed)
    pitch = torch.randint(2, 256, (1, frames), generator=gen)
    nsff0 = 80 + 400 * torch.rand(1, frames, generator=gen)
    unvoiced = slice(frames // 4, frames // 4 + max(frames // 8, 1))
    pitch[:, unvoiced], nsff0[:, unvoiced] = 1, 0.0
    return {"phone": torch.randn(1, frames, phone_dim, generator=gen), "pitch": pitch,
            "nsff0": nsff0, "sid": torch.tensor([sid])}


def make_voice_model(version: str = "v2", sample_rate: int = 40000, f0: bool = True, n_speakers: int = 3,
                     seed: int = 0, size: str = "tiny", fp16: bool = True, applio: bool = False,
                     weight_norm: str = "legacy", upsample: tuple[list[int], list[int]] | None = None):
    """A random voice model: (checkpoint dict in the WebUI format, the Synthesizer it stands for).

    The returned net holds exactly the weights the file encodes (fp16-rounded, weight norm
    folded by this factory's own formula), so a loader must reproduce its outputs.
    applio: Applio's metadata (int sr, bool f0, epoch, embedder_model, vocoder, ...).
    weight_norm: "legacy" (weight_g/weight_v, as every official file) or "parametrizations".
    """
    import rvc_modulator as rvc

    config = voice_model_config(version, sample_rate, size, upsample)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = rvc.Synthesizer(rvc.SynthConfig.from_list(config), PHONE_DIMS[version], f0, n_speakers)
        with torch.no_grad():
            for name, p in net.named_parameters():  # the net starts its embeddings at zero:
                if name.endswith(("emb_g.weight", "emb_pitch.weight")):  # the WebUI's random init
                    p.normal_(0, 1)
                elif ".emb_rel_" in name:
                    p.normal_(0, p.shape[-1] ** -0.5)
            for p in net.parameters():  # every layer active: no zero or constant tensors left
                std = p.std().item() if p.numel() > 1 else 0.0
                p.add_(torch.randn_like(p) * (0.1 * std if std > 0 else 0.05))
        _set_output_level(net, seed)

    g_suffix, v_suffix = WEIGHT_NORM_NAMES[weight_norm]
    dtype = torch.float16 if fp16 else torch.float32
    weight: OrderedDict[str, torch.Tensor] = OrderedDict()
    effective: dict[str, torch.Tensor] = {}
    pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(seed + 1)
    for key, value in net.state_dict().items():
        if WEIGHT_NORMED.match(key):
            # v = w scaled by a random positive factor per output row, g = |w| per row: g*v/|v| = w.
            base = key[: -len(".weight")]
            shape = (value.shape[0],) + (1,) * (value.dim() - 1)
            v = (value * (0.5 + 1.5 * torch.rand(shape, generator=gen))).to(dtype)
            g = value.flatten(1).norm(dim=1).reshape(shape).to(dtype)
            pending[base] = (g, v)
            effective[key] = g.float() * v.float() / v.float().flatten(1).norm(dim=1).reshape(shape)
            continue
        weight[key] = value.to(dtype)
        effective[key] = weight[key].float()
        base = key[: -len(".bias")]
        if key.endswith(".bias") and base in pending:  # the WebUI order: bias, weight_g, weight_v
            weight[base + g_suffix], weight[base + v_suffix] = pending.pop(base)
    assert not pending, f"weight-normed layers without a bias: {sorted(pending)}"
    if version == "v2":  # the WebUI's v2 classes replace enc_p after construction: its keys come last
        weight = OrderedDict(sorted(weight.items(), key=lambda item: item[0].startswith("enc_p.")))
    net.load_state_dict(effective)

    sr_name = f"{sample_rate // 1000}k"
    ckpt = OrderedDict(weight=weight, config=config, info=f"factory model (seed {seed})", sr=sr_name,
                       f0=int(f0), version=version)
    if applio:
        ckpt.update(sr=sample_rate, f0=bool(f0), epoch=200, step=12000,
                    creation_date="2026-01-02T03:04:05.678901", model_hash="0" * 64, dataset_length=600,
                    model_name="factory", author="tests", embedder_model="contentvec",
                    speakers_id=n_speakers, vocoder="HiFi-GAN")
    return ckpt, net.eval()


def _set_output_level(net, seed: int, level: float = 0.3) -> None:
    """Re-aim conv_post (no bias) so that, on a probe, the pre-tanh output has no DC offset and
    std `level`: the audio is neither silent nor saturated (as the fixtures' models)."""
    probe = synth_inputs(net.phone_dim, frames=8, seed=seed)
    inputs = []
    hook = net.dec.conv_post.register_forward_hook(lambda module, args, out: inputs.append(args[0]))
    try:
        net.infer(probe["phone"], probe["pitch"] if net.has_f0 else None,
                  probe["nsff0"] if net.has_f0 else None, probe["sid"], noise=False)
    finally:
        hook.remove()
    conv, x = net.dec.conv_post, inputs[0]  # x: (1, C, L)
    with torch.no_grad():
        dc = x.mean(dim=2, keepdim=True).expand_as(conv.weight)  # (1, C, K): the input's channel means
        conv.weight.sub_((conv.weight * dc).sum() / (dc * dc).sum() * dc)  # output mean ~ 0
        conv.weight.mul_(level / conv(x).std().item())


def make_voice_model_file(path: str | Path, **kwargs) -> Path:
    """make_voice_model(**kwargs) saved with torch.save, as the WebUI writes it."""
    path = Path(path)
    ckpt, _ = make_voice_model(**kwargs)
    torch.save(ckpt, path)
    return path


# --- HuBERT (fairseq .pt and transformers folder) ----------------------------

# [factories: HuBERT]


# --- RMVPE (rmvpe.pt) --------------------------------------------------------

# [factories: RMVPE]
