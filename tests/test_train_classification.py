"""train.py --task classification: the smoothing conventions against hand-written targets (optax),
label parsing and its errors, and a short LoRA run whose report is recomputed from the exported model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ls_jax.data import DataError
from ls_jax.models import from_config, from_pretrained, tiny_llama_config
from ls_jax.models.classification import convention_smoothing, sequence_classification_loss
from ls_jax.train import TrainConfig, main, run
from ls_jax.train.classification import label_classes, target

LOGITS = jnp.array([[2.0, -1.0, 0.5], [0.1, 0.3, -2.0]])


class _Fixed:
    """A stand-in classifier returning fixed logits (the loss is what is tested here)."""

    def __call__(self, *args):
        return LOGITS


@pytest.mark.parametrize(
    "convention, first_row", [("others", [0.8, 0.1, 0.1]), ("uniform", [0.8 + 0.2 / 3, 0.2 / 3, 0.2 / 3])]
)
def test_smoothing_conventions_equal_optax_on_hand_written_targets(convention, first_row):
    """a = 0.2 on 3 classes: "others" is [0.8, 0.1, 0.1] for class 0, "uniform" PyTorch / optax's."""
    batch = {"input_ids": jnp.zeros((2, 4), jnp.int32), "labels": jnp.array([0, 2])}
    loss, _ = sequence_classification_loss(_Fixed(), batch, label_smoothing=0.2, smoothing_convention=convention)
    q = np.array([first_row, np.roll(first_row, 2)])  # class 2 in the second row
    np.testing.assert_allclose(q.sum(-1), 1.0)
    np.testing.assert_allclose(loss, optax.softmax_cross_entropy(LOGITS, q).mean(), rtol=1e-6)
    # a soft label t: (1 - a) t + a (1 - t) / (K - 1) under "others"
    soft = jnp.array([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5]])
    loss, _ = sequence_classification_loss(
        _Fixed(), {**batch, "labels": soft}, label_smoothing=0.2, smoothing_convention=convention
    )
    want = 0.8 * soft + (0.2 * (1 - soft) / 2 if convention == "others" else 0.2 / 3)
    np.testing.assert_allclose(loss, optax.softmax_cross_entropy(LOGITS, want).mean(), rtol=1e-6)
    traced = jax.jit(convention_smoothing, static_argnums=(1, 2))(0.2, 3, convention)  # a schedule's value
    assert float(traced) == pytest.approx(0.3 if convention == "others" else 0.2)
    with pytest.raises(ValueError, match="smoothing_convention must be one of"):
        convention_smoothing(0.1, 3, "other")


def test_labels_index_name_or_distribution():
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": {"neg": 0.25, "pos": 0.75}}]
    classes = label_classes(rows, ["line 1", "line 2"])
    assert classes == ["neg", "pos"]
    np.testing.assert_array_equal(target("pos", classes, "x"), [0, 1])
    np.testing.assert_array_equal(target({"neg": 0.25, "pos": 0.75}, classes, "x"), [0.25, 0.75])
    assert label_classes([{"label": 2}, {"label": 0}], ["r1", "r2"]) == ["0", "1", "2"]
    np.testing.assert_array_equal(target(1, ["0", "1", "2"], "x"), [0, 1, 0])
    np.testing.assert_array_equal(target(np.int64(2), ["0", "1", "2"], "x"), [0, 0, 1])  # parquet columns
    np.testing.assert_array_equal(target({"pos": np.float32(1.0)}, classes, "x"), [0, 1])
    bad = [
        ({"neg": 60, "pos": 40}, "not a distribution (sums to 100, not 1)"),
        ({"neg": -0.5, "pos": 1.5}, "-0.5 of 'neg' is not a number >= 0"),
        ({"neu": 1.0}, "unknown class 'neu'"),
        ("neu", "not one of the classes"),
        (5, "outside [0, 2)"),
    ]
    for label, message in bad:
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            target(label, classes, "line 3")
    with pytest.raises(DataError, match="mix class indices and class names"):
        label_classes([{"label": 1}, {"label": "pos"}], ["r1", "r2"])
    with pytest.raises(DataError, match="line 2: needs 'text' and a 'label'"):
        label_classes([{"label": 1}, {"text": "no label"}], ["line 1", "line 2"])


def test_bad_soft_label_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    rows = [{"text": f"review {i}", "label": ["neg", "pos"][i % 2]} for i in range(20)]
    rows[7] = {"text": "odd", "label": {"neg": 60, "pos": 40}}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["--task", "classification", "--data", str(data), "--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "line 8: soft label" in err and "sums to 100" in err, err
    assert not out.exists()
    assert main(["--smoothing-convention", "others", "--output-dir", str(out), "--no-progress"]) == 2
    assert "is for --task classification" in capsys.readouterr().err
    assert (
        main(
            [
                "--task",
                "classification",
                "--smoothing-convention",
                "others",
                "--label-smoothing",
                "0.7",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "at most 0.6667 on 3 classes" in capsys.readouterr().err


def test_lora_classifier_run_and_its_report(tmp_path, monkeypatch):
    """A short run of the embedded example with LoRA: the score head and the adapters train, the
    exported model (LoRA merged) gives the reported accuracy and log loss on the held-out rows;
    its config.json names the classes; its reliability diagram is titled for them."""
    from ls_jax.train import loop
    from ls_jax.train.classification import generate

    titles = []
    draw = loop.reliability_diagram
    monkeypatch.setattr(
        loop, "reliability_diagram", lambda bins, path, title: (titles.append(title), draw(bins, path, title=title))[1]
    )

    out = tmp_path / "run"
    config = TrainConfig(
        task="classification",
        num_train=128,
        num_eval=48,
        steps=12,
        batch_size=16,
        eval_batch_size=32,
        lr=1e-2,
        warmup_steps=1,
        lora_rank=2,
        lora_alpha=4.0,
        label_smoothing=0.1,
        smoothing_convention="others",
        output_dir=str(out),
        progress=False,
        eval_every=1000,
        save_every=1000,
        log_every=1,
    )
    (final,) = run(config)
    assert final["classes"] == ["Negative", "Neutral", "Positive"] and final["examples"] == 48
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open()) if r["kind"] == "train"]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert (out / "reliability.png").stat().st_size > 0 and titles == ["smoothing 0.1, 3 classes"]
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    assert hf_config["id2label"] == {"0": "Negative", "1": "Neutral", "2": "Positive"}
    assert hf_config["label2id"] == {"Negative": 0, "Neutral": 1, "Positive": 2}

    from transformers import AutoTokenizer

    from ls_jax.train.setup import TINY_MODELS

    tok = AutoTokenizer.from_pretrained(str(out / "hf"), local_files_only=True)
    exported = from_pretrained(str(out / "hf"))
    fresh = from_config(
        tiny_llama_config(vocab_size=len(tok), **TINY_MODELS["tiny"]),
        task="sequence_classification",
        num_labels=3,
        seed=config.seed,
    )
    assert not np.allclose(exported.score.kernel[...], fresh.score.kernel[...])  # the head trained
    assert not np.allclose(
        exported.model.layers[0].self_attn.q_proj.kernel[...], fresh.model.layers[0].self_attn.q_proj.kernel[...]
    )  # adapters merged in
    np.testing.assert_array_equal(exported.model.embed_tokens.embedding[...], fresh.model.embed_tokens.embedding[...])
    _, held = generate(128, 48, seed=config.seed)
    classes = final["classes"]
    q = np.stack([target(r["label"], classes, "") for r in held])
    logits = np.concatenate(
        [
            np.asarray(
                exported(jnp.asarray([[tok.bos_token_id] + tok(r["text"], add_special_tokens=False)["input_ids"]]))
            )
            for r in held
        ]
    )
    log_p = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    assert final["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == q.argmax(-1)))
    assert final["log_loss"] == pytest.approx(-(q * log_p).sum(-1).mean(), rel=1e-4)


# the smallest classification run of the command line (generated reviews)
TINY_FLAGS = [
    "--task",
    "classification",
    "--num-train",
    "64",
    "--num-eval",
    "32",
    "--steps",
    "2",
    "--batch-size",
    "16",
    "--eval-batch-size",
    "32",
    "--max-length",
    "24",
    "--no-progress",
]


def test_compare_smoothing_report(tmp_path, capsys, monkeypatch):
    """--compare-smoothing 0,0.2 (docs/classification.md's command): both runs, then the combined table and
    reliability diagrams, one panel per run titled for the classes with the smoothed run's
    confidence ceiling 1 - a + a / K."""
    from ls_jax import calibration

    panels = []
    draw = calibration.reliability_diagrams
    monkeypatch.setattr(
        calibration, "reliability_diagrams", lambda grid, path: (panels.append(grid), draw(grid, path))[1]
    )
    out = tmp_path / "run"
    assert main([*TINY_FLAGS, "--compare-smoothing", "0,0.2", "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["0.00", "0.20"], table
    assert (out / "reliability.png").stat().st_size > 0
    combined = panels[-1]
    assert [(title, ceiling) for title, _, ceiling in combined[0]] == [
        ("SFT a=0, 3 classes", None),
        ("SFT a=0.2, 3 classes", pytest.approx(0.8 + 0.2 / 3)),
    ]


def test_declared_classes(tmp_path, capsys):
    """--classes fixes the classes and their order: a misspelled label is an error listing them
    (without it, it would become a fourth class); an index is a position in the list."""
    from ls_jax.train.setup import prepare

    data = tmp_path / "rows.jsonl"
    rows = [{"text": f"review {i}", "label": ["neg", "neu", "pos"][i % 3]} for i in range(30)]
    rows[7]["label"] = "posittive"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [
        "--task",
        "classification",
        "--data",
        str(data),
        "--batch-size",
        "4",
        "--no-progress",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert main([*flags, "--classes", "pos,neu,neg"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {data} (") and err.endswith(
        "line 8: label 'posittive' is not one of the classes (pos, neu, neg)"
    ), err
    assert prepare(TrainConfig(task="classification", data=str(data), batch_size=4)).classes == [
        "neg",
        "neu",
        "pos",
        "posittive",
    ]
    data.write_text("".join(json.dumps({**r, "label": i % 3}) + "\n" for i, r in enumerate(rows)))
    prep = prepare(TrainConfig(task="classification", data=str(data), batch_size=4, classes=["pos", "neu", "neg"]))
    assert prep.classes == ["pos", "neu", "neg"] and all(r["targets"].shape == (3,) for r in prep.train)
    for bad, message in (
        (["--classes", "a,b,a"], "--classes repeats a class"),
        (["--classes", "a"], "--classes needs at least 2 classes"),
    ):
        assert main([*flags, *bad]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert main(["--classes", "a,b", "--no-progress", "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "error: --classes is for --task classification"
