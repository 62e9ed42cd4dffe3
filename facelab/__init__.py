"""facelab: face-diffusion experiment framework on one shared core."""
__version__ = "0.1.0"
