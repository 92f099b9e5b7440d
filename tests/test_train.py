"""The trainer end to end on tiny shapes: learning, exact resume, 1 vs 8 devices, LoRA,
gradient accumulation, sharding rules, and each bad-input case of the command line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from ls_jax.models import from_config, from_pretrained, tiny_llama_config
from ls_jax.train import TrainConfig, main, run
from ls_jax.train.lora import add_lora, lora_layers, merge_lora
from ls_jax.train.setup import TINY_MODELS
from ls_jax.train.sharding import AXES, MeshError, check_batch, param_spec, parse_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny, fast settings shared by every run here (generated data, built-in tiny model)
TINY = dict(
    num_train=192,
    num_eval=32,
    max_length=40,
    batch_size=16,
    eval_batch_size=32,
    lr=3e-3,
    warmup_steps=2,
    eval_every=1000,
    save_every=1000,
    log_every=1,
    progress=False,
    compare_smoothing=[],
    answer_rows=8,
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs here recompile identical train/eval steps (fresh jit objects): reuse them from a
    persistent compilation cache private to this module; restored afterwards."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0.2)
    yield
    for n, v in old.items():
        jax.config.update(n, v)


def _config(out, **kw) -> TrainConfig:
    return TrainConfig(output_dir=str(out), **{**TINY, **kw})


def _losses(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


STEPS, K = 16, 8


def _checkpoint_model(out, step: int, lora_rank: int = 0):
    """The run's model rebuilt from its orbax checkpoint at ``step`` (independently of the hf/
    export): the built-in tiny model from the seed, LoRA-wrapped like the trainer does, with the
    trained parameters (the checkpoint's first leaves) put in."""
    from transformers import AutoTokenizer

    seed = TrainConfig().seed
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    model = from_config(tiny_llama_config(vocab_size=len(tok), **TINY_MODELS["tiny"]), seed=seed)
    if lora_rank:
        model = add_lora(model, lora_rank, seed=seed)
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam if lora_rank else nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    saved = ocp.StandardCheckpointer().restore(str((out / "checkpoints" / str(step) / "state").absolute()))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, saved[: len(leaves)]), rest)


def _check_hf_export(out, step: int, lora_rank: int = 0, atol: float = 0.0):
    """``out/hf`` loads with from_pretrained and gives the checkpointed model's logits."""
    trained = _checkpoint_model(out, step, lora_rank)
    exported = from_pretrained(str(out / "hf"))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, trained.spec.vocab_size, (2, 12)))
    np.testing.assert_allclose(exported.logits(ids), trained.logits(ids), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs over the same rows: one batch of 16 per step, and 2 accumulated batches of 8."""
    base = tmp_path_factory.mktemp("runs")
    kw = dict(steps=STEPS, label_smoothing=0.1, save_every=K, keep_checkpoints=2)
    big = run(_config(base / "big", batch_size=16, **kw))[0]
    acc = run(_config(base / "acc", batch_size=8, grad_accum=2, **kw))[0]
    return {"base": base, "kw": kw, "big": big, "acc": acc}


def test_tiny_run_learns_and_writes_outputs(runs):
    out, final = runs["base"] / "big", runs["big"]
    losses = _losses(out)
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])
    assert sorted(map(int, os.listdir(out / "checkpoints"))) == [K, STEPS]
    for name in ("config.json", "final.json", "reliability.png", "tokenizer", "hf/tokenizer.json"):
        assert (out / name).exists(), name
    _check_hf_export(out, STEPS)
    evals = [json.loads(line) for line in open(out / "metrics.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [STEPS]
    for key in ("loss", "accuracy", "answer_accuracy", "nll", "ece"):
        assert final[key] == pytest.approx(evals[-1][key]), key
    assert 0 <= final["ece"] <= 1 and 0 <= final["accuracy"] <= 1 and final["nll"] > 0
    # token-level figures are over content tokens; the end-of-sequence token of each of the 32
    # held-out rows is apart (the only special token in a response)
    assert final["special_tokens"] == 32 and final["content_tokens"] + 32 == final["tokens"]
    # answer level on the last 4 of the first 8 held-out rows (the first 4 fit the temperatures)
    for kind in ("multiple_choice", "generated", "multiple_choice_scaled", "generated_scaled"):
        assert final["answers"][kind]["count"] == 2, kind


def test_gradient_accumulation_matches_one_big_batch(runs):
    np.testing.assert_allclose(_losses(runs["base"] / "acc"), _losses(runs["base"] / "big"), rtol=1e-4)


def test_resume_continues_exactly(runs, capsys):
    """Stop after K steps, leave a half-written save behind (as a killed job would), resume."""
    out = runs["base"] / "parts"
    cfg = dict(batch_size=8, grad_accum=2, **runs["kw"])
    run(_config(out, **cfg), stop_at=K)
    assert len(_losses(out)) == K
    partial = out / "checkpoints" / f"{K + 1}.orbax-checkpoint-tmp-1234"
    partial.mkdir()
    (partial / "junk").write_text("half written")
    with open(out / "metrics.jsonl", "a") as f:  # a step logged after the last checkpoint, then a cut line
        f.write(json.dumps({"kind": "train", "step": K + 1, "loss": -1.0}) + "\n" + '{"kind": "tr')
    run(_config(out, resume=True, **cfg))
    np.testing.assert_array_equal(_losses(out), _losses(runs["base"] / "acc"))
    assert sorted(map(int, os.listdir(out / "checkpoints"))) == [K, STEPS]
    # resuming with a setting that changes the run is refused
    changed = TrainConfig(**{**_config(out, resume=True, **cfg).to_json(), "lr": 1e-4})
    saved_config = (out / "config.json").read_text()
    with pytest.raises(ValueError, match="lr 0.003 -> 0.0001"):
        run(changed)
    assert (out / "config.json").read_text() == saved_config  # refused before anything is written


def test_resume_before_the_first_checkpoint_starts_over(tmp_path):
    """A job killed before its first save left metrics but no checkpoint: --resume starts
    afresh, and metrics.jsonl holds this run's lines only."""
    out = tmp_path / "run"
    run(_config(out, steps=2, batch_size=8))
    for step in os.listdir(out / "checkpoints"):
        shutil.rmtree(out / "checkpoints" / step)
    first = _losses(out)
    run(_config(out, steps=2, batch_size=8, resume=True))
    assert _losses(out) == first


def test_packing_and_lora_train(tmp_path):
    (final,) = run(_config(tmp_path / "run", steps=4, packing=True, lora_rank=4, lr=1e-2, batch_size=8))
    losses = _losses(tmp_path / "run")
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert final["tokens"] > 0
    _check_hf_export(tmp_path / "run", 4, lora_rank=4, atol=1e-5)  # adapters merged into the kernels


def test_local_checkpoint_with_chat_messages(tmp_path):
    """--model DIR: a transformers Llama checkpoint and tokenizer (with a chat template) saved
    locally, trained on chat ``messages`` rows; the run starts from the checkpoint's weights."""
    torch = pytest.importorskip("torch", reason="torch writes the Hugging Face checkpoint")
    from transformers import LlamaForCausalLM

    from ls_jax.tokenizer import train_bpe_tokenizer
    from ls_jax.train import synthetic

    rows, _ = synthetic.generate(40, 0, seed=2)
    tok = train_bpe_tokenizer([r["prompt"] + r["response"] for r in rows] + ["user assistant"])
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    model_dir = tmp_path / "ckpt"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1))
    with torch.no_grad():
        hf.lm_head.weight.mul_(100.0)  # a head no random init gives: huge logits, loss far above log V
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["response"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )
    (final,) = run(
        _config(
            tmp_path / "run",
            model=str(model_dir),
            data=str(data),
            steps=3,
            batch_size=8,
            eval_batch_size=8,
            eval_fraction=0.2,
        )
    )
    assert len(_losses(tmp_path / "run")) == 3 and final["tokens"] > 0
    # a fresh random init starts near log V; the loaded checkpoint's scaled head far above it
    assert _losses(tmp_path / "run")[0] > np.log(len(tok)) + 5


def test_lora_starts_as_the_base_model_and_trains_only_adapters():
    model = from_config(tiny_llama_config(vocab_size=64, hidden_size=32, num_hidden_layers=1), seed=0)
    ids = jnp.arange(12)[None] % 64
    before = model(ids)
    base_params = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    model = add_lora(model, 2, alpha=8.0)
    assert len(lora_layers(model)) == 7  # q, k, v, o, gate, up, down
    np.testing.assert_allclose(model(ids), before, atol=1e-6)  # B = 0 at the start
    _, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    assert len(jax.tree.leaves(lora)) == 2 * 7 and len(jax.tree.leaves(frozen)) == base_params
    assert all(2 in np.shape(x) for x in jax.tree.leaves(lora))  # only the rank-2 factors train
    only_q = add_lora(
        from_config(tiny_llama_config(vocab_size=64, hidden_size=32, num_hidden_layers=2)), 2, targets=r".*/q_proj"
    )
    assert [type(m).__name__ for m in lora_layers(only_q)] == ["Linear"] * 2  # one q_proj per layer
    with pytest.raises(ValueError, match="no nnx.Linear layer has a module path matching"):
        add_lora(model, 2, targets="nothing")


@pytest.mark.parametrize("alpha", [None, 12.0])
def test_merge_lora_reproduces_the_adapted_model(alpha):
    """W + (alpha / rank) A @ B in each kernel gives the logits of qwix's LoRA model (random nonzero A, B)."""
    model = add_lora(
        from_config(tiny_llama_config(vocab_size=64, hidden_size=32, num_hidden_layers=1), seed=0), 3, alpha=alpha
    )
    adapters = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    ids = jnp.arange(12)[None] % 64
    before = model.logits(ids)
    assert merge_lora(model, alpha) == 7
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam)) and not lora_layers(model)
    assert type(model).__name__ == "CausalLM" and not hasattr(type(model), "_unquantized_type")
    np.testing.assert_allclose(model.logits(ids), before, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(before)).max() > 0.1


def test_sharding_rules():
    """Layouts declared per parameter kind (Megatron-style tensor parallelism, FSDP), on a LoRA
    model's frozen and trained parameters and Adam's moments alike."""
    from jax.tree_util import DictKey, GetAttrKey

    mesh = AbstractMesh((2, 4, 2), AXES, axis_types=(AxisType.Auto,) * 3)

    def spec(*names, shape):
        return param_spec((*map(DictKey, names), GetAttrKey("value")), shape, mesh)

    attn = ("model", "layers", 0, "self_attn")
    assert spec(*attn, "q_proj", "kernel", shape=(8, 6)) == P("fsdp", "tensor")  # column-parallel
    assert spec(*attn, "q_proj", "bias", shape=(6,)) == P("tensor")
    assert spec(*attn, "q_proj", "kernel_lora_b", shape=(2, 6)) == P(None, "tensor")  # LoRA (qwix's names)
    assert spec("mu", *attn, "o_proj", "kernel", shape=(6, 8)) == P("tensor", "fsdp")  # row-parallel
    assert spec(*attn, "o_proj", "kernel_lora_a", shape=(6, 2)) == P("tensor", None)
    lora = nnx.state(
        add_lora(from_config(tiny_llama_config(vocab_size=16, hidden_size=8, num_hidden_layers=1)), 2), nnx.LoRAParam
    )  # the factors' real paths reach their declared layouts
    assert {p[-2:]: param_spec(tuple(map(DictKey, p)), np.shape(x), mesh) for p, x in nnx.to_flat_state(lora)}[
        ("o_proj", "kernel_lora_a")
    ] == P("tensor", None)
    assert spec("model", "layers", 0, "mlp", "down_proj", "kernel", shape=(10, 8)) == P("tensor", "fsdp")
    assert spec("model", "embed_tokens", "embedding", shape=(12, 8)) == P("tensor", "fsdp")  # vocabulary
    assert spec("lm_head", shape=(12, 8)) == P("tensor", "fsdp")
    assert spec("nu", "lm_head", shape=(11, 6)) == P(None, None)  # neither axis divides: replicated
    assert spec("model", "norm", "weight", shape=(8,)) == P(None)
    assert spec("score", "kernel", shape=(8, 3)) == P("fsdp", None)  # undeclared: fsdp over the largest dim
    assert spec("count", shape=()) == P()
    assert parse_mesh("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad in ("data=3", "data=2,fsdp=2", "model=2", "data=-1,fsdp=-1", "data=0"):
        with pytest.raises(MeshError):
            parse_mesh(bad, 8)
    check_batch(16, mesh)
    with pytest.raises(MeshError, match="^--eval-batch-size 12 is not divisible by data x fsdp = 8$"):
        check_batch(12, mesh, "--eval-batch-size")


EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.devices()
    from ls_jax.train import TrainConfig, run
    from ls_jax.train.sharding import make_mesh
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    assert dict(make_mesh(cfg.mesh).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    (final,) = run(cfg)
    print(json.dumps(final))
""")


def test_eight_devices_match_one(runs):
    """The same run on a 2 x 4 (data x fsdp) mesh of 8 simulated CPU devices, in a subprocess."""
    out = runs["base"] / "eight"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cfg = _config(out, batch_size=16, mesh="data=2,fsdp=4,tensor=1", **runs["kw"]).to_json()
    proc = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, json.dumps(cfg)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight, one = json.loads(proc.stdout.strip().splitlines()[-1]), runs["big"]
    np.testing.assert_allclose(_losses(out), _losses(runs["base"] / "big"), rtol=1e-4)
    for key in ("loss", "nll", "ece", "accuracy", "answer_accuracy"):
        assert eight[key] == pytest.approx(one[key], rel=1e-3, abs=1e-5), key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(n: int, port: int, flags, devices: int = 4, num_processes=None):
    """``n`` train.py processes with ``devices`` CPU devices each, joined through 127.0.0.1:port."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                *flags,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(num_processes or n),
                "--process-id",
                str(i),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]


def _wait(procs, timeout=300):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_match_one_and_resume_after_kill(runs):
    """2 processes x 4 CPU devices (gloo collectives) on a data=2,fsdp=4 mesh: killed both after
    the first checkpoint, then --resume: the losses of the 1-device run; a resume with another
    number of processes, and a process whose --num-processes disagrees, are refused."""
    out = runs["base"] / "two_processes"
    cfg = {**TINY, **runs["kw"], "mesh": "data=2,fsdp=4"}
    flags = ["--output-dir", str(out), "--no-progress", "--compare-smoothing", ""]
    for k, v in cfg.items():
        if k not in ("progress", "compare_smoothing"):
            flags += [f"--{k.replace('_', '-')}", str(v)]
    procs = _launch(2, _free_port(), flags)
    try:
        first = out / "checkpoints" / str(K)
        while not first.is_dir() and all(p.poll() is None for p in procs):
            time.sleep(0.05)
        assert first.is_dir(), procs[0].communicate()[1][-3000:]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert not (out / "checkpoints" / str(STEPS)).exists()  # killed mid-run
    _wait(_launch(2, _free_port(), flags + ["--resume"]))
    np.testing.assert_allclose(_losses(out), _losses(runs["base"] / "big"), rtol=1e-4)
    assert (out / "hf" / "model.safetensors").exists() and (out / "final.json").exists()
    with pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
        run(_config(out, resume=True, **runs["kw"]))
    procs = _launch(2, _free_port(), flags + ["--output-dir", str(out / "never")], num_processes=2)
    procs[1].kill()  # replaced by a process that claims 3 processes
    procs[1].communicate()
    port = procs[0].args[procs[0].args.index("--coordinator") + 1].rsplit(":", 1)[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    bad = subprocess.run(
        [
            sys.executable,
            "train.py",
            *flags,
            "--output-dir",
            str(out / "never"),
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "3",
            "--process-id",
            "1",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    procs[0].kill()
    procs[0].communicate()
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert (
        bad.stderr.strip().splitlines()[-1] == "error: --num-processes 3 does not match the coordinator's 2 processes"
    )


def _bad(tmp_path, capsys, *args, out=None):
    out = tmp_path / "out" if out is None else out
    existed = out.exists()
    code = main(["--output-dir", str(out), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert existed or not out.exists()  # nothing half-written
    return err


def test_bad_inputs(tmp_path, capsys):
    assert "data not found" in _bad(tmp_path, capsys, "--data", str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n')
    assert "line 2: malformed JSON" in _bad(tmp_path, capsys, "--data", str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in _bad(tmp_path, capsys, "--data", str(empty))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "What is 1 + 2? " * 4, "response": "3"}) + "\n" for _ in range(20)))
    assert "no example has a response token after truncation to 8 tokens" in _bad(
        tmp_path, capsys, "--data", str(rows), "--max-length", "8"
    )
    assert "needs 3 devices" in _bad(tmp_path, capsys, "--mesh", "data=3")
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert "unsupported architecture" in _bad(tmp_path, capsys, "--model", str(model_dir))
    assert "neither a local checkpoint" in _bad(tmp_path, capsys, "--model", "huge")
    from ls_jax.tokenizer import train_bpe_tokenizer

    no_weights = tmp_path / "no_weights"  # config and tokenizer, but the safetensors are missing
    tok = train_bpe_tokenizer(["1 + 2 = 3"])
    tiny_llama_config(vocab_size=len(tok)).save_pretrained(no_weights)
    tok.save_pretrained(no_weights)
    assert "no model.safetensors" in _bad(tmp_path, capsys, "--model", str(no_weights), "--data", str(rows))
    assert "--steps must be >= 1" in _bad(tmp_path, capsys, "--steps", "0")
    assert "--block-n/-v/-d: block_v must be >= 1" in _bad(tmp_path, capsys, "--block-v", "0")
    assert "--lora-targets: no nnx.Linear layer has a module path matching 'qproj'" in _bad(
        tmp_path, capsys, "--lora-rank", "2", "--lora-targets", "qproj"
    )
    assert "is not a regular expression" in _bad(tmp_path, capsys, "--lora-targets", "(q")
    assert "--lora-alpha must be > 0" in _bad(tmp_path, capsys, "--lora-alpha", "0")
    assert "--remat must be one of ('none', 'full', 'dots')" in _bad(tmp_path, capsys, "--remat", "all")
    assert "--eval-data needs --data" in _bad(tmp_path, capsys, "--eval-data", str(rows))
    bad_row = tmp_path / "bad_row.jsonl"  # line 14 lacks its response: named by its line in the file
    bad_row.write_text(
        "".join(json.dumps({"prompt": "1 + 2 = ", **({} if i == 13 else {"response": "3"})}) + "\n" for i in range(20))
    )
    assert f"{bad_row} (train): line 14: needs 'messages' or 'prompt' and 'response'" in _bad(
        tmp_path, capsys, "--data", str(bad_row), "--batch-size", "2"
    )
    assert "--compare-smoothing repeats a value" in _bad(tmp_path, capsys, "--compare-smoothing", "0.1,0,0.10")
    assert main(["--resume", "--no-progress"]) == 2  # without --output-dir it would start afresh in runs/<now>
    assert capsys.readouterr().err.strip() == "error: --resume needs the --output-dir of the run to continue"


def test_bad_inputs_of_issue_15(tmp_path, capsys):
    """Each is one error line, exit status 2, nothing written."""
    for flags, message in [
        (("--lr", "inf"), "--lr must be finite and > 0"),
        (("--lr", "nan"), "--lr must be"),
        (("--b1", "1"), "--b1 must be in [0, 1)"),
        (("--b2", "-0.1"), "--b2 must be in [0, 1)"),
        (("--clip-norm", "-1"), "--clip-norm must be finite and >= 0"),
        (("--weight-decay", "inf"), "--weight-decay must be"),
        (("--mesh", "data=1,data=1"), "axis 'data' is given twice"),
        (("--num-train", "30000"), "the generated data has at most 20000 distinct questions"),
        (("--num-eval", "0"), "--num-eval must be >= 1"),
    ]:
        assert message in _bad(tmp_path, capsys, *flags), flags
    # --output-dir a file, or under a file
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"{afile} is a file" in _bad(tmp_path, capsys, out=afile)
    assert f"{afile} is a file" in _bad(tmp_path, capsys, out=afile / "run")
    assert afile.read_text() == "x"
    # --resume with no run there, or with --compare-smoothing on a single run's directory
    assert "--resume: no run to continue in" in _bad(tmp_path, capsys, "--resume")
    single = tmp_path / "single"
    single.mkdir()
    (single / "config.json").write_text("{}")
    assert f"no run to continue in {single / 'ls0'}" in _bad(
        tmp_path, capsys, "--resume", "--compare-smoothing", "0,0.1", "--seeds", "", "--base-steps", "0", out=single
    )
    assert f"no run to continue in {single / 'base'}" in _bad(tmp_path, capsys, "--resume", out=single)  # the demo
    assert os.listdir(single) == ["config.json"]
    # data: not UTF-8, mixed types, garbage parquet, only empty responses
    rows = [{"prompt": f"What is {i} + 1? ", "response": str(i + 1)} for i in range(20)]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        b"".join(json.dumps(r).encode() + b"\n" for r in rows) + '{"prompt": "\u00e9"}\n'.encode("latin-1")
    )
    assert f"{latin}: line 21: not UTF-8 text" in _bad(tmp_path, capsys, "--data", str(latin))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "".join(json.dumps({**r, "response": i if i == 4 else r["response"]}) + "\n" for i, r in enumerate(rows))
    )
    assert "line 5: 'response' must be a string, got int 4" in _bad(tmp_path, capsys, "--data", str(mixed))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 not really")
    assert "not a readable parquet file" in _bad(tmp_path, capsys, "--data", str(garbage))
    empty = tmp_path / "empty_responses.jsonl"
    empty.write_text("".join(json.dumps({**r, "response": ""}) + "\n" for r in rows))
    assert "every response is empty" in _bad(tmp_path, capsys, "--data", str(empty))
    # a checkpoint whose model.safetensors was cut short
    from ls_jax.models import save_pretrained
    from ls_jax.tokenizer import train_bpe_tokenizer

    cut = tmp_path / "cut"
    tok = train_bpe_tokenizer([r["prompt"] + r["response"] for r in rows])
    save_pretrained(from_config(tiny_llama_config(vocab_size=len(tok))), str(cut))
    tok.save_pretrained(cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    good = tmp_path / "rows.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "model.safetensors: not a complete safetensors file" in _bad(
        tmp_path, capsys, "--model", str(cut), "--data", str(good), "--batch-size", "2"
    )


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2", "llama"])
def test_checkpoint_without_tokenizer(tmp_path, capsys, model_type):
    """A checkpoint directory without tokenizer files: transformers 5 builds an empty Qwen2
    tokenizer (every text encodes to nothing), a Gemma one that knows only its special tokens,
    and fails for Llama; each is one error line naming the missing files."""
    from transformers import AutoConfig

    from ls_jax.models import save_pretrained

    model_dir = str(tmp_path / model_type)
    save_pretrained(
        from_config(
            AutoConfig.for_model(
                model_type,
                vocab_size=300,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
            )
        ),
        model_dir,
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i} + 1 = ", "response": str(i + 1)}) + "\n" for i in range(20)))
    err = _bad(tmp_path, capsys, "--model", str(model_dir), "--data", str(rows))
    assert err == (
        f"error: {model_dir} holds no tokenizer (none of tokenizer.json, tokenizer_config.json, "
        f"tokenizer.model, vocab.json, vocab.txt): save the model's tokenizer there "
        f"(tokenizer.save_pretrained)"
    ), err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory, so none is unwritable")
def test_unwritable_output_dir(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert f"{locked} is not writable" in _bad(tmp_path, capsys, out=locked / "run")


def test_divergence_stops_before_saving(tmp_path, capsys):
    """A learning rate so large the loss overflows: exit 1 with one error line; no non-finite
    line in metrics.jsonl and only the checkpoints of the steps before it."""
    out = tmp_path / "run"
    code = main(
        [
            "--output-dir",
            str(out),
            "--no-progress",
            "--lr",
            "1e30",
            "--warmup-steps",
            "0",
            "--steps",
            "5",
            "--save-every",
            "1",
            "--log-every",
            "1",
            "--num-train",
            "64",
            "--num-eval",
            "16",
            "--batch-size",
            "16",
            "--label-smoothing",
            "0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: training diverged at step "), err
    step = int(err.split("step ")[1].split()[0])
    assert 1 < step <= 5
    assert sorted(map(int, os.listdir(out / "checkpoints"))) == list(range(max(1, step - 3), step))
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in logged if r["kind"] == "train"] == list(range(1, step))
    assert all(np.isfinite(r["loss"]) for r in logged)
    assert not (out / "final.json").exists() and not (out / "hf").exists()


def test_command_line_exit_status(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "train.py", "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: data not found: {tmp_path / 'nope.jsonl'}"
    assert not out.exists()


def test_flags():
    from ls_jax.train import parse_args

    default = parse_args([])
    assert (default.model, default.data, default.compare_smoothing) == ("tiny", None, [0.0, 0.1])
    assert (default.seeds, default.base_steps) == ([0, 1], 1000)  # the paper's setting: base, then SFT
    for one_run in (["--label-smoothing", "0.2"], ["--data", "x.jsonl"]):  # one run, as asked
        c = parse_args(one_run)
        assert (c.compare_smoothing, c.seeds, c.base_steps) == ([], [], 0)
    c = parse_args(["--seeds", "3,4", "--base-steps", "5", "--compare-smoothing", ""])
    assert (c.compare_smoothing, c.seeds, c.base_steps) == ([], [3, 4], 5)
    c = parse_args(
        [
            "--compare-smoothing",
            "0,0.05",
            "--no-progress",
            "--lora-rank",
            "8",
            "--mesh",
            "fsdp=-1",
            "--lora-alpha",
            "16",
            "--lora-targets",
            ".*/q_proj",
        ]
    )
    assert (c.compare_smoothing, c.progress, c.lora_rank, c.mesh) == ([0.0, 0.05], False, 8, "fsdp=-1")
    assert (c.lora_alpha, c.lora_targets, default.lora_alpha) == (16.0, ".*/q_proj", None)
    assert (default.remat, parse_args(["--remat", "dots"]).remat) == ("none", "dots")
    assert TrainConfig.from_json(c.to_json()) == c
    from ls_jax.train.config import build_parser

    assert [a.dest for a in build_parser()._actions if not a.help] == []  # --help documents every flag


def test_tasks_and_sources_sit_below_the_command(tmp_path):
    """--task's choices name the task objects; the trainer imports nothing of ls_jax.s3ft, and
    without it --s3ft is a one-line error (train.py, which imports it, trains with S3FT)."""
    from ls_jax.train import config, tasks

    assert tuple(tasks.BY_NAME) == config.TASKS
    code = (
        "import sys; from ls_jax.train import main; import ls_jax.train.loop; "
        "print(sorted(m for m in sys.modules if m.startswith('ls_jax.s3ft'))); "
        f"sys.exit(main(['--s3ft', '--output-dir', {str(tmp_path / 'out')!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (2, "[]")
    assert proc.stderr.strip() == (
        "error: --s3ft: the S3FT data source is not loaded: import ls_jax.s3ft first "
        "(train.py and python -m ls_jax.train do)"
    )
    assert not (tmp_path / "out").exists()


def test_flags_say_what_they_do(tmp_path, capsys):
    """--help shows the defaults; --task has argparse choices; --logit-softcap is one option
    (model / none / a number); a smoothing of 1 and a flag the others would ignore are refused
    (one error line, exit status 2, nothing written)."""
    from ls_jax.train import parse_args
    from ls_jax.train.config import build_parser

    helps = {a.option_strings[0]: a.help for a in build_parser()._actions}
    for flag, default in (
        ("--steps", 320),
        ("--lr", 0.003),
        ("--batch-size", 32),
        ("--max-length", 48),
        ("--eval-fraction", 0.1),
        ("--lora-rank", 0),
        ("--num-train", 256),
    ):
        assert helps[flag].endswith(f"(default: {default})"), (flag, helps[flag])
    assert [a.choices for a in build_parser()._actions if a.dest == "task"] == [("causal_lm", "classification")]
    assert [parse_args(["--logit-softcap", v]).logit_softcap for v in ("model", "none", "30")] == ["model", None, 30.0]
    assert "--no-softcap" not in helps
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i} + 1 = ", "response": str(i + 1)}) + "\n" for i in range(20)))
    both = "--label-smoothing with --compare-smoothing: each run takes its value from --compare-smoothing"
    for flags, message in [
        (("--label-smoothing", "1.0"), "--label-smoothing must be in [0, 1), got 1"),
        (("--compare-smoothing", "0,1"), "--compare-smoothing must be in [0, 1), got 1"),
        (("--label-smoothing", "0.1", "--compare-smoothing", "0,0.2"), both),
        (("--label-smoothing", "0", "--compare-smoothing", "0,0.2"), both),
        (("--data", str(rows), "--num-train", "100"), "--num-train sizes the generated data"),
        (("--data", str(rows), "--num-eval", "10"), "--num-eval sizes the generated data"),
        (
            (
                "--eval-fraction",
                "0.2",
            ),
            "--eval-fraction holds out part of --data",
        ),
        (
            ("--data", str(rows), "--eval-data", str(rows), "--eval-fraction", "0.2"),
            "--eval-fraction holds out part of --data",
        ),
    ]:
        assert message in _bad(tmp_path, capsys, *flags), flags
    with pytest.raises(ValueError, match="each run takes its value"):  # from the Python API too
        run(_config(tmp_path / "out", label_smoothing=0.1, compare_smoothing=[0.0, 0.2]))
    for flags, message in (
        (["--task", "regression"], "argument --task: invalid choice: 'regression'"),
        (["--logit-softcap", "off"], "expected 'model', 'none' or a number, got 'off'"),
    ):
        with pytest.raises(SystemExit):  # argparse: the usage line, then the error
            parse_args(flags)
        assert message in capsys.readouterr().err.splitlines()[-1]


# A train.py subprocess that SIGKILLs itself at a chosen moment: "commit:K" right after the
# checkpoint of step K is on disk, "export" in the middle of the final export (weights
# written, tokenizer not).
KILLED_RUN = """
import os, signal, sys
from ls_jax.train import checkpoint, export, main

kind, _, at = sys.argv[1].partition(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
save, save_pretrained = checkpoint.CheckpointStore.save, export.save_pretrained

def killing_save(self, step, state, meta):
    save(self, step, state, meta)
    if kind == "commit" and step == int(at):
        self.manager.wait_until_finished()
        die()

def killing_export(model, path, **kw):
    save_pretrained(model, path, **kw)
    die()

checkpoint.CheckpointStore.save = killing_save
if kind == "export":
    export.save_pretrained = killing_export
sys.exit(main(sys.argv[2:]))
"""
KILL_FLAGS = [
    "--steps",
    "6",
    "--save-every",
    "2",
    "--eval-every",
    "2",
    "--log-every",
    "1",
    "--num-train",
    "64",
    "--num-eval",
    "16",
    "--batch-size",
    "16",
    "--eval-batch-size",
    "16",
    "--max-length",
    "40",
    "--warmup-steps",
    "1",
    "--label-smoothing",
    "0.1",
    "--no-progress",
]
TIMINGS = ("tokens_per_s", "step_time_s")


def _killed_run(out, plan, *flags):
    """Run KILLED_RUN (sharing this module's compilation cache); it must end killed."""
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
    }
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, plan, *KILL_FLAGS, "--output-dir", str(out), *flags],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _metrics_lines(out):
    """metrics.jsonl's lines without their timings."""
    with open(out / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


def test_killed_and_resumed_run_logs_what_an_uninterrupted_run_logs(tmp_path):
    """SIGKILL a train.py process right after a checkpoint commits, resume it and SIGKILL it
    during the final export, resume again: metrics.jsonl (line by line), final.json and the
    exported weights equal those of an uninterrupted run."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert main([*KILL_FLAGS, "--output-dir", str(ref)]) == 0
    _killed_run(out, "commit:2")
    assert [(r["kind"], r["step"]) for r in _metrics_lines(out)] == [("train", 1), ("train", 2), ("eval", 2)]
    _killed_run(out, "export", "--resume")
    assert (out / ".hf.tmp" / "model.safetensors").exists()  # killed mid-export ...
    assert not (out / "hf").exists() and not (out / "final.json").exists()  # ... with nothing under its name
    assert main([*KILL_FLAGS, "--output-dir", str(out), "--resume"]) == 0
    assert _metrics_lines(out) == _metrics_lines(ref)
    assert [(r["kind"], r["step"]) for r in _metrics_lines(ref) if r["kind"] == "eval"] == [
        ("eval", 2),
        ("eval", 4),
        ("eval", 6),
    ]
    final, final_ref = (json.loads((d / "final.json").read_text()) for d in (out, ref))
    assert {k: v for k, v in final.items() if k not in TIMINGS} == {
        k: v for k, v in final_ref.items() if k not in TIMINGS
    }
    assert (out / "hf" / "model.safetensors").read_bytes() == (ref / "hf" / "model.safetensors").read_bytes()
    assert sorted(os.listdir(out / "hf")) == sorted(os.listdir(ref / "hf"))


def test_eval_step_splits_content_and_special_tokens():
    """The eval step's content-token bins and special-token bins against dense logits, token by token."""
    from ls_jax.data import IGNORE_INDEX, eval_batches, prepare
    from ls_jax.lm_loss import next_token_targets
    from ls_jax.tokenizer import train_bpe_tokenizer
    from ls_jax.train import synthetic
    from ls_jax.train.config import LossOptions
    from ls_jax.train.sharding import make_mesh, tree_shardings
    from ls_jax.train.step import make_eval_step

    rows, _ = synthetic.generate(12, 0, seed=1)
    tok = train_bpe_tokenizer([r["prompt"] + r["response"] for r in rows])
    model = from_config(tiny_llama_config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1), seed=0)
    examples, _ = prepare(rows, tok, 40)
    (batch,) = eval_batches(examples, 12, 40, tok.pad_token_id)
    mesh = make_mesh("data=1,fsdp=1,tensor=1")
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    sums = make_eval_step(
        graphdef,
        LossOptions(label_smoothing=0.1),
        param_shardings=tree_shardings(params, mesh),
        frozen_shardings=tree_shardings(frozen, mesh),
        mesh=mesh,
        special_ids=tok.all_special_ids,
    )(params, frozen, batch)
    z = np.asarray(model.logits(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"] > 0)), np.float64)
    targets = np.asarray(next_token_targets(batch["labels"], batch["segment_ids"] > 0))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for name, keep in (
        ("bins", ~np.isin(targets, tok.all_special_ids)),
        ("special_bins", np.isin(targets, tok.all_special_ids)),
    ):
        sel = (targets != IGNORE_INDEX) & keep
        bins = sums[name]
        assert int(bins.count.sum()) == sel.sum() > 0
        np.testing.assert_allclose(float(bins.confidence_sum.sum()), p.max(-1)[sel].sum(), rtol=1e-4)
        assert int(bins.correct_sum.sum()) == (p.argmax(-1) == targets)[sel].sum()
        np.testing.assert_allclose(
            float(bins.nll_sum),
            -np.log(np.take_along_axis(p, np.where(sel, targets, 0)[..., None], -1)[..., 0][sel]).sum(),
            rtol=1e-4,
        )
    assert int(sums["special_bins"].count.sum()) == 12  # one end-of-sequence token per row


def test_base_stage_then_seeds(tmp_path, capsys):
    """--base-steps pre-trains a base model on plain text into base/, every smoothing x seed run
    fine-tunes it; the tables show each stage (with temperature scaling) and the per-stage
    reliability PNG is written; --resume finds the base finished and does not train it again."""
    out = tmp_path / "demo"
    kw = dict(steps=2, base_steps=3, num_base=64, compare_smoothing=[0.0, 0.1], seeds=[0, 1], answer_rows=8)
    results = run(_config(out, **kw))
    assert [(r["stage"], r["label_smoothing"], r["seed"], r["step"]) for r in results] == [
        ("base", 0.0, 0, 3),
        ("sft", 0.0, 0, 2),
        ("sft", 0.0, 1, 2),
        ("sft", 0.1, 0, 2),
        ("sft", 0.1, 1, 2),
    ]
    assert sorted(os.listdir(out)) == [
        "base",
        "ls0-seed0",
        "ls0-seed1",
        "ls0.1-seed0",
        "ls0.1-seed1",
        "reliability.png",
        "summary.json",
    ]
    base = from_pretrained(str(out / "base" / "hf"))
    first = _checkpoint_model(out / "ls0-seed0", 2)  # the fine-tuned run is the base plus 2 steps: close, not equal
    ids = jnp.arange(10)[None] % base.spec.vocab_size
    gap = float(jnp.abs(first.logits(ids) - base.logits(ids)).max())
    assert 0 < gap < 2.0
    base_lines = (out / "base" / "metrics.jsonl").read_text()
    assert (
        main(
            [
                "--output-dir",
                str(out),
                "--resume",
                "--no-progress",
                "--steps",
                "2",
                "--base-steps",
                "3",
                "--num-base",
                "64",
                "--num-train",
                "192",
                "--num-eval",
                "32",
                "--max-length",
                "40",
                "--batch-size",
                "16",
                "--eval-batch-size",
                "32",
                "--warmup-steps",
                "2",
                "--eval-every",
                "1000",
                "--save-every",
                "1000",
                "--log-every",
                "1",
                "--answer-rows",
                "8",
            ]
        )
        == 0
    )
    assert (out / "base" / "metrics.jsonl").read_text() == base_lines
    printed = capsys.readouterr().out
    for label in ("base", "base + T", "SFT a=0 + T", "SFT a=0.1", "addition questions", "content tokens"):
        assert label in printed, label


def test_answer_table_names_the_questions_of_the_data():
    """The generated answers' table names the built-in questions, or the data file they come from."""
    from ls_jax.train import report, tasks

    scores = {"accuracy": 0.5, "confidence": 0.6, "ece": 0.1, "ece10": 0.1, "brier": 0.2, "nll": 0.7, "count": 4}
    token = {k: 0.5 for k, _, _ in report.TOKEN_COLUMNS}
    results = [{"stage": "sft", "label_smoothing": 0.1, "seed": 0, "answers": {"generated": scores}, **token}]
    for data, title in ((None, "addition questions"), ("some/dir/reviews.jsonl", "questions of reviews.jsonl")):
        text = tasks.task_of(TrainConfig(data=data)).summary(TrainConfig(data=data), results)
        assert f"answer level, {title}: greedy answer" in text, text
