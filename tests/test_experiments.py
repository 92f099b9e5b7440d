"""Smoke test of the experiment commands on tiny settings (their real settings are slow)."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def large_vocab():
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    try:
        import large_vocab
    finally:
        sys.path.pop(0)
    return large_vocab


def test_large_vocab_sweep_smoke(tmp_path, capsys, large_vocab):
    argv = [
        "--vocab",
        "0,512",
        "--hidden",
        "16",
        "--base-steps",
        "2",
        "--num-base",
        "64",
        "--steps",
        "2",
        "--num-train",
        "32",
        "--num-eval",
        "16",
        "--seeds",
        "0,1",
        "--out",
        str(tmp_path),
    ]
    means = large_vocab.main(argv)
    assert json.load(open(tmp_path / "init-V512-D16" / "config.json"))["vocab_size"] == 512
    own = means[0]["V"]
    assert own < 512  # the tokenizer's own vocabulary, then the padded one
    assert [(m["V"], m["stage"], m["seeds"]) for m in means] == [
        (v, stage, n) for v in (own, 512) for stage, n in (("base", 1), ("SFT a=0", 2), ("SFT a=0.1", 2))
    ]
    saved = json.load(open(tmp_path / "large_vocab.json"))
    assert saved["means"] == means and len(saved["runs"]) == 10  # base + 2 smoothing x 2 seeds, per V
    runs = [r for r in saved["runs"] if r["V"] == 512 and r["stage"] == "SFT a=0.1"]
    m = next(m for m in means if m["V"] == 512 and m["stage"] == "SFT a=0.1")
    assert m["mc_ece"] == pytest.approx(sum(r["mc_ece"] for r in runs) / 2)
    assert m["mc_ece_spread"] == pytest.approx(abs(runs[0]["mc_ece"] - runs[1]["mc_ece"]) / 2)
    assert open(tmp_path / "large_vocab.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"512 | 16 | 32 | SFT a=0.1 | {m['mc_accuracy']:.3f} |" in capsys.readouterr().out
    # a second call reuses the finished cells: same figures, no training
    cells = {p: os.path.getmtime(tmp_path / p) for p in ("V512-D16.json", f"V{own}-D16.json")}
    assert large_vocab.main(argv) == means
    assert {p: os.path.getmtime(tmp_path / p) for p in cells} == cells
