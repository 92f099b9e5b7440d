"""The Examples sections of ls_jax's docstrings, run as doctests (every module that has one)."""

import doctest
import importlib
import pkgutil

import pytest

import ls_jax

# entry points run their CLI on import; the sandbox child runs a program from stdin
SKIP = ("__main__", "_child")


def _modules():
    names = [ls_jax.__name__]
    for info in pkgutil.walk_packages(ls_jax.__path__, prefix="ls_jax."):
        if info.name.rsplit(".", 1)[-1] not in SKIP:
            names.append(info.name)
    return sorted(names)


def _with_examples():
    finder = doctest.DocTestFinder()
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        if any(test.examples for test in finder.find(module)):
            found.append(name)
    return found


@pytest.mark.parametrize("name", _with_examples() or ["(none yet)"])
def test_docstring_examples(name):
    if name == "(none yet)":
        pytest.skip("no docstring in ls_jax has an Examples section yet")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run it verbose)"
