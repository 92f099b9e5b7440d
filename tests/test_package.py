"""`pip install .` gives an importable ls_jax, with kernels/ mapped as ls_jax.kernels."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports_outside_the_repo(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    wheel = next(tmp_path.glob("ls_jax-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "ls_jax/kernels/__init__.py" in names and "ls_jax/losses.py" in names
    assert "ls_jax/integrations/tunix.py" in names and "ls_jax/train/classification.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    code = "import ls_jax, ls_jax.kernels; print(ls_jax.__file__); print(ls_jax.kernels.__file__)"
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.count(str(target)) == 2
