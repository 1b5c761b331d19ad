"""dpdm_jax: Differentially Private Diffusion Models in JAX/Flax."""
from setuptools import find_packages, setup

# Pinned: the resolver otherwise picks very new releases (see shared/design/environment.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "chex==0.1.92",
    "dp-accounting==0.6.0",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "orbax-checkpoint==0.12.8",
    "numpy==2.4.6",
    "scipy==1.17.1",
    "absl-py==2.5.1",
    "importlib_resources==7.1.0",  # tfds without TensorFlow
    "pillow==13.0.0",  # PNG grids; tfds without TensorFlow
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    "protobuf==7.36.2",
]

EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "hypothesis==6.170.17",
        "jax-privacy==2.0.0",  # independent reference for the clipped sum
        # The notebooks (notebooks/*.ipynb), executed headless by tests/test_notebooks.py.
        "nbclient==0.11.0",
        "nbformat==5.10.4",
        "ipykernel==7.1.0",
        "matplotlib==3.11.2",
    ],
    # Only for converting / checking the FID network; never at run time.
    "torch": ["torch==2.13.0"],
    # Side-by-side benchmarks against Opacus (benchmarks/per_example_grads.py).
    "benchmark": ["torch==2.13.0", "opacus==1.6.0"],
}

setup(
    name="dpdm_jax",
    version="0.1.0",
    description="Differentially Private Diffusion Models (DPDM) in JAX/Flax",
    packages=find_packages(include=["dpdm_jax", "dpdm_jax.*"]),
    package_data={"dpdm_jax.models": ["kernels/*.cc"]},  # conv_impl="onednn" builds it at first use
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
