"""facelab: face-diffusion experiment framework on one shared core."""
import warnings

__version__ = "0.1.0"

# conf/hydra/launcher/submitit_local.yaml replaces the submitit plugin's config of that name on purpose (its task and
# GPU counts follow the trainer); Hydra validates it against the plugin's schema and warns that this is deprecated.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_local' is validated against ConfigStore schema")

from facelab import utils  # noqa: E402,F401  (registers the ${alias:...} resolver of the method configs)


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
