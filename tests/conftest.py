"""Shared test setup: 8 fake CPU devices so multi-device code is exercised on any machine."""
import os
import tempfile

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Tests build the same programs many times (each training run, each worker): a persistent
# compilation cache turns repeated XLA compiles into cache reads.
_CACHE = os.environ.get("DPDM_TEST_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "dpdm_jax_test_xla_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
