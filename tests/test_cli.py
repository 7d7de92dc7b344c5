"""The offline demo runs and shows what it claims."""

from __future__ import annotations

import re

from ditflow.cli import main


def test_demo(capsys):
    main(["demo", "--text", "8", "--image", "32", "--heads", "2", "--backend", "reference"])
    out = capsys.readouterr().out
    values = {name: float(v) for name, v in re.findall(r"^(.+?)\s{2,}(\d\.\d{4})$", out, re.M)}
    assert values["target -> context blocked"] == 0.0
    plain = values["no intervention"]
    assert 0 < values["context probabilities x0.2 (UVR-style)"] < plain
    before, after = map(float, re.search(r"r_ctx (\S+) -> (\S+) after", out).groups())
    assert before == plain and after < before
