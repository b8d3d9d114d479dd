"""Memory: large blocks are reused rather than mapped fresh from the kernel each time,
weights go back to the system when a network is dropped, and a conversion need not hold
every network at once."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO

# Ten rounds of what a network layer does with large activations: two 48 MB tensors and
# their sum, then all three freed. Prints the page faults of the last three rounds: every
# 48 MB block mapped fresh from the kernel faults in all of its 12288 pages. The heap needs
# a few rounds to grow to the working set's shape; after that, kept memory is reused.
FAULTS_OF_REUSED_BLOCKS = f"""
import resource, sys
sys.path.insert(0, {str(REPO)!r})
import rvc_modulator as rvc
if sys.argv[1] == "keep":
    assert rvc.keep_freed_memory()
import torch
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a, b = torch.ones(12 * 2**20), torch.ones(12 * 2**20)
    total = a + b
    del a, b, total
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-3:]))
"""


def faults_of_reused_blocks(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS_OF_REUSED_BLOCKS, mode], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_large_blocks_are_reused_without_page_faults():
    assert faults_of_reused_blocks("keep") < 1000
    assert faults_of_reused_blocks("default") > 50000  # what glibc does by default: the check can fail


# A model's weights (here one 64 MB tensor) allocated while it loads, then dropped, as
# RMVPE is once the pitch is known. Prints the resident memory given back when it is freed.
RSS_RETURNED_BY_FREED_WEIGHTS = f"""
import re, sys
sys.path.insert(0, {str(REPO)!r})
import rvc_modulator as rvc
import torch
assert rvc.keep_freed_memory()
def rss_kb():
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
loading = rvc.blocks_outside_heap() if sys.argv[1] == "load" else rvc.contextlib.nullcontext()
with loading:
    weights = torch.ones(16 * 2**20)
before = rss_kb()
del weights
if sys.argv[1] == "release":
    rvc.release_freed_memory()
print(before - rss_kb())
"""


def rss_returned_by_freed_weights(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", RSS_RETURNED_BY_FREED_WEIGHTS, mode], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_weights_loaded_outside_the_heap_go_back_to_the_system_when_freed():
    assert rss_returned_by_freed_weights("load") > 60  # MB of the 64
    assert rss_returned_by_freed_weights("compute") < 4  # the heap keeps what activations free


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_memory_the_heap_kept_goes_back_to_the_system_when_a_stage_releases_it():
    assert rss_returned_by_freed_weights("release") > 60  # MB of the 64, freed in the heap


@pytest.fixture(scope="module")
def tiny_conversion(tmp_path_factory) -> SimpleNamespace:
    """Small model files, the networks loaded from them, and a 2 s input converted with
    everything loaded at once (the output a staged conversion must equal)."""
    import rvc_modulator as rvc
    from conftest import speech_like
    from factories import make_hubert_fairseq, make_rmvpe_file, make_voice_model_file

    root = tmp_path_factory.mktemp("staged")
    voice_file = make_voice_model_file(root / "v.pth", version="v1", seed=1)
    hubert_file = make_hubert_fairseq(root / "h.pt", hidden=64, layers=10, heads=4, ffn=128, conv_dim=32)
    tiny = SimpleNamespace(voice_file=voice_file, voice=rvc.load_voice_model(voice_file), hubert_file=hubert_file,
                           hubert=rvc.load_hubert(hubert_file), rmvpe=rvc.load_rmvpe(make_rmvpe_file(root / "r.pt")),
                           params=rvc.ConversionParams(f0_method="rmvpe", noise=False), audio=speech_like(2.0))
    tiny.eager, _ = rvc.Converter(tiny.voice, tiny.hubert, tiny.rmvpe).convert(tiny.audio, tiny.params)
    return tiny


def test_a_conversion_loads_hubert_after_the_pitch_and_drops_each_network_after_its_stage(tiny_conversion):
    import numpy as np

    import rvc_modulator as rvc

    t = tiny_conversion
    loads = []

    def loader():
        loads.append(1)
        return rvc.load_hubert(t.hubert_file)

    staged = rvc.Converter(t.voice, loader, t.rmvpe, staged=True)
    assert loads == []  # nothing loaded before the conversion needs it
    timings = rvc.Timings()
    samples, _ = staged.convert(t.audio, t.params, timings)
    assert np.array_equal(samples, t.eager)
    assert loads == [1] and staged.rmvpe is None and timings.load > 0
    assert staged._hubert is loader  # dropped once every segment's features were made


def test_a_one_shot_conversion_loads_the_voice_network_again_after_the_pitch(tiny_conversion, tmp_path):
    import numpy as np

    import rvc_modulator as rvc
    from factories import make_voice_model_file

    t = tiny_conversion
    loads = []

    def loader():
        loads.append(1)
        return rvc.load_voice_model(t.voice_file)

    staged = rvc.Converter(t.voice, t.hubert, t.rmvpe, staged=True, voice_loader=loader)
    assert staged.net is None and staged.voice.net is None and t.voice.net is not None  # the caller's is untouched
    timings = rvc.Timings()
    samples, _ = staged.convert(t.audio, t.params, timings)
    assert np.array_equal(samples, t.eager) and loads == [1] and timings.load > 0

    changed = rvc.Converter(t.voice, t.hubert, t.rmvpe, staged=True,
                            voice_loader=lambda: rvc.load_voice_model(make_voice_model_file(
                                tmp_path / "v2.pth", version="v2", seed=1)))
    with pytest.raises(rvc.ModelFileError, match="changed on disk"):
        changed.convert(t.audio, t.params)
