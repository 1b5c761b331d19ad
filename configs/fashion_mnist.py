"""Fashion-MNIST: the MNIST recipe (presets eps0.2, eps1, eps10)."""
from configs import mnist


def get_config(preset: str = "eps10"):
    return mnist.get_config(preset, dataset="fashion_mnist")
