"""ls_jax: label-smoothed, memory-efficient cross-entropy for JAX/Flax."""
