import os

import pytest

from ls_jax.atomic import atomic_path, check_output_dir, write_text


def test_atomic_path_replaces_files_and_directories_whole(tmp_path):
    target = tmp_path / "hf"
    (tmp_path / ".hf.tmp").mkdir()  # left behind by a killed write
    (tmp_path / ".hf.tmp" / "config.json").write_text("")
    for version in ("1", "2"):  # the second replaces an existing directory
        with atomic_path(str(target)) as tmp:
            assert not os.path.exists(tmp)  # the leftover is gone
            os.makedirs(tmp)
            with open(os.path.join(tmp, "weights"), "w") as f:
                f.write(version)
        assert os.listdir(target) == ["weights"] and (target / "weights").read_text() == version
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    with pytest.raises(RuntimeError):  # a failed write leaves the old version and no temporary
        with atomic_path(str(target)) as tmp:
            os.makedirs(tmp)
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["hf"]
    write_text(str(tmp_path / "final.json"), "{}")
    write_text(str(tmp_path / "final.json"), '{"step": 1}')
    assert (tmp_path / "final.json").read_text() == '{"step": 1}'
    with atomic_path(str(tmp_path / "plot.png")) as tmp:
        assert tmp.endswith(".png")  # writers that choose the format by the extension keep working
        open(tmp, "w").close()
    assert sorted(os.listdir(tmp_path)) == ["final.json", "hf", "plot.png"]


def test_check_output_dir(tmp_path):
    check_output_dir(str(tmp_path / "new" / "run"))  # creatable: fine, nothing created
    assert os.listdir(tmp_path) == []
    (tmp_path / "f").write_text("x")
    for path in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(ValueError, match=f"{tmp_path / 'f'} is a file, not a directory"):
            check_output_dir(str(path))
