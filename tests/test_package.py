"""The package as users get it: a wheel, an editable install and a plain checkout all import
``ls_jax.kernels`` (the top-level kernels/ folder), and the repository root shadows no package
that a dependency may bring (transformers >= 5.25 imports Hugging Face's top-level ``kernels``)."""

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("backward", "forward", "fused", "tiles")


def _run(code, cwd, env=None):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=True)


def test_wheel_installs_and_imports_outside_the_repo(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("ls_jax-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert all(f"ls_jax/kernels/{m}.py" in names for m in KERNEL_MODULES) and "ls_jax/losses.py" in names
    assert "ls_jax/integrations/tunix.py" in names and "ls_jax/train/classification.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    code = "import ls_jax, ls_jax.kernels.fused as f; print(ls_jax.__file__); print(f.__file__)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.count(str(target)) == 2


def test_plain_checkout_imports_the_kernels(tmp_path):
    """``PYTHONPATH=<checkout>`` with nothing installed (the GPU machine runs the benchmark so):
    ``ls_jax.kernels`` is the checkout's kernels/ folder. ``-I`` hides the installed package."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import ls_jax.kernels.fused as f, ls_jax.dispatch as d; "
        "print(f.__file__); print(d.logit_stats_fn('pallas'))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert Path(out.splitlines()[0]).resolve() == ROOT / "kernels" / "fused.py"


def _root_names():
    """Top-level names importable from the repository root as regular modules or packages."""
    names = set()
    for entry in ROOT.iterdir():
        if entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
    return names


def test_root_shadows_no_dependency():
    """No regular package or module at the root has the name of a top-level package of any
    installed distribution but ours, and kernels/ is no regular package (a folder without
    ``__init__.py`` loses to a package found later on the path)."""
    provided = importlib.metadata.packages_distributions()
    clashes = {n: provided[n] for n in _root_names() if n in provided and set(provided[n]) != {"ls_jax"}}
    assert not clashes
    assert "kernels" not in _root_names()


def test_dependency_kernels_wins_from_the_root(tmp_path):
    """Run from the root (sys.path[0] is the root, as for ``python train.py`` and ``python -m
    pytest``): a top-level ``kernels`` package elsewhere on the path is the one imported."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'dependency'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = _run("import kernels; print(kernels.WHO)", cwd=ROOT, env=env).stdout
    assert out.strip() == "dependency"
