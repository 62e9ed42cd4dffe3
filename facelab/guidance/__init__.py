"""Guidance terms: small objects that plug into the sampling loop's hook points (see facelab.diffusion.loop)."""
