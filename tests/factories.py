"""Small random models of the real architectures, written in the real file formats.

The tests build these themselves, so the loaders and the whole pipeline are exercised
on a clone without the shared fixtures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import struct
import sys
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch


# --- a file that would run code ----------------------------------------------

class RunsOnUnpickle:
    """Pickles as the call func(*args): what a malicious model file hides. Any loader that
    unpickles it (plain pickle, torch.load without weights_only) makes that call."""

    def __init__(self, func: Callable[..., Any], *args: Any):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# --- voice models (.pth, WebUI format) ---------------------------------------

# Official per-rate decoder settings (the WebUI's v1/v2 configs):
# (spec_channels, upsample_rates, upsample_kernel_sizes).
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
# The convolutions the WebUI wraps in weight norm, by their folded key.
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

# Random HuBERT weights of the real architecture (hubert_base's conv stack, weight-normed
# grouped positional conv, post-LN transformer, final_proj), written like RVC's
# hubert_base.pt (fairseq) or like a transformers folder. The two writers rename
# fairseq's tensor names on their own (not via rvc_modulator), so the loader's mapping is
# checked against an independent statement of it.

HUBERT_SIZES = {
    "tiny": dict(hidden=64, layers=10, heads=4, ffn=128, conv_dim=32, pos_kernel=16),
    "full": dict(hidden=768, layers=12, heads=12, ffn=3072, conv_dim=512, pos_kernel=128),  # hubert_base
}
HUBERT_CONV = ((10, 5),) + ((3, 2),) * 4 + ((2, 2),) * 2  # (kernel, stride) per conv layer
HUBERT_POS_GROUPS = 16
HUBERT_FINAL_DIM = 256
HUBERT_LABELS = 504  # label vocabulary of RVC's ContentVec ("500 class" + 4 specials)

# fairseq name (regex) -> transformers name, as transformers' converter maps them.
HUBERT_TO_TRANSFORMERS = (
    (r"feature_extractor\.conv_layers\.0\.2\.", "feature_extractor.conv_layers.0.layer_norm."),
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.", r"feature_extractor.conv_layers.\1.conv."),
    (r"layer_norm\.", "feature_projection.layer_norm."),
    (r"post_extract_proj\.", "feature_projection.projection."),
    (r"encoder\.pos_conv\.0\.", "encoder.pos_conv_embed.conv."),
    (r"(encoder\.layers\.\d+)\.self_attn\.", r"\1.attention."),
    (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.layer_norm."),
    (r"(encoder\.layers\.\d+)\.fc1\.", r"\1.feed_forward.intermediate_dense."),
    (r"(encoder\.layers\.\d+)\.fc2\.", r"\1.feed_forward.output_dense."),
    (r"mask_emb$", "masked_spec_embed"),
)
# transformers writes the weight norm under torch's old or new parametrisation names.
HUBERT_WEIGHT_NORM_NAMES = {
    "safetensors": (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
    "bin": (".weight_g", ".weight_v"),
}
SAFETENSORS_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def _hubert_sizes(size: str, overrides: dict) -> dict:
    sizes = dict(HUBERT_SIZES[size])
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    return sizes


def _hubert_weights(hidden: int, layers: int, heads: int, ffn: int, conv_dim: int,
                    pos_kernel: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under fairseq's names, rounded to fp16 values (kept as fp32) so the
    fp16 fairseq file and the fp32 transformers folder hold exactly the same numbers."""
    gen = torch.Generator().manual_seed(seed)

    def weight(*shape: int) -> torch.Tensor:  # unit gain: activations stay O(1) through the stack
        fan_in = torch.Size(shape[1:]).numel()
        return torch.randn(shape, generator=gen) / fan_in ** 0.5

    def gain(n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=gen)

    def bias(n: int) -> torch.Tensor:
        return 0.1 * torch.randn(n, generator=gen)

    state = {"mask_emb": torch.rand(hidden, generator=gen)}
    c_in = 1
    for i, (kernel, _) in enumerate(HUBERT_CONV):
        state[f"feature_extractor.conv_layers.{i}.0.weight"] = weight(conv_dim, c_in, kernel)
        c_in = conv_dim
    state["feature_extractor.conv_layers.0.2.weight"] = gain(conv_dim)
    state["feature_extractor.conv_layers.0.2.bias"] = bias(conv_dim)
    state["layer_norm.weight"], state["layer_norm.bias"] = gain(conv_dim), bias(conv_dim)
    state["post_extract_proj.weight"], state["post_extract_proj.bias"] = weight(hidden, conv_dim), bias(hidden)
    state["encoder.pos_conv.0.bias"] = bias(hidden)
    state["encoder.pos_conv.0.weight_g"] = gain(pos_kernel).view(1, 1, pos_kernel)
    state["encoder.pos_conv.0.weight_v"] = weight(hidden, hidden // HUBERT_POS_GROUPS, pos_kernel)
    state["encoder.layer_norm.weight"], state["encoder.layer_norm.bias"] = gain(hidden), bias(hidden)
    for i in range(layers):
        p = f"encoder.layers.{i}."
        for proj in ("k", "v", "q", "out"):
            state[p + f"self_attn.{proj}_proj.weight"] = weight(hidden, hidden)
            state[p + f"self_attn.{proj}_proj.bias"] = bias(hidden)
        state[p + "self_attn_layer_norm.weight"], state[p + "self_attn_layer_norm.bias"] = gain(hidden), bias(hidden)
        state[p + "fc1.weight"], state[p + "fc1.bias"] = weight(ffn, hidden), bias(ffn)
        state[p + "fc2.weight"], state[p + "fc2.bias"] = weight(hidden, ffn), bias(hidden)
        state[p + "final_layer_norm.weight"], state[p + "final_layer_norm.bias"] = gain(hidden), bias(hidden)
    state["final_proj.weight"] = weight(HUBERT_FINAL_DIM, hidden)
    state["final_proj.bias"] = bias(HUBERT_FINAL_DIM)
    state["label_embs_concat"] = torch.rand(HUBERT_LABELS, HUBERT_FINAL_DIM, generator=gen)
    return {k: v.half().float() for k, v in state.items()}


def _fairseq_dictionary_class() -> type:
    """A class that pickles under fairseq's global name for its label Dictionary."""
    return type("Dictionary", (), {"__module__": "fairseq.data.dictionary", "__qualname__": "Dictionary"})


@contextlib.contextmanager
def _fake_fairseq_modules(dictionary_class: type):
    """Make `fairseq.data.dictionary.Dictionary` resolvable for pickling, only meanwhile."""
    names = ("fairseq", "fairseq.data", "fairseq.data.dictionary")
    assert not any(name in sys.modules for name in names), "a real fairseq is imported"
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["fairseq.data.dictionary"].Dictionary = dictionary_class
    try:
        yield
    finally:
        for name in names:
            del sys.modules[name]


def make_hubert_fairseq(path: Path, *, hidden: int | None = None, layers: int | None = None,
                        heads: int | None = None, ffn: int | None = None, conv_dim: int | None = None,
                        pos_kernel: int | None = None, seed: int = 0, size: str = "tiny",
                        config_style: str = "cfg", cfg_overrides: dict | None = None,
                        tamper: Callable[[dict], None] | None = None) -> Path:
    """A checkpoint laid out like RVC's hubert_base.pt: `cfg` dicts (or, config_style
    "args", a pre-hydra argparse.Namespace), an fp16 `model`, and a `task_state` holding a
    pickled fairseq Dictionary. `tamper` edits the fp16 state dict before saving."""
    s = _hubert_sizes(size, dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn,
                                 conv_dim=conv_dim, pos_kernel=pos_kernel))
    c = s["conv_dim"]
    model_cfg = {
        "_name": "hubert", "label_rate": 50.0, "extractor_mode": "default",
        "encoder_layers": s["layers"], "encoder_embed_dim": s["hidden"],
        "encoder_ffn_embed_dim": s["ffn"], "encoder_attention_heads": s["heads"],
        "activation_fn": "gelu", "layer_type": "transformer", "dropout": 0.1,
        "final_dim": HUBERT_FINAL_DIM, "untie_final_proj": False, "layer_norm_first": False,
        "conv_feature_layers": f"[({c},10,5)] + [({c},3,2)] * 4 + [({c},2,2)] * 2",
        "conv_bias": False, "conv_pos": s["pos_kernel"], "conv_pos_groups": HUBERT_POS_GROUPS,
        "mask_prob": 0.8, "required_seq_len_multiple": 2, "pos_enc_type": "abs",
    }
    model_cfg.update(cfg_overrides or {})
    task_cfg = {"_name": "hubert_pretraining", "normalize": False, "sample_rate": 16000,
                "labels": ["km"], "label_rate": 50.0}
    state = {k: v.half() for k, v in _hubert_weights(seed=seed, **s).items()}
    if tamper is not None:
        tamper(state)

    dictionary_class = _fairseq_dictionary_class()
    dictionary = dictionary_class()
    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(HUBERT_LABELS - 4)]
    dictionary.__dict__.update(symbols=symbols, count=[1] * len(symbols),
                               indices={sym: i for i, sym in enumerate(symbols)},
                               bos_index=0, pad_index=1, eos_index=2, unk_index=3, nspecial=4)
    checkpoint = {
        "args": None,
        "cfg": {"_name": None, "common": {"fp16": True, "seed": 1}, "model": model_cfg,
                "task": task_cfg, "criterion": {"_name": "hubert"}},
        "model": state,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0}],
        "task_state": {"dictionaries": [dictionary]},
        "extra_state": {"metrics": {}, "previous_training_time": 0.0},
        "last_optimizer_state": None,
    }
    if config_style == "args":
        checkpoint["args"] = argparse.Namespace(**{**task_cfg, **model_cfg})  # one flat namespace
        del checkpoint["cfg"]
    path = Path(path)
    with _fake_fairseq_modules(dictionary_class):
        torch.save(checkpoint, path)
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """The safetensors layout: u64 LE header length, JSON header (space-padded to 8 bytes),
    then each tensor's little-endian bytes in header order."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))
    return Path(path)


def make_hubert_transformers(folder: Path, *, hidden: int | None = None, layers: int | None = None,
                             heads: int | None = None, ffn: int | None = None,
                             conv_dim: int | None = None, pos_kernel: int | None = None,
                             seed: int = 0, size: str = "tiny", weights: str = "safetensors",
                             config_overrides: dict | None = None,
                             tamper: Callable[[dict], None] | None = None) -> Path:
    """A transformers HuBERT folder like RVC-main's assets/hubert_base (HubertModel plus
    final_proj): config.json, preprocessor_config.json and model.safetensors (weight norm
    as parametrizations) or pytorch_model.bin (weight_g/weight_v). Same weights as
    make_hubert_fairseq for the same sizes and seed."""
    s = _hubert_sizes(size, dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn,
                                 conv_dim=conv_dim, pos_kernel=pos_kernel))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["HubertModelWithFinalProj"], "model_type": "hubert",
        "hidden_size": s["hidden"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "intermediate_size": s["ffn"],
        "hidden_act": "gelu", "feat_extract_activation": "gelu", "feat_extract_norm": "group",
        "conv_dim": [s["conv_dim"]] * len(HUBERT_CONV), "conv_kernel": [k for k, _ in HUBERT_CONV],
        "conv_stride": [st for _, st in HUBERT_CONV], "conv_bias": False,
        "num_feat_extract_layers": len(HUBERT_CONV),
        "num_conv_pos_embeddings": s["pos_kernel"], "num_conv_pos_embedding_groups": HUBERT_POS_GROUPS,
        "conv_pos_batch_norm": False, "do_stable_layer_norm": False, "feat_proj_layer_norm": True,
        "layer_norm_eps": 1e-5, "classifier_proj_size": HUBERT_FINAL_DIM, "mask_time_prob": 0.05,
        "vocab_size": 32,
    }
    config.update(config_overrides or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": False, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
         "feature_size": 1, "padding_value": 0.0, "return_attention_mask": False, "sampling_rate": 16000}))

    g_suffix, v_suffix = HUBERT_WEIGHT_NORM_NAMES[weights]
    state = {}
    for name, tensor in _hubert_weights(seed=seed, **s).items():
        if name == "label_embs_concat":  # fairseq's pre-training targets; no transformers tensor
            continue
        for pattern, replacement in HUBERT_TO_TRANSFORMERS:
            name, count = re.subn("^" + pattern, replacement, name)
            if count:
                break
        name = name.replace(".weight_g", g_suffix).replace(".weight_v", v_suffix)
        state[name] = tensor
    if tamper is not None:
        tamper(state)
    if weights == "safetensors":
        write_safetensors(folder / "model.safetensors", state)
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


# --- RMVPE (rmvpe.pt) --------------------------------------------------------

# rmvpe.pt is a bare state dict of RVC's E2E(n_blocks, n_gru, (2, 2), en_de_layers,
# inter_layers, in_channels, en_out_channels). The key list is spelled out here from the
# reference layout (RVC's E2E state dict), independently of rvc_modulator, so the loader is tested
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


def make_models_folder(root: Path) -> Path:
    """A models folder as the README lays it out, with tiny random networks: voice (v1
    40k, pitch) with its index voice.index, plain (v1 32k, no pitch), HuBERT and RMVPE."""
    import faiss
    import numpy as np

    (root / "rvc").mkdir(parents=True)
    make_voice_model_file(root / "rvc" / "voice.pth", version="v1", sample_rate=40000, f0=True, seed=1)
    make_voice_model_file(root / "rvc" / "plain.pth", version="v1", sample_rate=32000, f0=False, seed=2)
    make_hubert_fairseq(root / "hubert_base.pt", hidden=64, layers=10, heads=4, ffn=128, conv_dim=32, seed=3)
    make_rmvpe_file(root / "rmvpe.pt", size="tiny", seed=4)
    vectors = np.random.default_rng(5).standard_normal((400, 256)).astype(np.float32)
    index = faiss.index_factory(256, "IVF4,Flat")
    index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(root / "rvc" / "voice.index"))
    return root
