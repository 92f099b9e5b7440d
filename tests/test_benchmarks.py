"""Smoke test of benchmarks/bench_loss_memory.py on a tiny shape: every requested arm gives a
table row whose loss and gradient errors against the script's float64 oracle are small (no
timing is asserted)."""

import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = ("one_pass", "two_pass", "reference", "optax")


def test_bench_loss_memory_small_shape():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_loss_memory.py"),
            "--n",
            "96",
            "--d",
            "16",
            "--v",
            "300",
            "--smoothing",
            "0.1",
            "--arms",
            ",".join(ARMS),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device: ") and "N=96 D=16 V=300 float32 label_smoothing=0.1" in lines[0]
    header = [c.strip() for c in next(l for l in lines if l.startswith("| arm")).strip("|").split("|")]
    rows = {
        cells[0]: dict(zip(header, cells))
        for cells in (
            [c.strip() for c in l.strip("|").split("|")] for l in lines if l.startswith("| ") and "---" not in l
        )
        if cells[0] != "arm"
    }
    assert set(rows) == set(ARMS)
    assert rows["optax"]["CPU x optax"] == "1.00" and rows["two_pass"]["CPU x two_pass"] == "1.00"
    for arm, row in rows.items():
        for col in ("err loss", "err dh", "err dW"):
            err = float(row[col])
            assert math.isfinite(err) and err < 1e-4, (arm, col, err)
        assert float(row["CPU s"]) >= 0 and float(row["XLA temp MiB"]) >= 0


def test_gpu_first_light_smoke(tmp_path):
    """benchmarks/gpu_first_light.py --smoke (tiny shapes, Pallas interpret mode, no peers) from a
    plain checkout: every correctness arm agrees with the dense oracle, every timed arm has its
    times, and the RESULTS.md section is written. The llama arms run the same child as quack's."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured figures\n\nkept\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "gpu_first_light.py"),
            "--smoke",
            "--only",
            "check,quack,attention",
            "--out-dir",
            str(tmp_path / "out"),
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    run = json.loads((tmp_path / "out" / "first_light.json").read_text())
    assert set(run["check"]) == {"bfloat16", "float32"}
    for dtype, arms in run["check"].items():
        assert len(arms) == 6
        for name, r in arms.items():
            assert "error" not in r and r["finite"], (dtype, name, r)
            assert max(r["loss"], r["dhidden"], r["dweight"]) < (2e-2 if dtype == "bfloat16" else 1e-5), (name, r)
    assert [r["a"] for r in run["rows"]] == [0.0, 0.1]
    for r in run["rows"]:
        assert "error" not in r and min(r["fwd_ms"], r["bwd_ms"], r["fwd_bwd_ms"]) > 0, r
    assert all("error" not in r for r in run["attention"].values())
    text = results.read_text()
    assert text.startswith("# Measured figures\n\nkept\n") and "## GPU: first light" in text
    assert (tmp_path / "out" / "RESULTS.md").read_text() == text


def test_step_memory_small_lengths():
    """benchmarks/step_memory.py: one row per (attention, remat, T); on a CPU both paths are XLA
    and hold float32 [T, T] scores, and no cuDNN call."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "step_memory.py"),
            "--lengths",
            "32,64",
            "--attention",
            "auto",
            "--remat",
            "dots",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert [r[:3] for r in rows] == [["auto", "dots", "32"], ["auto", "dots", "64"]]
    assert float(rows[1][4]) > 1 and rows[1][5:] == ["yes", "no"]
