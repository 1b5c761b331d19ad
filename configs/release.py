"""Sample from a release alone: --config=configs/release.py:RELEASE_DIR --mode=sample --workdir=OUT.

The sampling defaults (sampler, steps, guidance, labels) are the release's own (its model.json);
override any of them as usual, e.g. --config.sampling.num_samples=60000 --config.sampling.write_png=True.
The network, its weights and the guarantee come from the release; no checkpoint or data is read.
"""
import json
import os

from configs import default


def get_config(release_dir: str = ""):
    config = default.get_config()
    config.sampling.release = release_dir
    path = os.path.join(os.path.expanduser(release_dir), "model.json")
    if os.path.isfile(path):  # else --mode=sample reports the missing or broken release in one line
        try:
            with open(path) as f:
                defaults = json.load(f).get("sampling", {})
        except ValueError:
            defaults = {}
        for key, value in defaults.items():
            if key in config.sampling:
                try:
                    config.sampling[key] = value
                except TypeError:  # e.g. labels=3 where the default is 'balanced': keep the type
                    config.sampling[key] = str(value)
    return config
