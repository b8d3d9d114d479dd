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

# [factories: RMVPE]
