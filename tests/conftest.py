"""Test setup: 8 simulated CPU devices and exact float32 matmuls, before any JAX backend starts."""
import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
