"""kernels/ installs as ditflow.kernels, from an editable install and from a built wheel, and the
wheel carries every subpackage and the data the offline default model needs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import ditflow.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_kernels():
    assert Path(ditflow.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_wheel_contains_kernels_as_subpackage(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("ditflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__", "flow_attention", "tile_plan"):
        assert f"ditflow/kernels/{module}.py" in names
    assert not any(name.startswith("kernels/") for name in names)
    for path in ("ditflow/models/flux.py", "ditflow/methods/decontext.py",
                 "ditflow/testbed/scenes.py", "ditflow/samples/astronaut.png",
                 "ditflow/testbed/weights/vae/diffusion_pytorch_model.safetensors",
                 "ditflow/testbed/weights/editor/model_index.json",
                 "ditflow/testbed/weights/editor/transformer/diffusion_pytorch_model.safetensors"):
        assert path in names, path


def test_the_public_api_is_importable_from_the_package():
    import ditflow
    from ditflow import layout, session

    assert ditflow.attach is session.attach and ditflow.StatsRecorder is session.StatsRecorder
    assert ditflow.TokenLayout is layout.TokenLayout
    assert (ditflow.TEXT, ditflow.TARGET, ditflow.CONTEXT) == (0, 1, 2)
    assert set(ditflow.__all__) <= set(dir(ditflow))
