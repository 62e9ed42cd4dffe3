"""Metrics: attribute fractions, Fairness Discrepancy and Fréchet distances of generated sets; per-image PSNR, SSIM
and L1; anomaly maps and their AUROC / AP against known damage."""
