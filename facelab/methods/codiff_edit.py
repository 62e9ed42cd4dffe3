"""`method=codiff_edit`: Collaborative Diffusion editing of real faces (codiff.md §2 "Editing", Imagic-style).

    python -m facelab.sample method=codiff_edit gt_path=DIR mask=EDITED_MASK text="This woman is smiling."
    python -m facelab.sample method=codiff_edit 'method.edit=[Smiling,Eyeglasses]'    # held-out synthetic faces
    python -m facelab.sample method=codiff_edit mode=imagic [method.stage2=lora]      # the original's stages 1-3

mode=invert (the default, training-free; experiments/codiff_edit/results.md): the face is DDIM-inverted (η = 0) by the
collaborative model under its own conditions (synthetic: label map and caption; else the stage-1 embedding) and
resampled from that x_T under e = α·e_tgt + (1 − α)·e_src; blend=region (auto under invert) then keeps the input's
pixels outside the edit's region (edit_mask: the label difference and / or where the edit differs from α = 0, or
DiffEdit's ε difference) and pastes the edit in with a feathered edge (facelab.diffusion.blend). mode=imagic, per
modality with a target (mask / text): stage 1 fits e_opt from e_tgt, stage 2 fine-tunes the UNet (full, or a LoRA
adapter) on the face (facelab.diffusion.tuning; cached once per face, base model, settings and seed in method.cache,
facelab.io.tuned), stage 3 samples the collaboration with the tuned UNets under α·e_tgt + (1 − α)·e_opt for every α of
alpha_list, from one start code and per-step noise per face (x_T file, else the `codiff_edit.start` / `.noise` streams
keyed by the face's content). Targets: mask= / text= (real faces), or method.edit: the synthetic counterfactual renders
(facelab.sources.synthetic_edit). alpha=auto picks the smallest α the guidance classifier (never the evaluator) reads
as the target (else the highest least P; nothing to check: nearest 1). Writes inputs/, edits/<face>/<edit>_alpha=<α>
.png, edits/<face>_<edit>.png (the chosen α), regions/ (blend=region), counterfactuals/, embeddings/, α strips,
grid.png and per edit the held-out scores (facelab.evaluators.target_edit_scores), time and network calls.
"""
from __future__ import annotations

import dataclasses
import logging
import resource
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import Tensor

from facelab.diffusion import DDIM, blend, ddim_invert, tuning
from facelab.diffusion.collab import CollaborativeDenoiser, Reweight
from facelab.evaluators import (
    AttributeEvaluator,
    ParsingEvaluator,
    SimilarityEvaluator,
    changed_by_caption,
    choose_alpha,
    target_edit_scores,
    wanted_probabilities,
)
from facelab.io.errors import InputError
from facelab.io.images import read_mask, resize_mask
from facelab.io.tensors import read_latents
from facelab.io.tuned import TunedCache, face_hash
from facelab.models.classifier import load_classifier
from facelab.models.codiff import ldm_timesteps, load_collaborative
from facelab.models.latent import LatentModel
from facelab.runner import Runner, write_atomic
from facelab.sources import EDITS, ImageFolderSource, SyntheticSource, build, own_conditions, plan_target_edits
from facelab.utils import typed_options

log = logging.getLogger("facelab")
MODES, ALPHA_RANGE = ("imagic", "invert"), (-1.0, 3.0)  # the original's α lists span −1 … 2.5
BLENDS, AUTO_REGIONS = ("auto", "none", "region"), ("noise", "decoded", None)
REGION = {"labels": True, "auto": "decoded", "dilate": 2, "feather": 2, "threshold": 0.5, "draws": 4, "t": 500}


@dataclass(frozen=True)
class Options:
    """cfg.method (conf/method/codiff_edit.yaml)."""

    name: str
    mode: str
    stage2: str
    edit: object
    mask: str | None
    text: str | None
    gt_path: str | None
    modalities: list | None
    faces: dict
    stage1_lr: float
    stage1_num_iter: int
    stage2_lr: float
    stage2_num_iter: int
    lora: dict
    alpha_list: object
    alpha: object
    x_T: str | None
    cache: str | None
    classifier: str | None
    eval_classifier: str | None
    parser: str | None
    blend: str = "auto"
    region: dict = field(default_factory=dict)
    collab: dict = field(default_factory=dict)

    def alphas(self) -> list[float]:
        """alpha_list as floats (a list, or one comma-separated string), each within ALPHA_RANGE."""
        given = self.alpha_list
        items = given.split(",") if isinstance(given, str) else given if isinstance(given, list) else [given]
        try:
            alphas = [float(a) for a in items]
        except (TypeError, ValueError):
            raise InputError(f"method.alpha_list={given}: give numbers, e.g. [0,0.5,1,1.5]") from None
        for a in alphas + ([] if self.alpha == "auto" else [self.alpha]):
            if not isinstance(a, (int, float)) or not ALPHA_RANGE[0] <= a <= ALPHA_RANGE[1]:
                raise InputError(f"method.alpha_list / method.alpha: α={a} is outside [{ALPHA_RANGE[0]:g}, "
                                 f"{ALPHA_RANGE[1]:g}] (α·e_tgt + (1 − α)·e_opt; the original uses 0 … 2.5)")
        if not alphas:
            raise InputError("method.alpha_list is empty: give at least one α")
        if self.alpha != "auto" and float(self.alpha) not in alphas:
            alphas.append(float(self.alpha))
        return sorted(set(alphas))

    def stage2_fit(self) -> tuple[float, int]:
        """(Adam LR, iterations) of stage 2."""
        if self.stage2 == "lora":
            return self.lora["lr"], int(self.lora.get("num_iter") or self.stage2_num_iter)
        return self.stage2_lr, self.stage2_num_iter

    def settings(self) -> dict:
        """What a fine-tuned UNet depends on besides the face, the base model and the seed (the cache fingerprint)."""
        stage1 = {"stage1_lr": self.stage1_lr, "stage1_num_iter": self.stage1_num_iter}
        if self.mode == "invert":
            return {**stage1, "stage2": "none"}
        lr, steps = self.stage2_fit()
        tuned = {"stage2_lr": lr, "stage2_num_iter": steps} if self.stage2 == "full" else \
            {"lora_rank": self.lora["rank"], "lora_lr": lr, "lora_num_iter": steps, "lora_init": "seeded"}
        return {**stage1, "stage2": self.stage2, **tuned}

    def check(self, cfg: DictConfig) -> list[float]:
        """Every knob checked before any model loads; returns the α list."""
        for key, allowed in (("mode", MODES), ("stage2", tuning.STAGE2), ("blend", BLENDS)):
            if getattr(self, key) not in allowed:
                raise InputError(f"method.{key}={getattr(self, key)}: use one of {', '.join(allowed)}")
        if self.blending() == "region":
            self.check_region()
        numbers = {"stage1_num_iter": (self.stage1_num_iter, int, 0), "stage2_num_iter": (self.stage2_num_iter, int, 0),
                   "stage1_lr": (self.stage1_lr, float, 0), "stage2_lr": (self.stage2_lr, float, 0),
                   "lora.lr": (self.lora["lr"], float, 0), "lora.rank": (self.lora["rank"], int, 1)}
        for key, (value, kind, low) in numbers.items():
            if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InputError(f"method.{key}={value!r}: give a whole number ≥ {low}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise InputError(f"method.{key}={value!r}: the learning rate must be a number > 0")
        if self.alpha != "auto" and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))):
            raise InputError(f"method.alpha={self.alpha!r}: auto or a number")
        if self.text is not None and not str(self.text).strip():
            raise InputError(f'text={self.text!r}: the caption is empty; give a sentence, e.g. text="This man is '
                             'smiling."')
        if self.edit is not None and (self.mask is not None or self.text is not None):
            raise InputError("method.edit re-renders synthetic faces for its targets: give either method.edit or "
                             "mask= / text=, not both")
        if self.x_T is not None and self.mode == "invert":
            raise InputError("x_T: mode=invert starts from the face's inversion, not from a start code; use "
                             "mode=imagic")
        if cfg.get("guidance"):
            raise InputError(f"guidance=[{', '.join(cfg.guidance)}]: method=codiff_edit takes no guidance terms")
        return self.alphas()

    def blending(self) -> str:
        """blend=auto: region for mode=invert (experiments/codiff_edit/results.md), none for the original (imagic)."""
        return self.blend if self.blend != "auto" else "region" if self.mode == "invert" else "none"

    def check_region(self) -> None:
        region = {**REGION, **self.region}
        if region["auto"] not in AUTO_REGIONS:
            raise InputError(f"method.region.auto={region['auto']}: use one of noise, decoded, null")
        for key, low in (("dilate", 0), ("feather", 0), ("draws", 1), ("t", 0)):
            if isinstance(region[key], bool) or not isinstance(region[key], int) or region[key] < low:
                raise InputError(f"method.region.{key}={region[key]!r}: give a whole number ≥ {low}")
        if not isinstance(region["threshold"], (int, float)) or not 0 <= region["threshold"] < 1:
            raise InputError(f"method.region.threshold={region['threshold']!r}: a fraction of the map's maximum in "
                             "[0, 1)")
        if region["auto"] == "decoded" and 0.0 not in self.alphas():
            raise InputError("method.region.auto=decoded compares each edit with the α = 0 one: put 0 in "
                             "method.alpha_list")

    def edit_names(self) -> list[str]:
        names = [self.edit] if isinstance(self.edit, str) else list(self.edit or [])
        for name in names:
            if name not in EDITS:
                raise InputError(f"method.edit={name}: not an attribute of the synthetic faces nor hair_shape (one "
                                 f"of {', '.join(EDITS)})")
        return names


def face_models(opts: Options, runner: Runner, cache: TunedCache, by_name: dict, used: list[str], face: str,
                digest: str, z0: Tensor, init: dict, own: dict, cached: dict, counters: list, log_: dict) \
        -> tuple[dict, dict]:
    """Per modality the model that samples this face (tuned: from the cache or stages 1-2 now) and the embedding α
    moves away from ((tokens, attention): e_opt; invert: e_src). Counts into log_ (made, worked, from_cache)."""
    models, e_from = {}, {}
    generator = runner.keyed_generator("codiff_edit.train", int(digest[:12], 16))
    for m in used:
        model, unet = by_name[m], by_name[m].unet
        if m in own:
            e_from[m] = tuning.encode_condition(model, own[m])
        elif cached[m]:
            e_opt, attention, weights = cache.load(face, m, runner.device)
            e_from[m], unet = (e_opt, attention), tuning.load_tuned(model, weights, opts.stage2, opts.lora["rank"])
            counters.append(runner.count_calls(unet))
            log_["from_cache"] += 1
        else:
            log_["worked"] = True
            e_init, attention = tuning.encode_condition(model, init[m])
            e_opt = tuning.optimise_embedding(model, z0, e_init, attention, opts.stage1_lr, opts.stage1_num_iter,
                                              generator)
            e_from[m] = (e_opt, attention)
            if opts.mode == "imagic":
                unet = tuning.tunable_copy(model, opts.stage2, opts.lora["rank"], generator)
                counters.append(runner.count_calls(unet))  # stage 2's forwards count too
                tuning.fine_tune(unet, model.schedule, z0, e_opt, attention, *opts.stage2_fit(), generator)
                weights = tuning.tuned_weights(unet, opts.stage2)
                log_["made"].append(str(cache.save(face, digest, m, weights, e_opt, e_init, attention, init[m])))
        if unet is not model.unet:
            model = LatentModel(model.vae, unet, model.schedule, model.encoder, source=f"{model.source} (tuned)")
        models[m] = model
    return models, e_from


def run(cfg: DictConfig, runner: Runner) -> dict:
    opts = typed_options(Options, cfg.method)
    alphas, names = opts.check(cfg), opts.edit_names()
    sampler = runner.sampler()
    if not isinstance(sampler, DDIM):
        raise InputError(f"sampler={sampler.name}: method=codiff_edit samples with sampler=ddim (η = sampler.eta; "
                         "mode=invert uses η = 0)")
    # a composed +source, else gt_path=DIR (exactly the models' size), else the held-out synthetic faces
    source = build(cfg.source) if cfg.get("source") is not None else ImageFolderSource(opts.gt_path, resize="exact") \
        if opts.gt_path is not None else SyntheticSource(cfg.num_samples, opts.faces["seed"], opts.faces["start"])
    source.check()
    if names and not isinstance(source, SyntheticSource):
        raise InputError("method.edit re-renders synthetic faces: with gt_path / +source give mask= and / or text=")
    if not names and opts.mask is None and opts.text is None:
        if not isinstance(source, SyntheticSource):
            raise InputError("method=codiff_edit: give the edit's target, mask=EDITED_MASK and / or text=\"...\"")
        names = ["Smiling"]
    target_mask = read_mask(opts.mask) if opts.mask is not None else None

    collab = load_collaborative(cfg.model.pretrained, runner.device,
                                Reweight.from_options(opts.collab) if opts.collab else None)
    by_name = dict(zip(collab.names, collab.models))
    modalities = list(opts.modalities or collab.names)
    unknown = [m for m in modalities if m not in by_name]
    if unknown:
        raise InputError(f"method.modalities: {unknown[0]} is not a modality of {cfg.model.pretrained} "
                         f"({', '.join(collab.names)})")
    size = collab.models[0].vae.config.sample_size
    inputs = source.load(size)  # a face of another size: one line naming the file
    if inputs.images is None:
        raise InputError("source: method=codiff_edit edits images and this source gives none")
    classifier = None if opts.classifier is None else load_classifier(opts.classifier, runner.device)
    evaluator = AttributeEvaluator(opts.eval_classifier, cfg.batch_size, {"num": 0}, device=runner.device)
    parser = ParsingEvaluator(opts.parser, cfg.batch_size, key="method.parser", device=runner.device)
    for score in (evaluator, parser):
        score.check(size, [classifier] if classifier is not None else [])
    edits, used, warnings = plan_target_edits(inputs, names, target_mask, None if opts.text is None else str(opts.text),
                                              modalities, lambda m, value: by_name[m].check_condition(value))
    for warning in warnings:
        log.warning(warning)
    cache = TunedCache(opts.cache, {**opts.settings(), "seed": runner.seed},  # the seed keys the training draws
                       {m: by_name[m].fingerprint() for m in used})
    digests = [face_hash(image) for image in inputs.images]  # the face's streams depend on its content only
    cached = {i: {m: opts.mode == "imagic" and cache.check(inputs.names[i], digests[i], m) for m in used}
              for i in range(len(inputs)) if edits[i]}  # a foreign cache file is refused before anything is written

    diffusers = None if len(used) < 2 or collab.diffusers is None else \
        [collab.diffusers[collab.names.index(m)] for m in used]
    reweight = collab.reweight if diffusers is not None else Reweight("average")
    counters = [runner.count_calls(by_name[m].unet) for m in used] + [runner.count_calls(d) for d in diffusers or []]
    schedule, shape = collab.models[0].schedule, collab.models[0].latent_shape
    if opts.blending() == "region" and not 0 <= opts.region.get("t", REGION["t"]) < schedule.num_train_timesteps:
        raise InputError(f"method.region.t={opts.region['t']}: a timestep in [0, {schedule.num_train_timesteps - 1}]")
    grid = ldm_timesteps(schedule, sampler.steps)
    step = dataclasses.replace(sampler, eta=0.0) if opts.mode == "invert" else sampler
    starts = read_latents(opts.x_T, len(inputs), shape) if opts.x_T is not None else None
    weights = torch.tensor(alphas, device=runner.device)

    def calls() -> int:
        return sum(c.count for c in counters)

    def choose(wanted: dict) -> tuple[int, str]:
        return choose_alpha(alphas, wanted) if opts.alpha == "auto" else \
            (alphas.index(float(opts.alpha)), "method.alpha")

    results, strips, log_ = {}, [], {"seconds": 0.0, "calls": 0, "faces": 0, "from_cache": 0, "made": []}
    for i, _ in runner.batches(len(inputs), 1, desc="faces"):
        if not edits[i]:
            continue
        name, image, key = inputs.names[i], inputs.images[i], int(digests[i][:12], 16)
        with torch.no_grad():
            z0 = collab.models[0].encode(image[None])
        runner.save_images(image[None], "inputs", names=[name])
        before_calls, before, log_["worked"] = calls(), runner.clock(), False
        own = own_conditions(inputs, i) if opts.mode == "invert" else {}
        models, e_from = face_models(opts, runner, cache, by_name, used, name, digests[i], z0, edits[i][0].targets,
                                     own, cached[i], counters, log_)
        if log_["worked"]:  # stages 1-2 ran for this face
            log_["seconds"] += runner.clock() - before
            log_["calls"] += calls() - before_calls
            log_["faces"] += 1
        mixed = CollaborativeDenoiser([models[m] for m in used], diffusers, names=used, reweight=reweight,
                                      generator=runner.keyed_generator("codiff_edit.reweight", key))
        # this face's fixed start code (and per-step noise): the same for every α and every edit
        start_seconds, start_calls, noises, final = 0.0, 0, None, 0
        if opts.mode == "invert":
            before_calls, before = calls(), runner.clock()
            source_cond = [{"encoder_hidden_states": e_from[m][0], "encoder_attention_mask": e_from[m][1]}
                           for m in used]
            z_T = ddim_invert(mixed, schedule, z0, grid, cond=source_cond, progress=False).latents[0]
            start_seconds, start_calls, final = runner.clock() - before, calls() - before_calls, -1
        else:
            z_T = starts[i:i + 1].to(runner.device) if starts is not None else \
                torch.randn(1, *shape, generator=runner.keyed_generator("codiff_edit.start", key), device=runner.device)
            noises = torch.randn(len(grid), 1, *shape, generator=runner.keyed_generator("codiff_edit.noise", key),
                                 device=runner.device).expand(-1, len(alphas), -1, -1, -1)
        for edit in edits[i]:
            before_calls, before = calls(), runner.clock()
            pairs = {m: (tuning.encode_condition(models[m], edit.targets[m]), e_from[m]) for m in used}
            with runner.timed("sampling"):
                z = runner.sample(mixed, z_T.expand(len(alphas), -1, -1, -1), step, timesteps=grid, final=final,
                                  cond=[tuning.interpolate(weights, *pairs[m]) for m in used], noises=noises)
                with torch.no_grad():
                    images = mixed.decode(z).cpu()
            mask = None
            if opts.blending() == "region":  # keep the input outside the edit's region
                mask = edit_mask({**REGION, **opts.region}, mixed, z0, image, own_conditions(inputs, i).get("mask"),
                                 edit.targets.get("mask"), [pairs[m] for m in used], images, alphas,
                                 runner.keyed_generator("codiff_edit.region", key)).expand(len(alphas), -1, -1, -1)
                images, raw = blend.paste(images, image[None], mask), images
            seconds, network_calls = runner.clock() - before + start_seconds, calls() - before_calls + start_calls
            changed = edit.changed if edit.expected is not None else \
                changed_by_caption(classifier, image, edit.targets.get("text"))  # synthetic: the renderer's changes
            wanted = wanted_probabilities(classifier, images, changed)
            chosen, reason = choose(wanted)
            write_edit(runner, name, edit, alphas, images, chosen, reason, wanted, image, pairs)
            if mask is not None:
                runner.save_images(mask[chosen, None].expand(-1, 3, -1, -1) * 2 - 1, "regions",
                                   names=[f"{name}_{edit.name}"])
            strips.append((image, edit.truth, images[chosen]))
            results.setdefault(edit.name, []).append({
                "face": name, "alpha": alphas[chosen], "reason": reason, "image": images[chosen], "all": images,
                "input": image, "edit": edit, "seconds": seconds, "calls": network_calls, "changed": changed,
                "area": None if mask is None else float((mask[chosen] > 0).float().mean())})
            if mask is not None:  # blend=none's images (bit for bit), scored alongside
                c, why = choose(wanted_probabilities(classifier, raw, changed))
                results[edit.name][-1]["unblended"] = {"alpha": alphas[c], "reason": why, "image": raw[c], "all": raw,
                                                       "area": None}
    if not results:
        raise InputError("no face can take these edits (e.g. a beard on women only, or every face already has that "
                         "hair colour); choose other faces or edits")
    rows = [torch.stack([inp, truth["image"] if truth else torch.zeros_like(inp), out]) for inp, truth, out in strips]
    runner.grid(torch.cat(rows[:48]), "grid.png", "edits", "rows = face × edit; columns = input, counterfactual "
                "(black: none), edit at the chosen α", nrow=3, upscale=2)

    faces_tuned = max(log_["faces"], 1)
    tuned = {"faces_tuned": log_["faces"], "unets_from_cache": log_["from_cache"],
             "seconds_per_face": log_["seconds"] / faces_tuned, "network_calls_per_face": log_["calls"] / faces_tuned}
    metrics = {"mode": opts.mode, "stage2": opts.stage2 if opts.mode == "imagic" else None, "modalities": used,
               "model": str(cfg.model.pretrained), "faces": len(inputs), "alpha_list": alphas, "alpha": opts.alpha,
               "settings": cache.settings, "steps": len(grid), "blend": opts.blending(),
               "region": {**REGION, **opts.region} if opts.blending() == "region" else None,
               "eta": step.eta, "first_t": grid[0],
               "cache_files_written": log_["made"],
               "start_code": "x_T file " + str(opts.x_T) if opts.x_T else "codiff_edit.start stream, keyed by face",
               "reweight": reweight.options(), "warnings": warnings, "cache": opts.cache, "tuning": tuned,
               "peak_memory_mb": peak_memory_mb(runner.device),
               "classifier": opts.classifier, "eval_classifier": opts.eval_classifier, "parser": opts.parser}
    similarity = SimilarityEvaluator()
    metrics["edits"] = {edit: edit_entry(records, alphas, tuned, similarity, evaluator, parser)
                        for edit, records in results.items()}
    if opts.blending() == "region":  # what the paste adds: the same edits unblended (blend=none), α chosen on them
        for edit, records in results.items():
            metrics["edits"][edit]["unblended"] = edit_entry([{**r, **r["unblended"]} for r in records], alphas,
                                                             tuned, similarity, evaluator, parser)
    return metrics


def edit_mask(region: dict, mixed, z0: Tensor, image: Tensor, own_labels: Tensor | None, target_labels: Tensor | None,
              pairs: list, images: Tensor, alphas: list[float], generator: torch.Generator) -> Tensor:
    """The feathered paste mask [1 or len(alphas), 1, H, W] of one edit (facelab.diffusion.blend): the target label
    map's difference from the face's own (where both are known and region.labels), together with region.auto's:
    noise (DiffEdit: ε under the targets vs the source conditions) or decoded (each α's image vs α = 0's). Never
    the evaluators nor the counterfactual."""
    size, found = tuple(image.shape[-2:]), torch.zeros(1, 1, *image.shape[-2:])
    if region["labels"] and own_labels is not None and target_labels is not None:
        found = blend.label_region(resize_mask(own_labels, size), resize_mask(target_labels, size), region["dilate"])
    if region["auto"] == "noise":
        difference = blend.noise_region(mixed, mixed.schedule, z0, [p[0] for p in pairs], [p[1] for p in pairs],
                                        region["t"], region["draws"], generator).cpu()
    elif region["auto"] == "decoded":
        difference = blend.decoded_region(images, images[alphas.index(0.0)][None])
    if region["auto"] is not None:
        auto = blend.dilate(blend.binary(difference, size, region["threshold"]), region["dilate"])
        found = torch.maximum(found, auto)
    return blend.feather(found, region["feather"])


def write_edit(runner: Runner, face: str, edit, alphas: list[float], images: Tensor, chosen: int, reason: str,
               wanted: dict, image: Tensor, pairs: dict) -> None:
    """Every α's image, the chosen one, the counterfactual, the embeddings and a gallery strip with the scores."""
    labels = [f"α={a:g}" for a in alphas]
    runner.save_images(images, f"edits/{face}", names=[f"{edit.name}_alpha={label[2:]}" for label in labels])
    runner.save_images(images[chosen][None], "edits", names=[f"{face}_{edit.name}"])
    if edit.truth is not None:
        runner.save_images(edit.truth["image"][None], "counterfactuals", names=[f"{face}_{edit.name}"])
    tensors = {f"{m}.{kind}": e[0][0].detach().cpu().contiguous() for m, pair in pairs.items()
               for kind, e in zip(("e_tgt", "e_opt"), pair)}
    write_atomic(runner.out / "embeddings" / f"{face}_{edit.name}.safetensors",
                 lambda tmp: save_file(tensors, str(tmp)), overwrite=runner.resuming)
    scores = "; ".join(f"{label}: " + ", ".join(f"P({a})={p[j]:.2f}" for a, p in wanted.items())
                       for j, label in enumerate(labels)) if wanted else "no attribute scored"
    strip = torch.cat([image[None], images])
    runner.grid(strip, f"{face}_{edit.name}.png", f"edit {edit.name}",
                f"{face}: input, then {', '.join(labels)}; chosen α={alphas[chosen]:g} ({reason}); guidance classifier "
                f"{scores}", nrow=len(strip), upscale=2)


def edit_entry(records: list[dict], alphas: list[float], tuned: dict, similarity, evaluator, parser) -> dict:
    """One edit's entry in metrics.json: α, time and network calls, and the held-out scores over its faces."""
    n, edits, truths = len(records), [r["edit"] for r in records], [r["edit"].truth for r in records]
    sampling, sampling_calls = sum(r["seconds"] for r in records) / n, sum(r["calls"] for r in records) / n
    entry = {"faces": n, "alphas": [r["alpha"] for r in records], "alpha_mean": sum(r["alpha"] for r in records) / n,
             "alpha_reached": sum(r["reason"] == "reached" for r in records) / n,
             "sampling_seconds_per_edit": sampling, "sampling_network_calls_per_edit": sampling_calls,
             "seconds_per_edit": sampling + tuned["seconds_per_face"],
             "region_area": None if records[0]["area"] is None else sum(r["area"] for r in records) / n,
             "network_calls_per_edit": sampling_calls + tuned["network_calls_per_face"]}
    known = all(t is not None for t in truths)
    return {**entry, **target_edit_scores(
        torch.stack([r["image"] for r in records]), torch.stack([r["input"] for r in records]), similarity, evaluator,
        parser, reference=torch.stack([t["image"] for t in truths]) if known else None,
        by_alpha={f"{a:g}": torch.stack([r["all"][j] for r in records]) for j, a in enumerate(alphas)},
        masks=torch.stack([e.targets["mask"] for e in edits]) if "mask" in edits[0].targets else None,
        expected=[e.expected for e in edits] if all(e.expected is not None for e in edits) else None,
        changed=sorted({a for r in records for a in r["changed"]}),
        captions=[e.targets["text"] for e in edits] if "text" in edits[0].targets else None)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
