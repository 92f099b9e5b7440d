"""README.md's Python examples run as written (the loss, a model and a training step), and their
results are what the text says they are."""

import os
import re

import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_python_examples_run():
    blocks = _blocks()
    assert len(blocks) == 2, "README.md should hold the loss example and the training-step example"
    loss_ns, step_ns = {}, {}
    exec(compile(blocks[0], "README.md (the loss)", "exec"), loss_ns)
    exec(compile(blocks[1], "README.md (a training step)", "exec"), step_ns)
    # the loss: a finite scalar, gradients shaped like hidden and weight, per-token losses [8]
    assert np.isfinite(float(loss_ns["loss"])) and loss_ns["loss"].shape == ()
    dh, dw = loss_ns["grads"]
    assert dh.shape == loss_ns["hidden"].shape and dw.shape == loss_ns["weight"].shape
    assert loss_ns["per_token"].shape == (8,)
    np.testing.assert_allclose(np.asarray(loss_ns["per_token"]), np.log(3.0), rtol=1e-6)  # uniform logits
    # the step: a finite loss over the 6 response tokens (4 + 2 after shifting), and it trains
    assert np.isfinite(float(step_ns["loss"])) and int(step_ns["metrics"]["tokens"]) == 6
    again, _ = step_ns["train_step"](step_ns["model"], step_ns["optimizer"], step_ns["batch"])
    assert float(again) < float(step_ns["loss"])
    assert jnp.asarray(step_ns["batch"]["labels"]).shape == (2, 6)
