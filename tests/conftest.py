"""Strict JAX for the whole test suite, as Equinox does."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
# Four CPU devices so sharded arrays can be saved and restored without an accelerator.
jax.config.update("jax_num_cpu_devices", 4)
