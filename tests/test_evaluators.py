"""Evaluators (facelab.evaluators, conf/eval): the numbers of today's scoring code on the same inputs (method=debias's
evaluate + frechet, method=fuzzy's region PSNR/SSIM, method=cyclediff's per-edit scores, method=directions' PSNR and
probabilities, the codiff experiment's mask and caption consistency), the held-out guard, the resolution check and bad
inputs as one-line InputErrors."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, compose
from facelab.evaluators import (
    AttributeEvaluator,
    CaptionEvaluator,
    ParsingEvaluator,
    SimilarityEvaluator,
    build_evaluators,
    check_held_out,
    guidance_networks,
)
from facelab.guidance.debias import target_distributions
from facelab.io.errors import InputError
from facelab.methods import cyclediff, fuzzy
from facelab.metrics.attributes import class_fractions, fairness_discrepancy
from facelab.metrics.captions import caption_consistency
from facelab.metrics.parsing import mask_consistency
from facelab.models.classifier import AttributeClassifier, load_classifier
from facelab.models.parser import FaceParser, load_parser
from facelab.models.pretrained import ZOO_DIR
from facelab.sources import Inputs

HELD_OUT = "guidance must not see the evaluator"


def images(n, size=16, seed=0, spread=1.0):
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * spread


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Tiny (random) exported networks: guide/ and eval/ attribute classifiers (16 px), copy/ = eval/ elsewhere,
    parser/ (16 px)."""
    root = tmp_path_factory.mktemp("nets")
    for seed, name in ((0, "guide"), (1, "eval")):
        torch.manual_seed(seed)
        AttributeClassifier(["Male", "Smiling"], {"skin_tone": 3}, channels=(8, 16), image_size=16).export(root / name)
    shutil.copytree(root / "eval", root / "copy")
    torch.manual_seed(2)
    FaceParser(channels=(8, 16), image_size=16).export(root / "parser")
    return root


def attributes(nets, **kwargs):
    return AttributeEvaluator(str(nets / "eval"), **{"batch_size": 3, "real_faces": {"num": 0}, "device": "cpu",
                                                      **kwargs})


# --- attributes: method=debias ---------------------------------------------------------------------------------------
@torch.no_grad()
def _debias_evaluate(net, x, batch_size):
    """method=debias' evaluation before it scored with the evaluator: hard labels and features, resized."""
    from facelab.io.images import resize_images

    labels, features = {}, []
    for chunk in x.split(batch_size):
        chunk = resize_images(chunk, net.image_size)
        for head, probs in net.predict(chunk).items():
            labels.setdefault(head, []).append(probs.argmax(1))
        features.append(net.features(chunk))
    return {"labels": {head: torch.cat(v) for head, v in labels.items()}, "features": torch.cat(features)}


@torch.no_grad()
def _debias_frechet(cfg, net, features):
    """method=debias' Fréchet distance before the evaluator: to method.real_faces synthetic faces in its features."""
    from facelab.data.synthetic import SyntheticFaces
    from facelab.metrics.attributes import feature_frechet

    real = cfg.method.real_faces
    faces = SyntheticFaces(size=net.image_size, length=real.num, seed=real.seed, start=real.start,
                           priors=OmegaConf.to_container(real.priors, resolve=True))
    reference = torch.cat([net.features(torch.stack([faces[i]["image"] for i in range(first, min(
        first + cfg.batch_size, real.num))])) for first in range(0, real.num, cfg.batch_size)])
    return {"frechet": feature_frechet(features, reference), "frechet_real_faces": int(real.num)}


@pytest.mark.parametrize("size", [16, 32])
def test_attributes_reproduce_debias_evaluate_and_frechet(nets, size, tmp_path):
    cfg = compose("sample", ["method=debias", f"method.eval_classifier={nets / 'eval'}", "method.real_faces.num=6",
                             "batch_size=3", "device=cpu", "+eval=[attributes]",
                             f"eval.attributes.classifier={nets / 'eval'}", "eval.attributes.real_faces.num=6"],
                  tmp_path)
    evaluator = build_evaluators(cfg)["attributes"]
    x = images(7, size)  # chunks of 3, 3, 1; 32 px images are resized to the classifier's 16 px, as debias does
    net = load_classifier(cfg.method.eval_classifier)
    today = _debias_evaluate(net, x, cfg.batch_size)
    today.update(_debias_frechet(cfg, net, today["features"]))
    target = {"Male": 0.3, "skin_tone": [0.2, 0.3, 0.5]}
    score = evaluator.score(x, targets=target)

    assert all(torch.equal(evaluator.last["labels"][h], today["labels"][h]) for h in today["labels"])
    assert torch.equal(evaluator.last["features"], today["features"])
    assert score["frechet"] == today["frechet"] and score["frechet_real_faces"] == today["frechet_real_faces"] == 6
    # metrics.json of method=debias: fractions of every head, per target fractions and FD, and their mean
    assert score["fractions"] == {h: class_fractions(v, net.heads[h]).tolist() for h, v in today["labels"].items()}
    targets = target_distributions(target, net.heads, "distribution")
    for name, r in targets.items():
        assert score["attributes"][name] == {"target": r.tolist(),
                                             "fractions": class_fractions(today["labels"][name], len(r)).tolist(),
                                             "fd": fairness_discrepancy(r, today["labels"][name])}
    assert score["fd_mean"] == sum(fairness_discrepancy(r, today["labels"][n]) for n, r in targets.items()) / 2
    assert score.get("resized_from") == (32 if size == 32 else None)


def test_reference_features_are_computed_once(nets):
    evaluator = attributes(nets, real_faces={"num": 4})
    first = evaluator.score(images(3))["frechet"]
    reference = evaluator.reference_features()
    assert evaluator.score(images(3))["frechet"] == first and evaluator.reference_features() is reference


# --- similarity: method=fuzzy, method=cyclediff, method=directions ---------------------------------------------------
def _fuzzy_psnr(x, reference, region=None):
    """method=fuzzy's region PSNR before it scored with the evaluator (pooled over the region's elements)."""
    squared = (x.clamp(-1, 1) - reference) ** 2
    if region is not None:
        if not region.any():
            return None
        squared = squared[region.expand_as(squared)]
    return (10 * torch.log10(4 / squared.mean().clamp(min=1e-12))).item()


def _fuzzy_ssim(x, reference, region=None):
    """method=fuzzy's region SSIM before it scored with the evaluator (the SSIM map's mean over the region)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if region is not None and not region.any():
        return None
    _, full = structural_similarity_index_measure(x.clamp(-1, 1), reference, data_range=2.0, return_full_image=True)
    return full.mean().item() if region is None else full[region.expand_as(full)].mean().item()


def test_pooled_similarity_is_fuzzys_region_psnr_and_ssim():
    gen = torch.Generator().manual_seed(3)
    results = {"clean": images(3, 32, seed=1), "gt_image": images(3, 32, seed=2),
               "inpainted": images(3, 32, seed=4, spread=1.2),  # outside [-1, 1]: fuzzy clamps the image
               "degradation": torch.rand(3, 3, 32, 32, generator=gen) < 0.3}
    evaluator = SimilarityEvaluator(reduction="pooled", clamp=True)
    today = fuzzy.correction_metrics(results)
    inside = results["degradation"].any(1, keepdim=True)
    for when, key in (("before", "gt_image"), ("after", "inpainted")):
        score = evaluator.score(results[key], results["clean"], inside)
        for where in ("inside", "outside", "all"):
            for metric in ("psnr", "ssim"):
                ours = score[metric if where == "all" else f"{metric}_{where}"]
                assert ours == today[f"{metric}_{where}_{when}"]
                region = {"inside": inside, "outside": ~inside, "all": None}[where]
                assert ours == {"psnr": _fuzzy_psnr, "ssim": _fuzzy_ssim}[metric](results[key], results["clean"], region)
    assert score["region_fraction"] == today["degraded_fraction"]
    empty = evaluator.score(results["inpainted"], results["clean"], torch.zeros(3, 1, 32, 32, dtype=torch.bool))
    assert empty["psnr_inside"] is None is empty["ssim_inside"] is _fuzzy_psnr(results["inpainted"], results["clean"],
                                                                               torch.zeros(3, 1, 32, 32).bool())
    assert empty["psnr_outside"] == _fuzzy_psnr(results["inpainted"], results["clean"])


@torch.no_grad()
def _cyclediff_scores(images, y_src, flips, edited, truth, net, attributes, batch_size):
    """method=cyclediff's per-edit scores before it scored with the evaluators (inputs without renderer truth)."""
    from facelab.io.images import resize_images
    from facelab.metrics.images import l1, psnr, ssim

    entry, found = {}, [i for i, item in enumerate(truth) if item is not None]
    if not flips:
        entry.update(psnr=float(psnr(edited, images).mean()), ssim=float(ssim(edited, images).mean()),
                     l1=float(l1(edited, images).mean()))
    elif found:
        reference = torch.stack([truth[i]["image"] for i in found])
        entry.update(ground_truths=len(found), psnr=float(psnr(edited[found], reference).mean()),
                     ssim=float(ssim(edited[found], reference).mean()),
                     psnr_input=float(psnr(images[found], reference).mean()),
                     ssim_input=float(ssim(images[found], reference).mean()))
    if net is None:
        return entry
    columns = [attributes.index(a) for a in flips]
    expected = (y_src > 0).float()
    expected[:, columns] = 1 - expected[:, columns]
    flipped = torch.zeros(len(attributes), dtype=torch.bool)
    flipped[columns] = True
    for suffix, x in (("", edited), ("_input", images)):
        probs = [net.predict(resize_images(chunk, net.image_size)) for chunk in x.split(batch_size)]
        correct = torch.cat([torch.stack([p[a][:, 1] > 0.5 for a in attributes], 1).float() for p in probs]) == expected
        if flips:
            entry[f"flip_rate{suffix}"] = float(correct[:, flipped].all(1).float().mean())
        entry[f"preservation{suffix}"] = float(correct[:, ~flipped].float().mean())
        if not suffix:
            entry["preserved"] = {a: float(correct[:, j].float().mean()) for j, a in enumerate(attributes)
                                  if not flipped[j]}
    return entry


def test_per_image_similarity_and_attribute_rates_are_cyclediffs(nets):
    names, attrs = [f"face{i}" for i in range(5)], ["Male", "Smiling"]
    source, edited = images(5, seed=5), images(5, seed=6)
    y_src = torch.tensor([[1, -1], [-1, -1], [1, 1], [-1, 1], [1, -1]], dtype=torch.float32)
    truth = [{"image": images(1, seed=10 + i)[0]} if i in (0, 2, 3) else None for i in range(5)]
    net = load_classifier(nets / "eval")
    today = _cyclediff_scores(source, y_src, ["Smiling"], edited, truth, net, attrs, 2)
    similarity, rates = SimilarityEvaluator(), attributes(nets, batch_size=2)
    inputs = Inputs(names, images=source)
    assert cyclediff.score_edit(inputs, y_src, ["Smiling"], edited, truth, attrs, similarity, rates) == today

    found = [0, 2, 3]
    reference = torch.stack([truth[i]["image"] for i in found])
    ours = similarity.score(edited[found], reference)
    baseline = similarity.score(source[found], reference)
    assert (ours["psnr"], ours["ssim"]) == (today["psnr"], today["ssim"])
    assert (baseline["psnr"], baseline["ssim"]) == (today["psnr_input"], today["ssim_input"])
    expected = (y_src > 0).long()
    expected[:, 1] = 1 - expected[:, 1]
    expected = {a: expected[:, j] for j, a in enumerate(attrs)}
    for suffix, x in (("", edited), ("_input", source)):
        score = rates.score(x, expected=expected, flipped=["Smiling"])
        assert score["flip_rate"] == today[f"flip_rate{suffix}"]
        assert score["preservation"] == today[f"preservation{suffix}"]
    assert rates.score(edited, expected=expected, flipped=["Smiling"])["preserved"] == today["preserved"]

    reconstruction = _cyclediff_scores(source, y_src, [], edited, [None] * 5, None, attrs, 2)
    ours = similarity.score(edited, source)
    assert {k: ours[k] for k in ("psnr", "ssim", "l1")} == reconstruction
    off = AttributeEvaluator(None, real_faces={"num": 0}, device="cpu")
    assert cyclediff.score_edit(inputs, y_src, [], edited, [None] * 5, attrs, similarity, off) == reconstruction


def test_per_image_psnr_and_probabilities_are_directions(nets):
    decoded, inputs = images(4, seed=7), images(4, seed=8)
    mse = (decoded - inputs.cpu()).pow(2).flatten(1).mean(1) / 4  # methods/directions.py, apply_directions
    today = round(float((-10 * torch.log10(mse.clamp_min(1e-12))).mean()), 2)
    assert round(SimilarityEvaluator().score(decoded, inputs)["psnr"], 2) == today

    n_src, n_s, net = 3, 2, load_classifier(nets / "eval")
    grid = images(n_src * n_s, seed=9).reshape(n_src, n_s, 3, 16, 16)
    probs = net.predict(grid.flatten(0, 1))
    evaluator = attributes(nets)
    for j in range(n_s):
        ours = evaluator.score(grid[:, j])["probabilities"]
        assert set(ours) == {"Male", "Smiling"}
        assert {a: round(v, 4) for a, v in ours.items()} == \
            {a: round(float(p[:, 1].reshape(n_src, n_s)[:, j].mean()), 4) for a, p in probs.items() if p.shape[1] == 2}


def test_region_scores_per_image():
    x, ref = images(2, seed=11), images(2, seed=12)
    region = torch.zeros(2, 16, 16, dtype=torch.bool)
    region[0, :8] = True  # image 1: empty region, left out of the inside mean
    score = SimilarityEvaluator().score(x, ref, region)
    mse = (x[0, :, :8] - ref[0, :, :8]).pow(2).mean()
    assert score["psnr_inside"] == pytest.approx((10 * torch.log10(4 / mse)).item(), abs=1e-5)
    assert score["l1_inside"] == pytest.approx((x[0, :, :8] - ref[0, :, :8]).abs().mean().item(), abs=1e-6)
    assert score["region_fraction"] == 0.25 and score["psnr_outside"] is not None


# --- parsing and captions: experiments/codiff/evaluate.py --------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 32])
def test_parsing_is_mask_consistency_of_the_parser(nets, size):
    x = images(5, size, seed=13)
    labels = torch.randint(0, 19, (5, 16, 16), generator=torch.Generator().manual_seed(14))
    parser = load_parser(nets / "parser")
    today = mask_consistency(torch.cat([parser.parse(part) for part in x.split(2)]), labels)
    score = ParsingEvaluator(str(nets / "parser"), batch_size=2, device="cpu").score(x, labels)
    assert {k: score[k] for k in ("pixel_acc", "miou", "iou")} == {k: today[k] for k in ("pixel_acc", "miou", "iou")}
    assert score.get("parsed_at") == (16 if size == 32 else None)


def test_captions_are_caption_consistency_of_the_classifier(nets):
    x = images(4, seed=15)
    captions = ["This man is smiling.", "A woman who is not smiling.", "She smiles, with dark skin.", "A face."]
    today = caption_consistency(load_classifier(nets / "eval").predict(x), captions)
    assert CaptionEvaluator(str(nets / "eval"), batch_size=3, device="cpu").score(x, captions) == today
    none = CaptionEvaluator(str(nets / "eval"), device="cpu").score(x[:1], ["A face."])
    assert none["accuracy"] is None and none["count"] == 0


# --- the held-out guard ----------------------------------------------------------------------------------------------
def test_held_out_guard(nets):
    with pytest.raises(InputError) as info:
        check_held_out("attr64_eval", ["attr64", "attr64_eval"])
    assert one_line(info) == f"method.eval_classifier=attr64_eval is also a guidance classifier; {HELD_OUT}"
    with pytest.raises(InputError, match=HELD_OUT):  # a zoo name and its folder are one model
        check_held_out("attr64_eval", [ZOO_DIR / "attr64_eval"])
    with pytest.raises(InputError, match=f"{nets / 'copy'} has the same weights"):  # a copy: same fingerprint
        check_held_out(str(nets / "eval"), [str(nets / "guide"), str(nets / "copy")])
    with pytest.raises(InputError, match="same weights"):  # a loaded module, e.g. a guidance term's classifier
        check_held_out(str(nets / "eval"), guidance_networks([SimpleNamespace(classifier=load_classifier(nets / "copy"))]))
    check_held_out(str(nets / "eval"), [str(nets / "guide"), None, load_classifier(nets / "guide"), "attr64_noisy"])
    check_held_out(None, [str(nets / "eval")])

    evaluator = attributes(nets, key="method.eval_classifier")
    evaluator.check(16, [str(nets / "guide")])
    for guide in (str(nets / "eval"), load_classifier(nets / "copy")):
        with pytest.raises(InputError, match=f"^method.eval_classifier={nets / 'eval'} is also a guidance"):
            evaluator.check(16, [guide])
    with pytest.raises(InputError, match=HELD_OUT):
        CaptionEvaluator(str(nets / "eval"), device="cpu").check(16, [str(nets / "copy")])
    with pytest.raises(InputError, match=HELD_OUT):
        ParsingEvaluator(str(nets / "parser"), device="cpu").check(16, [str(nets / "parser")])


# --- resolution ------------------------------------------------------------------------------------------------------
def test_resolution_check(nets):
    evaluator = attributes(nets, key="method.eval_classifier")
    evaluator.check(16)
    evaluator.check(256)  # larger images are downsampled to the classifier's size
    with pytest.raises(InputError) as info:
        evaluator.check(8)
    assert "method.eval_classifier=null" in one_line(info) and "16 px" in str(info.value)
    with pytest.raises(InputError, match="method.eval_classifier=null"):
        evaluator.score(images(2, 8))
    with pytest.raises(InputError, match="eval.parsing.parser=null"):
        ParsingEvaluator(str(nets / "parser"), device="cpu").check(8)
    with pytest.raises(InputError, match="resolution"):
        evaluator.check(16.0)
    off = AttributeEvaluator(None)  # method.eval_classifier=null: no network, nothing to check, nothing scored
    off.check(8, [str(nets / "eval")])
    assert not off.enabled and off.score(images(2, 8)) == {}
    SimilarityEvaluator().check(8, ["attr64_eval"])


def test_a_256_px_run_is_scored_by_the_64_px_zoo_evaluator():
    """method=directions on a 256 px model used to crash at the end: its evaluator reads 64 px."""
    evaluator = AttributeEvaluator("attr64_eval", batch_size=2, real_faces={"num": 0}, device="cpu")
    evaluator.check(256, ["attr64"])
    score = evaluator.score(images(2, 256))
    assert score["resized_from"] == 256 and set(score["probabilities"]) >= {"Male", "Smiling"}


# --- bad input -------------------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_input_errors(nets):
    evaluator = attributes(nets)
    similarity = SimilarityEvaluator()
    x = images(2)
    cases = [
        (lambda: evaluator.score(x, targets={"Beard": 0.5}), "no head Beard"),
        (lambda: evaluator.check(16, targets={"Beard": 0.5}), "no head Beard"),
        (lambda: evaluator.score(x, targets={"skin_tone": 0.5}), "give 3 probabilities"),
        (lambda: evaluator.score(x, expected={"Beard": torch.ones(2)}), "no head Beard"),
        (lambda: evaluator.score(x, expected={"Male": torch.ones(3)}), "3 labels for 2 images"),
        (lambda: evaluator.score(x, flipped=["Male"]), "expected labels"),
        (lambda: evaluator.score(x[0]), r"expected square RGB images \[N, 3, H, H\]"),
        (lambda: evaluator.score(images(2)[..., :8]), "square"),
        (lambda: evaluator.score(x.mean(1, keepdim=True)), "RGB"),
        (lambda: attributes(nets, real_faces={"num": 4}).score(x[:1]), "needs at least 2"),
        (lambda: attributes(nets, real_faces={"num": 4}).check(16, num_images=1), "needs at least 2"),
        (lambda: attributes(nets, real_faces={"num": 1}), r"real_faces.num=1"),
        (lambda: attributes(nets, real_faces={"size": 4}), "unknown keys"),
        (lambda: attributes(nets, batch_size=0), "batch_size=0"),
        (lambda: AttributeEvaluator(str(nets / "missing"), device="cpu"), "attribute classifier"),
        (lambda: similarity.score(x, images(3)), "reference: expected the images' shape"),
        (lambda: similarity.score(x, x, torch.ones(2, 1, 8, 8, dtype=torch.bool)), "region: expected a mask"),
        (lambda: similarity.score(x, x, torch.full((2, 16, 16), 0.5)), "boolean"),
        (lambda: SimilarityEvaluator(reduction="median"), "eval.similarity.reduction='median'"),
        (lambda: ParsingEvaluator(str(nets / "parser"), device="cpu").score(x, torch.zeros(3, 16, 16).long()),
         "expected 2 label maps"),
        (lambda: ParsingEvaluator(str(nets / "parser"), device="cpu").score(x, torch.full((2, 16, 16), 19)),
         "labels must lie in 0..18"),
        (lambda: CaptionEvaluator(str(nets / "eval"), device="cpu").score(x, ["one"]), "expected 2 strings"),
        (lambda: CaptionEvaluator(str(nets / "eval"), device="cpu").score(x, "one two"), "one string"),
    ]
    for call, match in cases:
        with pytest.raises(InputError, match=match) as info:
            call()
        one_line(info)


# --- configs ---------------------------------------------------------------------------------------------------------
def test_eval_configs_compose_and_build(tmp_path):
    files = sorted((CONF / "eval").glob("*.yaml"))
    assert [f.stem for f in files] == ["attributes", "captions", "parsing", "similarity"]
    for f in files:
        text = f.read_text()
        assert text.startswith("# ") and "python -m facelab.sample" in text and "Knobs" in text
    cfg = compose("sample", ["+eval=[attributes,similarity,parsing,captions]", "device=cpu", "batch_size=4",
                             "eval.attributes.real_faces.num=0"], tmp_path)
    built = build_evaluators(cfg)
    assert [type(e).__name__ for e in built.values()] == ["AttributeEvaluator", "SimilarityEvaluator",
                                                          "ParsingEvaluator", "CaptionEvaluator"]
    assert built["attributes"].batch_size == 4 and built["attributes"].source == "attr64_eval"
    for evaluator in built.values():
        evaluator.check(64, ["attr64"])
    assert build_evaluators(compose("sample", [], tmp_path / "none")) == {}
