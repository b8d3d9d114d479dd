"""Memory: large blocks are reused rather than mapped fresh from the kernel each time."""
from __future__ import annotations

import subprocess
import sys

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
