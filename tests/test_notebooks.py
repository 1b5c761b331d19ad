"""The Colab notebooks: stored without outputs, opening with the install and runtime cells, and
executed headless at their tiny CI sizes (DPDM_NOTEBOOK_TINY=1) with nbclient."""
import os
import time

import jax
import pytest

nbformat = pytest.importorskip("nbformat")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart", "privacy_accounting", "your_own_data")


def _read(name):
    return nbformat.read(os.path.join(REPO, "notebooks", f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped_and_opens_with_install_and_runtime_cells(name):
    book = _read(name)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs must be stripped"
    assert "REPO_URL" in code[0].source and "pip" in code[0].source and "install" in code[0].source
    assert "jax.default_backend()" in code[1].source and all(b in code[1].source for b in ("cpu", "gpu", "tpu"))
    assert any("DPDM_NOTEBOOK_TINY" in c.source for c in code)


# privacy_accounting is arithmetic only (37 s on the loaded 2-core build machine): always run. The
# other two run several tiny dpdm_jax trainings each, mostly XLA compiles: slow (CI runs them after
# the default suite). Measured 2026-12-02 with load average ~11: quickstart 602 s, your_own_data 578 s.
@pytest.mark.parametrize("name", ["privacy_accounting", pytest.param("quickstart", marks=pytest.mark.slow),
                                  pytest.param("your_own_data", marks=pytest.mark.slow)])
def test_notebook_executes_at_ci_size(name, monkeypatch):
    from nbclient import NotebookClient

    if name == "quickstart":
        from dpdm_jax.data import DataError, load_dataset

        try:
            load_dataset("mnist", "train")
        except DataError:
            pytest.skip("MNIST is not cached")
    for key, value in {"DPDM_NOTEBOOK_TINY": "1", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "DPDM_DATA_NO_FETCH": "1",
                       "MPLBACKEND": "Agg", "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}.items():
        monkeypatch.setenv(key, value)
    # As a user runs it: from notebooks/ (the install cell moves to the checkout; runs/ is git-ignored).
    book = _read(name)
    tic = time.time()
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()
    print(f"{name}: {time.time() - tic:.0f} s")
