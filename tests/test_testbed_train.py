"""The testbed trainer's command line refuses what it cannot do before any training starts."""

import shutil

import pytest

from ditflow.testbed import train
from ditflow.testbed.models import WEIGHTS


@pytest.mark.parametrize("argv, message", [
    (["editor", "--minutes", "0"], "argument --minutes: must be > 0, got 0"),
    (["t2i", "--steps", "-5"], "argument --steps: must be > 0, got -5"),
    (["editor", "--batch", "0"], "argument --batch: must be > 0, got 0"),
    (["editor", "--lr", "nan"], "argument --lr: must be > 0, got nan"),
    (["vae", "--resume"], "--resume continues a transformer"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_without_a_saved_model_says_so(tmp_path):
    pytest.importorskip("diffusers")
    shutil.copytree(WEIGHTS / "vae", tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match=r"--resume: no saved editor model in .*editor"):
        train.main(["editor", "--resume", "--steps", "1", "--out", str(tmp_path),
                    "--device", "cpu"])
