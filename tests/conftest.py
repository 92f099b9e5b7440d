"""Shared test set-up: float32 matmuls at full precision so oracles agree tightly on CPU."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
