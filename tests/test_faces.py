"""Face-identity similarity from user-supplied local models (torch.export programs and ONNX)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditflow.faces import FaceEmbedder

WEIGHT = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)


class MeanColourEmbedding(torch.nn.Module):
    """A stand-in recogniser: per-channel mean colour times a fixed matrix."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.from_numpy(WEIGHT))

    def forward(self, x):
        return x.mean(dim=(2, 3)) @ self.weight


def _export(module, path):
    torch.export.save(torch.export.export(module, (torch.zeros(1, 3, 112, 112),)), str(path))
    return path


@pytest.fixture
def exported_model(tmp_path):
    return _export(MeanColourEmbedding(), tmp_path / "face.pt2")


@pytest.fixture
def onnx_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "weight"], ["embedding"])],
        "mean_colour", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                      ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(WEIGHT, "weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "face.onnx"
    onnx.save(model, str(path))
    return path


def _flat(rgb, size=(40, 56)):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (*size, 3)).copy()


@pytest.mark.parametrize("fmt", ["exported", "onnx"])
def test_embedding_follows_the_arcface_input_convention(fmt, request):
    embedder = FaceEmbedder(request.getfixturevalue(f"{fmt}_model"))
    emb = embedder.embed([_flat((255, 0, 128)), _flat((10, 200, 30), size=(300, 200))])
    for e, rgb in zip(emb, [(255, 0, 128), (10, 200, 30)], strict=True):
        expected = ((np.array(rgb) - 127.5) / 127.5) @ WEIGHT
        np.testing.assert_allclose(e, expected / np.linalg.norm(expected), atol=1e-4)


def test_onnx_and_exported_agree(exported_model, onnx_model):
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(2))
    ts, ox = FaceEmbedder(exported_model), FaceEmbedder(onnx_model)
    assert ts.similarity(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ts.similarity(a, b) == pytest.approx(ox.similarity(a, b), abs=1e-4)
    assert ts.similarity(_flat((255, 0, 0)), _flat((0, 0, 255))) < 0.99


def test_bad_model_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx"):
        FaceEmbedder(tmp_path / "missing.onnx")
    legacy = tmp_path / "face.pth"
    legacy.write_bytes(b"a state dict, say")
    with pytest.raises(ValueError, match=r"expected an \.onnx model or a torch\.export"):
        FaceEmbedder(legacy)
    corrupt = tmp_path / "face.pt2"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"face\.pt2: not a torch\.export program"):
        FaceEmbedder(corrupt)


def test_a_model_that_does_not_fit_is_refused_when_loaded(tmp_path, exported_model):
    """Before the editor runs: an output of another shape, or another input size."""

    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.flatten()

    path = _export(Flat(), tmp_path / "flat.pt2")
    with pytest.raises(ValueError, match=r"flat\.pt2: does not take \[1, 3, 112, 112\] to an "
                                         r"embedding \[1, E\].*got shape \(37632,\)"):
        FaceEmbedder(path)
    with pytest.raises(ValueError, match=r"face\.pt2: does not take \[1, 3, 64, 64\] .*"
                                         r"--face-size"):
        FaceEmbedder(exported_model, input_size=64)
