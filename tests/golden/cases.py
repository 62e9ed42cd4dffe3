"""The output-equality guard: each method's demo command at tiny settings, recorded on the pre-refactor main.

`python tests/golden/record.py` rewrites the records (only for a deliberate, explained change of outputs);
tests/test_golden.py reruns every case and compares images, tensors and metrics with the records.
"""
CASES = {
    "generate_ddim": ["method=ddim", "num_samples=2", "sampler.steps=5", "guidance=[record]", "guidance.record.every=2"],
    "generate_ddpm": ["method=ddim", "sampler=ddpm", "sampler.steps=5", "num_samples=2"],
    "fuzzy_replace": ["method=fuzzy", "mode=replace", "mask_s=0.07", "num_samples=2", "sampler.steps=5"],
    "fuzzy_repaint": ["method=fuzzy", "sampler=repaint", "sampler.steps=8", "sampler.jump_length=2",
                      "sampler.jump_n_sample=2", "num_samples=1", "ood_lambda=0.1"],
    # fuzzy_zscore was re-recorded when the anomaly map's defaults changed (issue #21: x̂0 projection at depths 100-300,
    # A smoothed σ = 6 px, the zoo's statistics recomputed for them over N = 1000; experiments/fuzzy/anomaly.md)
    "fuzzy_zscore": ["method=fuzzy", "mode=zscore", "self_degrade=true", "num_samples=2", "sampler.steps=5"],
    "directions_pca": ["method=directions", "discover=pca", "num_samples=8", "batch_size=8", "method.edit_seeds=1",
                       "num_directions=2", "sampler.steps=4", "method.num_svectors=4"],
    "debias": ["method=debias", "target.Male=0.5", "num_samples=4", "batch_size=4", "method.real_faces.num=0",
               "sampler.steps=5"],
    # cyclediff's default start became the edit-friendly inversion (η = 1; issue #21: it flips more at equal
    # preservation, experiments/cyclediff/results.md): "cyclediff" keeps the former default (DDIM inversion, η = 0) and
    # its records, "cyclediff_edit_friendly" was recorded for the new one
    "cyclediff": ["method=cyclediff", "attribute=[Smiling]", "num_samples=1", "batch_size=1", "sampler.steps=5",
                  "method.start=ddim_inversion", "sampler.eta=0"],
    "cyclediff_edit_friendly": ["method=cyclediff", "attribute=[Smiling]", "num_samples=1", "batch_size=1",
                                "sampler.steps=5"],
    "codiff": ["method=codiff", "num_samples=2", "batch_size=2", "sampler.steps=4", "return_influence_function=true"],
    "ldm_text": ["method=ldm", "text=This woman is smiling.", "num_samples=1", "batch_size=1", "sampler.steps=4"],
    "hextract": ["method=hextract", "num_samples=4", "batch_size=4", "sampler.steps=5", "method.shard_size=4"],
}
# Metrics that measure time, not results.
TIMING = ("second", "time", "per_s", "fps")


def outputs(run_dir):
    """Every image (uint8 array) and stored tensor of a run folder, by relative path."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    found = {}
    for path in sorted(run_dir.rglob("*")):
        rel = str(path.relative_to(run_dir))
        if path.suffix == ".png":
            found[rel] = np.asarray(Image.open(path))
        elif path.suffix == ".safetensors":
            for key, value in load_file(path).items():
                found[f"{rel}:{key}"] = value.float().numpy()
    return found


def results(metrics, prefix=""):
    """The metrics that are results (not timings), flattened to {dotted key: value}."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if any(word in str(key) for word in TIMING):
            continue
        if isinstance(value, dict):
            flat.update(results(value, f"{name}."))
        else:
            flat[name] = value
    return flat
