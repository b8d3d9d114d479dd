"""Memory: large blocks are reused rather than mapped fresh from the kernel each time."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

# Allocates and frees a 64 MB tensor a few times, then prints the page faults that one more
# allocation cost: a block mapped fresh faults in every one of its 16384 pages. (The first
# rounds also start torch's threads, whose own small blocks may take part of a freed one.)
FAULTS_OF_A_REUSED_BLOCK = f"""
import resource, sys
sys.path.insert(0, {str(REPO)!r})
import rvc_modulator as rvc
if sys.argv[1] == "keep":
    assert rvc.keep_freed_memory()
import torch
for _ in range(3):
    block = torch.ones(16 * 2**20)
    del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.ones(16 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_a_reused_block(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_BLOCK, mode], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_freed_large_block_is_reused_without_page_faults():
    assert faults_of_a_reused_block("keep") < 1000
    assert faults_of_a_reused_block("default") > 10000  # what glibc does by default: the check can fail
