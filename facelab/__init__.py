"""facelab: face-diffusion experiment framework on one shared core."""
import warnings

from omegaconf import OmegaConf

__version__ = "0.1.0"

# conf/hydra/launcher/submitit_local.yaml replaces the submitit plugin's config of that name on purpose (its task and
# GPU counts follow the trainer); Hydra validates it against the plugin's schema and warns that this is deprecated.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_local' is validated against ConfigStore schema")


def _alias(key: str, default=None, *, _root_):
    """`${alias:mask_s,0.07}` in a method config: the top-level key of that name (the original flags), else default."""
    value = OmegaConf.select(_root_, key, default=None)
    return default if value is None else value


OmegaConf.register_new_resolver("alias", _alias, replace=True)


def __getattr__(name: str):
    """`facelab.run`, `facelab.Result` (facelab/api.py) and `facelab.keep_models` (models/pretrained.py), imported on
    first use."""
    if name in ("run", "Result"):
        from facelab import api

        return getattr(api, name)
    if name == "keep_models":
        from facelab.models.pretrained import keep_models

        return keep_models
    raise AttributeError(f"module 'facelab' has no attribute {name!r}")
