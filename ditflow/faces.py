"""Face-identity similarity from a face-recognition model the user supplies as a local file.

Nothing is downloaded. Two formats load:

* ONNX (``.onnx``, through onnxruntime: ``pip install -e ".[faces]"`` in the checkout), e.g. an
  InsightFace ArcFace model;
* an exported PyTorch program (``.pt2``):
  ``torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 112, 112),)), "face.pt2")``.

The convention is ArcFace's: an RGB face crop resized to ``input_size`` x ``input_size``, scaled to
[-1, 1] as ``(x - 127.5) / 127.5``, float32 ``[1, 3, size, size]`` in (one image per call, so
models exported with a fixed batch of 1 work), an embedding ``[1, E]`` out. There is no face
detector: the whole image is the face crop, so evaluate on face-centred photos (the aligned
portrait crops protection papers evaluate on).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class FaceEmbedder:
    """L2-normalised identity embeddings of uint8 [H, W, 3] RGB images."""

    def __init__(self, path: str | Path, input_size: int = 112):
        self.path = Path(path)
        self.input_size = input_size
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no face-recognition model file there (an "
                                    ".onnx or .pt2 file; nothing is downloaded)")
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError as exc:
                raise ImportError(f"{self.path}: ONNX face models need onnxruntime: "
                                  'pip install -e ".[faces]" in the ditflow checkout') from exc
            session = self._checked(lambda: onnxruntime.InferenceSession(
                str(self.path), providers=["CPUExecutionProvider"]))
            name = session.get_inputs()[0].name
            self._run = lambda x: session.run(None, {name: x.numpy()})[0]
        elif suffix == ".pt2":
            if not zipfile.is_zipfile(self.path):  # torch.export would log a traceback first
                raise ValueError(f"{self.path}: not a torch.export program (a .pt2 archive is a "
                                 "zip file; save one with torch.export.save)")
            module = self._checked(lambda: torch.export.load(str(self.path)).module())
            self._run = lambda x: module(x).detach().numpy()
        else:
            raise ValueError(f"{self.path}: expected an .onnx model or a torch.export program "
                             "(.pt2, saved with torch.export.save)")
        # one image through the model now: a model of another input size or output shape is
        # refused here, not after the editor has run
        self._checked(lambda: self.embed([np.zeros((input_size, input_size, 3), np.uint8)]),
                      f"does not take [1, 3, {input_size}, {input_size}] to an embedding [1, E] "
                      "(check its input size, --face-size)")

    def _checked(self, call, problem: str = "cannot load this face model"):
        """``call()``; any failure is a ValueError naming the file and the ``problem``
        (onnxruntime and torch.export each raise their own kinds)."""
        try:
            return call()
        except Exception as exc:
            first_line = str(exc).partition("\n")[0]
            raise ValueError(f"{self.path}: {problem} ({type(exc).__name__}: {first_line})"
                             ) from None

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """Unit-norm embeddings ``[len(images), E]`` of uint8 ``[H, W, 3]`` RGB images."""
        rows = []
        for image in images:
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # a writable copy
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True)
            with torch.no_grad():
                emb = np.asarray(self._run((x - 127.5) / 127.5), dtype=np.float64)
            if emb.ndim != 2 or emb.shape[0] != 1:
                raise ValueError(f"{self.path}: expected an embedding [1, E] for one image "
                                 f"[1, 3, {self.input_size}, {self.input_size}], got shape "
                                 f"{tuple(emb.shape)}")
            rows.append(emb[0] / max(np.linalg.norm(emb[0]), 1e-12))
        return np.stack(rows)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine similarity of the identities in two images (1 = same embedding)."""
        ea, eb = self.embed([a, b])
        return float(ea @ eb)
