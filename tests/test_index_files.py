"""Index files are described from their header alone: what faiss itself reads, without
loading the vectors (a listing of a models folder must not load every index whole)."""
from __future__ import annotations

import numpy as np
import pytest

import rvc_modulator as rvc


def _written(tmp_path, spec: str, dim: int = 32, n: int = 300, metric=None):
    import faiss

    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    index = faiss.index_factory(dim, spec) if metric is None else faiss.index_factory(dim, spec, metric)
    index.train(vectors)
    index.add(vectors)
    path = tmp_path / "x.index"
    faiss.write_index(index, str(path))
    return path, index


@pytest.mark.parametrize("spec", ["IVF4,Flat", "IVF3,SQ8", "Flat"])
def test_the_header_says_what_faiss_reads(tmp_path, spec):
    import faiss

    path, index = _written(tmp_path, spec)
    header = rvc.read_index_header(path)
    assert (header.dim, header.vectors) == (index.d, index.ntotal)
    ivf = faiss.try_extract_index_ivf(index)
    assert header.nlist == (ivf.nlist if ivf is not None else None)
    assert header.nprobe == (ivf.nprobe if ivf is not None else None)


def test_an_ivf_index_with_a_metric_argument_still_reads(tmp_path):
    import faiss

    path, index = _written(tmp_path, "IVF5,Flat", metric=faiss.METRIC_Lp)
    assert rvc.read_index_header(path).nlist == 5


def test_the_webui_indexes_of_the_fixtures(fixtures):
    import faiss

    for path in sorted((fixtures / "models").glob("*.index")) + sorted((fixtures / "training").glob("*.index")):
        index = faiss.read_index(str(path))
        header = rvc.read_index_header(path)
        assert (header.dim, header.vectors, header.nlist) == (index.d, index.ntotal, index.nlist), path.name


@pytest.mark.parametrize("data", [b"", b"IwFl", b"IxF2" + bytes(range(200)), b"not an index at all, no" * 4])
def test_anything_else_is_refused_as_not_an_index(tmp_path, data):
    path = tmp_path / "bad.index"
    path.write_bytes(data)
    with pytest.raises(rvc.ModelFileError, match="not a faiss index"):
        rvc.read_index_header(path)
