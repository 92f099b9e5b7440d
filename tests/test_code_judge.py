"""The code judge against hostile snippets: each runs in place of a model's response, under the
isolation this machine gives (``best_isolation``) and under the bare fallback (no namespaces, the
parent's user: the Python guard and the limits alone, what a platform without ``unshare`` gets);
none may succeed in its effect or hang, each is "incorrect", and a correct snippet is "correct".
Then each kernel-level layer alone (guard off), the working directory, environment and limits the
child sees, the opt-in, and an S3FT build that goes on after hostile rows."""

import json
import os
import socket
import time

import jax.numpy as jnp
import pytest

from ls_jax.models import from_config, tiny_llama_config
from ls_jax.s3ft import build, execution
from ls_jax.s3ft.__main__ import main as s3ft_main
from ls_jax.s3ft.judges import REFUSAL, CodeExecutionRefused
from ls_jax.tokenizer import train_bpe_tokenizer
from ls_jax.train import main as train_main

TIMEOUT = 2.0
# follows each snippet: if the snippet's hostile action did not raise, the program passes
TAIL = "\ndef add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n"
CONNECT_CTYPES = """import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
address = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
assert fd >= 0 and libc.connect(fd, address, len(address)) == 0
"""
HOSTILE = {
    "delete a file outside the workdir": "import os\nos.remove({victim!r})",
    "remove a tree outside the workdir": "import shutil\nshutil.rmtree({victim_dir!r})",
    "write a file outside the workdir": "open({target!r}, 'w').write('x')",
    "connect through socket": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')",
    "connect through _socket": "import _socket\n_socket.socket().connect(('127.0.0.1', {port}))",
    "connect through ctypes": CONNECT_CTYPES,
    # bounded (2 ** 6 processes) should the guard ever fail while the parent is root
    "fork bomb": "import os\nfor _ in range(6):\n    os.fork()",
    "spawn a shell": "import subprocess\nsubprocess.run(['touch', {target!r}])",
    "memory bomb": "hog = ' ' * (2 << 30)",
    "endless output": "while True:\n    print('x' * 1000)",
    "sleep past the timeout": "import time\ntime.sleep(60)",
    "kill the parent": "import os\nos.kill(os.getppid() or {parent}, 9)",  # 0 in a PID namespace: its number
    "read an environment secret": "import os\nprint(os.environ.get('SECRET'))\nassert os.environ['SECRET']",
}


@pytest.fixture(scope="module")
def machine():
    return execution.best_isolation()


@pytest.fixture
def scene(tmp_path, monkeypatch):
    """Things a snippet must not reach: a file and a tree to delete, a path to create, a listening
    socket, the parent, a secret in the parent's environment; ``check()`` asserts all untouched."""
    victim, victim_dir, target = tmp_path / "victim.txt", tmp_path / "tree", tmp_path / "written.txt"
    victim.write_text("keep me")
    victim_dir.mkdir()
    (victim_dir / "inside.txt").write_text("keep me too")
    monkeypatch.setenv("SECRET", "hunter2")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    fields = dict(
        victim=str(victim),
        victim_dir=str(victim_dir),
        target=str(target),
        port=server.getsockname()[1],
        parent=os.getpid(),
    )

    def check():
        assert victim.read_text() == "keep me" and (victim_dir / "inside.txt").exists() and not target.exists()
        with pytest.raises(BlockingIOError):  # nobody connected
            server.accept()

    yield fields, check
    server.close()


def _run(snippet: str, isolation) -> execution.Outcome:
    start = time.monotonic()
    outcome = execution.run(snippet + TAIL, TIMEOUT, isolation)
    assert time.monotonic() - start < TIMEOUT + 3  # never hangs
    return outcome


@pytest.mark.parametrize("arm", ["machine", "fallback"])
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_snippets_fail_without_effect(name, arm, machine, scene):
    fields, check = scene
    isolation = machine if arm == "machine" else execution.Isolation()
    outcome = _run(HOSTILE[name].format(**fields), isolation)
    assert not outcome.passed, outcome  # the judge's verdict: "incorrect"
    check()
    assert "hunter2" not in outcome.output
    assert len(outcome.output.encode()) <= execution.LIMITS["RLIMIT_FSIZE"]
    assert outcome.timed_out == (name == "sleep past the timeout")


@pytest.mark.parametrize("arm", ["machine", "fallback"])
def test_a_correct_snippet_passes(arm, machine, scene):
    _, check = scene
    isolation = machine if arm == "machine" else execution.Isolation()
    outcome = _run("import collections, math, re", isolation)
    assert outcome.passed and outcome.returncode == 0, outcome
    check()


# each kernel-level layer alone (the Python guard off): what it stops, and the layer it needs
KERNEL = {
    "delete a file outside the workdir": "user",
    "write a file outside the workdir": "user",
    "kill the parent": "user",
    "connect through _socket": "namespaces",
    "connect through ctypes": "namespaces",
    "unbounded fork bomb": "user",
}


@pytest.mark.parametrize("name", list(KERNEL))
def test_kernel_layers_hold_without_the_guard(name, machine, scene):
    if not getattr(machine, KERNEL[name]):
        pytest.skip(f"this machine gives no {KERNEL[name]} layer: {machine.describe()}")
    fields, check = scene
    snippet = "import os\nwhile True:\n    os.fork()" if name == "unbounded fork bomb" else HOSTILE[name]
    outcome = _run(snippet.format(**fields), execution.Isolation(machine.namespaces, machine.user, guard=False))
    assert not outcome.passed and not outcome.timed_out, outcome
    check()


def test_workdir_environment_and_limits(machine):
    names = sorted(execution.LIMITS) + ["RLIMIT_CPU"]
    report = (
        "import json, os, resource\n"
        f"limits = {{n: resource.getrlimit(getattr(resource, n))[1] for n in {names!r}}}\n"
        "print(json.dumps({'cwd': os.getcwd(), 'files': os.listdir('.'), 'env': dict(os.environ), "
        "'limits': limits}))\n"
        "open('scratch.txt', 'w').write('ok')  # inside the working directory: allowed\n"
    )
    outcome = _run(report, machine)
    assert outcome.passed, outcome
    seen = json.loads(outcome.output)
    assert seen["files"] == [] and not os.path.exists(seen["cwd"])  # fresh, empty, removed after
    assert seen["env"] == {"PATH": os.defpath, "HOME": seen["cwd"], "TMPDIR": seen["cwd"], "LANG": "C.UTF-8"}
    assert seen["limits"] == {**execution.LIMITS, "RLIMIT_CPU": int(TIMEOUT)}
    print(f"\ncode judge on this machine: {machine.describe()}")


def test_opt_in_is_required_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "s3ft.jsonl"
    args = ["--model", str(tmp_path), "--data", str(tmp_path / "none.jsonl"), "--judge", "code", "--out", str(out)]
    assert s3ft_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and REFUSAL in err and not out.exists()
    run_dir = tmp_path / "run"
    assert train_main(["--s3ft", "--judge", "code", "--output-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--allow-code-execution" in err and not run_dir.exists()


@pytest.fixture(scope="module")
def eos_model():
    """A tiny model and tokenizer whose greedy response is always empty (eos = token 0, zero head)."""
    tok = train_bpe_tokenizer(["x"], vocab_size=260)
    tok.eos_token = tok.pad_token
    model = from_config(tiny_llama_config(vocab_size=len(tok)), seed=0)
    model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
    return model, tok


def test_s3ft_build_goes_on_after_hostile_rows(eos_model, monkeypatch):
    """The response is empty, so each row's tests are the program: hostile ones first, then a passing one."""
    model, tok = eos_model
    hostile = ["import os\nos.kill(os.getppid(), 9)", "while True:\n    print('x' * 1000)", "import os\nos.fork()"]
    rows = [{"prompt": f"p{i}", "response": "r", "judge": "code", "tests": t} for i, t in enumerate(hostile)]
    rows.append({"prompt": "ok", "response": "r", "judge": "code", "tests": "assert 1 + 1 == 2"})
    with pytest.raises(CodeExecutionRefused):  # a row asks for the code judge: refused before generating
        build(model, tok, rows, judge="exact", progress=False)
    result = build(
        model, tok, rows, judge="exact", paraphrase=False, timeout=TIMEOUT, progress=False, allow_code_execution=True
    )
    assert [(r["s3ft_source"], r["s3ft_self_verdict"]) for r in result.rows] == [("gold", "incorrect")] * 3 + [
        ("self", "correct")
    ]
    assert f"code judge ran in: {execution.best_isolation().describe()}" in result.table()
