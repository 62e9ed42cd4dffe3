"""Metrics over generated sets: attribute fractions, Fairness Discrepancy, Fréchet distances in any features."""
