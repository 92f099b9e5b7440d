"""Smoke test of the experiment commands on tiny settings (their real settings are slow)."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_large_vocab_sweep_smoke(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    try:
        import large_vocab
    finally:
        sys.path.pop(0)
    rows = large_vocab.main(["--vocab", "0,512", "--hidden", "16", "--steps", "2", "--num-train", "64",
                             "--num-eval", "16", "--batch-size", "16", "--out", str(tmp_path)])
    own = json.load(open(tmp_path / "init-V512-D16" / "config.json"))["vocab_size"]
    assert own == 512
    assert [(r["V"], r["D"], r["a"]) for r in rows][1:] == [(rows[0]["V"], 16, 0.1), (512, 16, 0.0), (512, 16, 0.1)]
    assert rows[0]["V"] < 512  # the tokenizer's own vocabulary, then the padded one
    assert json.load(open(tmp_path / "large_vocab.json")) == rows
    assert open(tmp_path / "large_vocab.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "512 | 16 | 0.1 |" in capsys.readouterr().out
