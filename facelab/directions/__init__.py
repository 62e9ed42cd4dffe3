"""Interpretable h-space directions: PCA, Jacobian singular vectors, supervised and conditional directions."""
