"""Sampling overhead of facelab's diffusion loop, side by side with bare UNet forwards and diffusers.

    .venv/bin/python experiments/bench/sampling_overhead.py [--model ddpm64] [--batch 8] [--steps 50]
        [--repeats 5] [--device auto] [--out experiments/bench/results.json] [--profile auto]

Timed, on one batch x_T and one UNet, interleaved round by round (the order rotates every round):
  bare      `steps` forwards `unet(x, t).sample` in a plain loop (precomputed [B] timestep tensors);
  facelab   `facelab.diffusion.sample(denoiser, schedule, x_T, schedule.timesteps(steps, "leading"))` (DDIM, η = 0);
  diffusers `DDIMPipeline(unet, DDIMScheduler.from_config(...))(batch, generator, eta=0,
            num_inference_steps=steps, output_type="pt")`: this also draws x_T from the generator, calls
            set_timesteps and maps the result to [0, 1]; those extras are timed apart and reported.
Figure 1 = facelab / bare, figure 2 = facelab / diffusers; each is the median of the per-round ratios
(the ratio of the medians is recorded too). A zero-cost stub UNet then isolates each loop's own per-step
cost (noise-free evidence for figure 1), and the script checks that facelab and diffusers give the same
images from the same x_T. See README.md next to this file.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "experiments" / "bench" / "results.json"
MODEL_CONFIG = ROOT / "conf" / "model" / "ddpm.yaml"
SEED = 0
OVERHEAD_LIMIT = 0.05  # figure 1 above 1 + this (or figure 2 above 1) triggers --profile auto

# DDIMScheduler settings that reproduce facelab's DDIM defaults (see README "Conventions"):
#   set_alpha_to_one=True  facelab's last step goes to t = -1, i.e. ᾱ = 1 (not ᾱ_0);
#   clip_sample=False      `sample(..., clip=False)` is facelab's default, whatever the config's clip_sample;
#   timestep_spacing / steps_offset: the grid of `schedule.timesteps(steps, "leading")`;
#   thresholding / rescale_betas_zero_snr: off (facelab has neither).
DDIM_OVERRIDES = {"set_alpha_to_one": True, "clip_sample": False, "timestep_spacing": "leading",
                  "thresholding": False, "rescale_betas_zero_snr": False}


# --- model ------------------------------------------------------------------------------------------
def build_denoiser(model: str | None, device: torch.device, resolution: int = 64):
    """(Denoiser, description). `model`: a zoo name or folder (facelab's load_denoiser), "config" (the
    `unet:`/`scheduler:` blocks of conf/model/ddpm.yaml with random weights), or None: ddpm64 if built."""
    from facelab.diffusion import Denoiser, Schedule
    from facelab.models.pretrained import load_denoiser, zoo_names

    if model is None:
        model = "ddpm64" if "ddpm64" in zoo_names() else "config"
    if model != "config" and not model.endswith((".yaml", ".yml")):
        return load_denoiser(model, device), model
    from diffusers import UNet2DModel
    from omegaconf import OmegaConf

    path = MODEL_CONFIG if model == "config" else Path(model)
    cfg = OmegaConf.load(path)
    unet_cfg = OmegaConf.to_container(cfg.unet, resolve=False)
    if not isinstance(unet_cfg.get("sample_size"), int):  # `${data.dataset.size}` outside a Hydra run
        unet_cfg["sample_size"] = resolution
    torch.manual_seed(SEED)  # timing does not depend on the weights, but keep runs reproducible
    unet = UNet2DModel(**unet_cfg).to(device).eval().requires_grad_(False)
    schedule = Schedule(OmegaConf.to_container(cfg.scheduler, resolve=True))
    return Denoiser(unet, schedule), f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} (random weights)"


def ddim_pipeline(unet: nn.Module, schedule):
    """diffusers' DDIMPipeline on the same UNet, its DDIMScheduler from the same scheduler config."""
    from diffusers import DDIMPipeline, DDIMScheduler

    config = {k: v for k, v in schedule.to_config().items() if k not in ("_class_name", "variance_type")}
    config.update(DDIM_OVERRIDES, steps_offset=schedule.config["steps_offset"])
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StubUNet(nn.Module):
    """A zero-cost UNet: returns a fixed ε tensor, so a run times only the loop around the network."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = eps
        self.anchor = nn.Parameter(torch.zeros((), device=eps.device), requires_grad=False)  # dtype/device probe

    def forward(self, sample, timestep, return_dict: bool = True, **_):
        return SimpleNamespace(sample=self.eps) if return_dict else (self.eps,)


def diffusers_loop(unet, scheduler, x: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIMPipeline.__call__'s denoising loop verbatim, minus the x_T draw and the [0, 1] output map."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


def to_image(x: torch.Tensor) -> torch.Tensor:
    """The pipeline's output map [-1, 1] → [0, 1]."""
    return (x / 2 + 0.5).clamp(0, 1)


# --- timing -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def interleaved(methods: dict, rounds: int, device: torch.device, grad_mode, budget_s: float = 0.0,
                min_rounds: int = 3, log=lambda *a: None):
    """Run each method once per round, rotating the order each round.

    Returns (wall times, process CPU times, last outputs). With budget_s > 0, stop early (after at least
    `min_rounds`) when another round would end past it.
    """
    names = list(methods)
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    outputs = {}
    start = time.perf_counter()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            cpu_start = time.process_time()
            with grad_mode():
                seconds, outputs[name] = timed(methods[name], device)
            cpu_times[name].append(time.process_time() - cpu_start)
            times[name].append(seconds)
        elapsed = time.perf_counter() - start
        log(f"  round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names))
        if budget_s and r + 1 >= min_rounds and r + 1 < rounds and elapsed * (r + 2) / (r + 1) > budget_s:
            log(f"  stopping after {r + 1} rounds: the next would end past --budget-s {budget_s:.0f}")
            break
    return times, cpu_times, outputs


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def profile_facelab(run, unet: nn.Module, device: torch.device, grad_mode, out_path: Path, top: int = 20):
    """cProfile over one facelab DDIM run, with the time spent inside the UNet clocked by hooks (synced).

    Writes facelab's own functions and the overall top functions to `out_path`; returns
    (total seconds, seconds inside the UNet, report text)."""
    inside, clock = [0.0], [0.0]

    def pre(module, args):
        _sync(device)
        clock[0] = time.perf_counter()

    def post(module, args, output):
        _sync(device)
        inside[0] += time.perf_counter() - clock[0]

    handles = [unet.register_forward_pre_hook(pre), unet.register_forward_hook(post)]
    profiler = cProfile.Profile()
    try:
        with grad_mode():
            total = timed(lambda: (profiler.enable(), run(), profiler.disable()), device)[0]
    finally:
        for handle in handles:
            handle.remove()
    buffer = io.StringIO()
    buffer.write(f"one facelab run: {total:.3f} s, {inside[0]:.3f} s inside the UNet, "
                 f"{total - inside[0]:.4f} s outside it (incl. profiler and hook overhead)\n\n")
    stats = pstats.Stats(profiler, stream=buffer)
    buffer.write("== facelab's own functions, by cumulative time ==\n")
    stats.sort_stats("cumulative").print_stats(r"facelab[/\\]", top)
    buffer.write("\n== everything, by own time ==\n")
    stats.sort_stats("tottime").print_stats(top)
    text = buffer.getvalue()
    out_path.write_text(text)
    return total, inside[0], text


# --- main -------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="zoo name or diffusers folder, or 'config' (conf/model/ddpm.yaml, random weights); "
                        "default ddpm64 if built, else config")
    p.add_argument("--resolution", type=int, default=64, help="sample_size for --model config (default 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every method once)")
    p.add_argument("--stub-repeats", type=int, default=30, help="rounds of the stub-UNet loop timing")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="stop the timed rounds early (after at least 3) when another round would end past "
                        "this many seconds; 0: always run --repeats rounds")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (default 1: a shared 2-core machine thrashes with 2; "
                        "0 keeps torch's default)")
    p.add_argument("--grad-mode", choices=("no_grad", "inference_mode"), default="no_grad",
                   help="context around every timed call (facelab and diffusers use no_grad inside)")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="cProfile one facelab run into profile.txt beside --out; auto: only when figure 1 "
                        f"exceeds {1 + OVERHEAD_LIMIT:g} or facelab is slower than diffusers (figure 2 > 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results json; a results.md is written beside it")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import diffusers

    from facelab.diffusion import Denoiser, sample

    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    grad_mode = torch.inference_mode if args.grad_mode == "inference_mode" else torch.no_grad
    denoiser, source = build_denoiser(args.model, device, args.resolution)
    unet, schedule = denoiser.unet, denoiser.schedule
    channels, size = unet.config.in_channels, unet.config.sample_size
    shape = (args.batch, channels, *((size, size) if isinstance(size, int) else size))
    pipe = ddim_pipeline(unet, schedule)
    grid = schedule.timesteps(args.steps, spacing="leading")
    generator = lambda: torch.Generator("cpu").manual_seed(SEED)  # noqa: E731  (the pipeline's x_T draw)
    x_T = torch.randn(shape, generator=generator(), dtype=unet.dtype).to(device)  # = the pipeline's randn_tensor
    bare_t = [torch.full((args.batch,), int(t), dtype=torch.long, device=device) for t in grid]
    log(f"model {source} | {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params | x {tuple(shape)} | "
        f"{device} | {args.steps} steps, {args.repeats} rounds")

    def bare(ts=bare_t):
        out = None
        for t in ts:
            out = unet(x_T, t).sample
        return out

    def facelab(model=denoiser, x=x_T, timesteps=grid):
        return sample(model, schedule, x, timesteps, progress=False)

    def diffusers_pipe(steps=args.steps):
        return pipe(batch_size=args.batch, generator=generator(), eta=0.0, num_inference_steps=steps,
                    output_type="pt", return_dict=False)[0]

    methods = {"bare": bare, "facelab": facelab, "diffusers": diffusers_pipe}

    # Warm-up: one short run of each (allocator, kernels, lazy init); every code path of a full run.
    short = schedule.timesteps(min(2, args.steps), spacing="leading")
    with grad_mode():
        bare(bare_t[:2]), facelab(timesteps=short), diffusers_pipe(min(2, args.steps))
    _sync(device)

    times, cpu_times, outputs = interleaved(methods, args.repeats, device, grad_mode, args.budget_s, log=log)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name in methods:
        log(f"  {name:9s} median {medians[name]:.3f} s  ({', '.join(f'{s:.3f}' for s in times[name])})")

    # What the pipeline does besides its loop: x_T draw (+ move), set_timesteps, the [0, 1] map.
    def extras():
        x = torch.randn(shape, generator=generator(), dtype=unet.dtype).to(device)
        pipe.scheduler.set_timesteps(args.steps)
        return to_image(x)

    extra_s = statistics.median(timed(extras, device)[0] for _ in range(20))

    # Zero-cost UNet: the loops' own per-step cost, free of the network's timing noise.
    stub = StubUNet(torch.randn(shape, generator=torch.Generator("cpu").manual_seed(SEED + 1)).to(device) * 0.1)
    stub_denoiser = Denoiser(stub, schedule)
    stub_scheduler = ddim_pipeline(stub, schedule).scheduler
    stub_methods = {"facelab": lambda: facelab(model=stub_denoiser),
                    "diffusers": lambda: diffusers_loop(stub, stub_scheduler, x_T, args.steps)}
    with grad_mode():
        [fn() for fn in stub_methods.values()]
    stub_times, _, _ = interleaved(stub_methods, args.stub_repeats, device, grad_mode)
    per_step_us = {name: statistics.median(ts) / args.steps * 1e6 for name, ts in stub_times.items()}

    # Correctness: same x_T, same UNet. Images: the timed runs' outputs (facelab mapped to [0, 1] as the
    # pipeline does). Raw x_0 (before the map's clamp): facelab vs the pipeline's loop on the first sample.
    image_diff = (to_image(outputs["facelab"]) - outputs["diffusers"]).abs().max().item()
    k = 1
    with grad_mode():
        raw_facelab = facelab(x=x_T[:k])
        raw_diffusers = diffusers_loop(unet, pipe.scheduler, x_T[:k], args.steps)
    raw_diff = (raw_facelab - raw_diffusers).abs().max().item()
    raw_scale = raw_diffusers.abs().max().item()

    fig1 = median_ratio(times["facelab"], times["bare"])
    fig2 = median_ratio(times["facelab"], times["diffusers"])
    profile = None
    if args.profile == "always" or (args.profile == "auto" and (fig1 > 1 + OVERHEAD_LIMIT or fig2 > 1)):
        profile_path = args.out.with_name("profile.txt")
        total, inside, _ = profile_facelab(facelab, unet, device, grad_mode, profile_path)
        profile = {"file": str(profile_path), "total_s": total, "inside_unet_s": inside,
                   "outside_unet_s": total - inside}
        log(f"cProfile of one facelab run → {profile_path}: {total - inside:.4f} s of {total:.3f} s outside the UNet")

    results = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU {platform.machine()} ({platform.processor() or 'unknown'})",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "model": source,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "batch": args.batch,
        "channels": channels,
        "resolution": size,
        "steps": args.steps,
        "timesteps": [int(t) for t in grid] + [-1],
        "repeats": args.repeats,
        "rounds": len(times["bare"]),
        "grad_mode": args.grad_mode,
        "times_s": times,
        "median_s": medians,
        "figure1_overhead": {  # facelab DDIM / bare forwards
            "median_of_ratios": fig1,
            "ratio_of_medians": medians["facelab"] / medians["bare"],
        },
        "figure2_facelab_over_diffusers": {
            "median_of_ratios": fig2,
            "ratio_of_medians": medians["facelab"] / medians["diffusers"],
        },
        # Process CPU time of the same runs: leaves out the time the process waited for a core (a cross-check
        # of the wall-time figures on a shared CPU; meaningless on GPU, so not recorded there).
        "cpu_times_s": cpu_times if device.type == "cpu" else None,
        "cpu_median_s": {n: statistics.median(ts) for n, ts in cpu_times.items()} if device.type == "cpu" else None,
        "cpu_time_ratios": {
            "facelab_over_bare": median_ratio(cpu_times["facelab"], cpu_times["bare"]),
            "facelab_over_diffusers": median_ratio(cpu_times["facelab"], cpu_times["diffusers"]),
        } if device.type == "cpu" else None,
        "diffusers_pipeline_extras_s": extra_s,
        "stub_loop_us_per_step": per_step_us,
        "stub_loop_fraction_of_bare": {name: us * args.steps * 1e-6 / medians["bare"]
                                       for name, us in per_step_us.items()},
        "correctness": {
            "image_max_abs_diff": image_diff,
            "raw_x0_max_abs_diff": raw_diff,
            "raw_x0_max_abs": raw_scale,
            "raw_samples": k,
        },
        "ddim_scheduler_overrides": {**DDIM_OVERRIDES, "steps_offset": schedule.config["steps_offset"]},
        "wall_s": None,
    }
    if profile is not None:
        results["profile"] = profile
    results["wall_s"] = time.perf_counter() - wall_start
    return results


def markdown(r: dict) -> str:
    f1, f2 = r["figure1_overhead"], r["figure2_facelab_over_diffusers"]
    m, c, us = r["median_s"], r["correctness"], r["stub_loop_us_per_step"]
    shape = f"{r['batch']}×{r['channels']}×{r['resolution']}²"
    lines = [
        f"# Sampling overhead: DDIM-{r['steps']}",
        "",
        f"{r['model']}, {r['parameters'] / 1e6:.2f}M params, batch {shape}; device {r['device']} "
        f"({r['device_name']}, {r['torch_threads']} torch threads); torch {r['torch']}, diffusers {r['diffusers']}; "
        f"{r['rounds']} interleaved rounds (of --repeats {r['repeats']}), {r['grad_mode']}; run took {r['wall_s']:.0f} s.",
        "",
        "| | median wall time (s) | facelab / this (median of per-round ratios) | ratio of medians |",
        "|---|---:|---:|---:|",
        f"| {r['steps']} bare UNet forwards | {m['bare']:.3f} | **{f1['median_of_ratios']:.4f}** (figure 1) "
        f"| {f1['ratio_of_medians']:.4f} |",
        f"| facelab `sample` DDIM-{r['steps']} | {m['facelab']:.3f} | 1 | 1 |",
        f"| diffusers `DDIMPipeline` ({r['steps']} steps, output_type=pt) | {m['diffusers']:.3f} "
        f"| **{f2['median_of_ratios']:.4f}** (figure 2) | {f2['ratio_of_medians']:.4f} |",
        "",
        *([f"Same runs in process CPU time (time spent waiting for a core left out): "
           f"bare {r['cpu_median_s']['bare']:.3f} s, facelab {r['cpu_median_s']['facelab']:.3f} s, diffusers "
           f"{r['cpu_median_s']['diffusers']:.3f} s; facelab / bare **{r['cpu_time_ratios']['facelab_over_bare']:.4f}**, "
           f"facelab / diffusers **{r['cpu_time_ratios']['facelab_over_diffusers']:.4f}** (medians of per-round ratios).",
           ""] if r.get("cpu_time_ratios") else []),
        "| loop cost with a zero-cost stub UNet | µs / step | share of the bare-forward time |",
        "|---|---:|---:|",
        f"| facelab `sample` | {us['facelab']:.0f} | {100 * r['stub_loop_fraction_of_bare']['facelab']:.3f} % |",
        f"| diffusers DDIMScheduler loop | {us['diffusers']:.0f} "
        f"| {100 * r['stub_loop_fraction_of_bare']['diffusers']:.3f} % |",
        "",
        f"Pipeline extras inside the diffusers time (x_T draw, set_timesteps, [0, 1] map): "
        f"{r['diffusers_pipeline_extras_s'] * 1e3:.2f} ms.",
        *([f"cProfile of one facelab run ({r['profile']['file']}): {r['profile']['outside_unet_s'] * 1e3:.1f} ms "
           f"of {r['profile']['total_s']:.3f} s outside the UNet.", ""] if "profile" in r else []),
        f"Correctness (same x_T, same UNet): max |facelab − diffusers| = {c['image_max_abs_diff']:.2e} on the "
        f"[0, 1] images; {c['raw_x0_max_abs_diff']:.2e} on raw x_0 (max |x_0| {c['raw_x0_max_abs']:.2f}, "
        f"{c['raw_samples']} samples). DDIMScheduler overrides: "
        + ", ".join(f"{k}={v}" for k, v in r["ddim_scheduler_overrides"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    if not args.quiet:
        print(table)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
