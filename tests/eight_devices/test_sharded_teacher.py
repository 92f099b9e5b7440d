"""python -m ls_jax.distill's teacher sharded as training shards it: the top k on a
(data, fsdp, tensor) mesh of 8 devices equal the top k on one device (fp32 and bf16 teachers;
Auto and Explicit mesh axes), and a batch the batch axes do not divide is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from ls_jax.data import prepare
from ls_jax.distill import teacher_top_k
from ls_jax.models import from_config, tiny_llama_config
from ls_jax.tokenizer import train_bpe_tokenizer
from ls_jax.train import sharding, synthetic
from ls_jax.train.sharding import MeshError

ROWS = synthetic.generate(20, 0, seed=3)[0]
K, LENGTH = 5, 40


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_teacher_top_k_equals_one_device(dtype, axis_type):
    tok = train_bpe_tokenizer([r["prompt"] + r["response"] for r in ROWS])
    examples, _ = prepare(ROWS, tok, LENGTH)
    # an even vocabulary: tensor = 2 splits the head (vocabulary-parallel, as in training)
    model = from_config(
        tiny_llama_config(vocab_size=len(tok) + len(tok) % 2, hidden_size=32, num_hidden_layers=2), seed=1, dtype=dtype
    )
    one = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    mesh = jax.make_mesh((2, 2, 2), sharding.AXES, axis_types=(axis_type,) * 3)
    want = teacher_top_k(model, examples, K, pad_id=tok.pad_token_id, max_length=LENGTH, batch_size=8, mesh=one)
    got = teacher_top_k(model, examples, K, pad_id=tok.pad_token_id, max_length=LENGTH, batch_size=8, mesh=mesh)
    assert len(got) == len(want) == len(examples)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["positions"], w["positions"])
        np.testing.assert_allclose(g["top_p"], w["top_p"], atol=tol)
        np.testing.assert_allclose(g["rest"], w["rest"], atol=tol * K)
    got_ids, want_ids, want_p = (
        np.concatenate([t[key] for t in ts]) for ts, key in ((got, "top_ids"), (want, "top_ids"), (want, "top_p"))
    )
    same = got_ids == want_ids
    if dtype == jnp.float32:
        assert same.all()
    else:  # bf16: the order of two probabilities equal within its rounding may differ
        tied = np.abs(np.diff(want_p, axis=-1, prepend=2.0)) < tol
        assert (same | tied | np.roll(tied, -1, axis=-1)).all() and same.mean() > 0.95, same.mean()
    with pytest.raises(MeshError, match="--batch-size 6 is not divisible by data x fsdp = 4"):
        teacher_top_k(model, examples, K, pad_id=tok.pad_token_id, max_length=LENGTH, batch_size=6, mesh=mesh)
