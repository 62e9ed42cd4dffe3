"""Run and sweep pages (facelab.io.gallery, facelab.sweeps.write_page, facelab.plots, `python -m facelab.gallery`):
labels, maps, metrics, escaping, and the same page rebuilt from a copied folder."""
import html
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from facelab.gallery import build, main
from facelab.io.gallery import Gallery, fmt, render_run
from facelab.io.grids import save_grid
from facelab.plots import run_plots, sweep_plots
from facelab.sweeps import RECORDS, write_page

EVIL = "<script>alert('x')</script>"


def make_run(root, caption=EVIL):
    """A run folder as the runner leaves it: a grid with a map column, a row of images, metrics, config, overrides."""
    root.mkdir(parents=True)
    images = torch.linspace(-1, 1, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)
    images[1::2] = images[1::2].mean(1, keepdim=True)  # column 1: a greyscale map
    save_grid(images, root / "grid.png", nrow=2, upscale=2)
    name = "face <b onload=x>&'\".png"  # a user's file name: markup, quotes, an ampersand
    Image.new("RGB", (8, 8), (10, 200, 30)).save(root / name)
    gallery = Gallery(root, f"facelab {EVIL}")
    gallery.add_grid("overview", root / "grid.png", caption, 4, (8, 8), 2, upscale=2, rows=["a", EVIL],
                     cols=["input", "keep weight m"], maps={"label": "keep weight m", "vmin": 0, "vmax": 1, "cols": [1]})
    gallery.section(f"inputs {EVIL}").append([(name, root / name)])
    metrics = {"psnr_to_input": 14.411056518554688, "mean_m": 0.07000000774860382, "seconds_per_image": 1.3082,
               "network_calls_per_image": 50, EVIL: 1, "nested": {"auroc": 0.69427722}}
    (root / "config.yaml").write_text(f"method:\n  name: fuzzy\ncaption: \"{EVIL}\"\n")
    (root / ".hydra").mkdir()
    (root / ".hydra" / "overrides.yaml").write_text(f"- method=fuzzy\n- \"text={EVIL}\"\n")
    page = gallery.write(metrics)
    (root / "metrics.json").write_text(json.dumps(metrics))
    return page


def test_run_page_labels_metrics_and_escapes(tmp_path):
    page = make_run(tmp_path / "run").read_text(encoding="utf-8")
    assert "<script>alert" not in page and page.count("<script>") == 1  # only the page's own sorting script
    assert html.escape(EVIL, quote=True) in page
    # the command line, copyable, with the overrides quoted for the shell
    assert "python -m facelab.sample method=fuzzy" in page and "copyCmd" in page
    # key metrics: rounded, with units and direction; everything else behind the disclosure
    table = page.split("table class='data metrics'")[1].split("</table>")[0]
    assert ">14.41<" in table and ">0.070<" in table and ">50<" in table and "0.694" in table
    assert "dB" in table and "higher ↑" in table and "lower ↓" in table and ">0.07000000774860382<" not in page
    assert "All metrics (6)" in page and "Config (config.yaml)" in page
    # the grid: column and row labels; the map column coloured (a data URI) with a colour bar
    assert ">keep weight m<" in page and ">input<" in page and "linear-gradient" in page
    assert re.search(r"<img alt='grid.png' src='data:image/png;base64,", page)
    assert "href='grid.png'" in page
    # a user file name: escaped as text, percent-encoded as a link
    assert "face%20%3Cb%20onload%3Dx%3E%26%27%22.png" in page and "face &lt;b onload=x&gt;&amp;&#x27;&quot;.png" in page
    assert "<b onload" not in page


def test_map_tiles_are_coloured_and_images_kept(tmp_path):
    make_run(tmp_path / "run")
    page = (tmp_path / "run" / "index.html").read_text()
    import base64
    import io

    data = re.search(r"src='data:image/png;base64,([^']+)'", page).group(1)
    coloured = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    original = np.asarray(Image.open(tmp_path / "run" / "grid.png").convert("RGB"))
    left, right = slice(4, 20), slice(24, 40)  # tiles of column 0 and 1 (pad 2, 8 px, upscale 2)
    assert np.array_equal(coloured[4:20, left], original[4:20, left])  # images untouched
    tile = coloured[4:20, right].astype(int)
    assert (np.abs(tile[..., 0] - tile[..., 1]) > 10).any()  # the greyscale map now in colour


def test_page_rebuilds_the_same_in_a_copied_folder(tmp_path, capsys):
    first = make_run(tmp_path / "run").read_text(encoding="utf-8")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    (tmp_path / "copy" / "index.html").unlink()
    main([str(tmp_path / "copy")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "copy" / "index.html")
    assert (tmp_path / "copy" / "index.html").read_text(encoding="utf-8") == first.replace(
        "run · finished", "copy · finished")


def test_cli_refuses_a_folder_without_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2 and "no run here" in capsys.readouterr().err


def test_older_run_without_description_still_renders(tmp_path):
    save_grid(torch.zeros(1, 3, 4, 4), tmp_path / "grid.png")
    (tmp_path / "metrics.json").write_text(json.dumps({"psnr": 20.0}))
    page = build(tmp_path).read_text()
    assert "src='grid.png'" in page and "20.00" in page and "No command line recorded" in page


def sweep(tmp_path):
    """A multirun folder as SweepSummary leaves it: two finished jobs and one failed."""
    root = tmp_path / "sweep"
    for job, steps in enumerate((5, 10)):
        make_run(root / str(job))
        (root / str(job) / "metrics.json").write_text(json.dumps(
            {"psnr_to_input": 10.0 + steps, "network_calls_per_image": steps, "seconds_per_image": 0.1}))
    (root / RECORDS).mkdir(parents=True)
    records = [{"job": 0, "status": "completed", "overrides": ["method=fuzzy", "sampler.steps=5"], "dir": "0",
                "error": ""},
               {"job": 1, "status": "completed", "overrides": ["method=fuzzy", "sampler.steps=10"], "dir": "1",
                "error": ""},
               {"job": 2, "status": "failed", "overrides": ["method=fuzzy", f"sampler.steps={EVIL}"], "dir": "2",
                "error": f"InputError: {EVIL}"}]
    for record in records:
        (root / RECORDS / f"{record['job']}.json").write_text(json.dumps(record))
    return root


def test_sweep_page(tmp_path):
    root = sweep(tmp_path)
    page = build(root).read_text(encoding="utf-8")
    assert "3 jobs: 2 completed, 1 failed" in page and "Shared overrides: <code>method=fuzzy</code>" in page
    assert "href='0/index.html'" in page and "href='1/index.html'" in page and "href='2/index.html'" not in page
    assert "src='0/grid.png'" in page and "class='data jobs'" in page
    assert "<script>alert" not in page and f"InputError: {html.escape(EVIL, quote=True)}" in page
    assert "data-v='15.0'" in page and "data-v='20.0'" in page  # sortable by the metric's value
    assert "key metrics against network_calls_per_image" in page  # PSNR against calls
    assert "Key metrics the same in every job (1)" in page  # seconds_per_image: out of the table


def test_study_folder_page(tmp_path):
    """A study's cells (run folders with cell.json) get the sweep page too."""
    make_run(tmp_path / "study" / "cell_a")
    (tmp_path / "study" / "cell_a" / ".hydra" / "overrides.yaml").unlink()
    (tmp_path / "study" / "cell_a" / "cell.json").write_text(json.dumps({"overrides": ["mask_s=0.1"]}))
    page = build(tmp_path / "study").read_text()
    assert "facelab runs: study" in page and "href='cell_a/index.html'" in page
    assert "mask_s" in page or "0.1" in page


def test_overview_page_of_several_runs(tmp_path):
    """`make demo`'s page: per run its command, key metrics and first grid (labelled), and a link to its page."""
    from facelab.io.gallery import render_overview

    for name in ("one", "two"):
        make_run(tmp_path / "demo" / name)
    page = render_overview(tmp_path / "demo", ["one", "two"], "demo", EVIL).read_text()
    assert "href='one/index.html'" in page and "href='two/grid.png'" in page and ">keep weight m<" in page
    assert "<script>alert" not in page and page.count("id=cmd") == 2 and "copyCmd('cmd1')" in page


def test_written_by_a_real_multirun_hook(tmp_path):
    """SweepSummary rewrites the page with the summary."""
    root = sweep(tmp_path)
    from facelab.sweeps import write_summary

    write_summary(root)
    assert (root / "index.html").is_file() and (root / "summary.md").is_file()
    assert write_page(root).read_text() == (root / "index.html").read_text()


def test_plots_only_from_what_metrics_hold():
    assert run_plots({"psnr": 1.0, "edits": {"Smiling": {"flip_rate": 1.0}}}) == []  # cyclediff's edits: no curve
    directions = {"edits": {"0": {"-1": {"Male": 0.2, "Young": 0.5}, "1": {"Male": 0.9, "Young": 0.5}}}}
    debias = {"attributes": {"Male": {"target": [0.5, 0.5], "fractions": [0.4, 0.6]}}}
    codiff = {"influence": {"t": [751, 1], "learned": {"mask": [0.5, 0.7], "text": [0.5, 0.3]}}}
    for metrics, title in ((directions, "P(attribute) against scale"), (debias, "achieved against target fractions"),
                           (codiff, "influence over t")):
        (got, png), = run_plots(metrics)
        assert got == title and png.startswith(b"\x89PNG")
    rows = [{"network_calls_per_image": 5, "psnr": 20.0}, {"network_calls_per_image": 10, "psnr": 25.0}]
    assert sweep_plots(rows, [], ["psnr"])[0][0] == "key metrics against network_calls_per_image"
    assert sweep_plots(rows[:1] * 2, [], ["psnr"]) == []  # nothing varies


def test_fmt_rounds():
    assert fmt(0.07000000774860382, ".3f") == "0.070" and fmt(50, ".4g") == "50" and fmt([0.5, 0.25], ".2f") == \
        "0.50 / 0.25" and fmt(0.6, ".0%") == "60%" and fmt(float("nan")) == "nan"


def test_run_page_of_a_real_run(tiny_model_dir, tmp_path):
    """The runner writes gallery.json with the grids' labels; the trajectory is a labelled strip."""
    from conftest import compose
    from facelab.sample import run_sample

    out = tmp_path / "run"
    run_sample(compose("sample", ["method=ddim", f"model.pretrained={tiny_model_dir}", "num_samples=2",
                                  "sampler.steps=4", "guidance=[record]", "guidance.record.every=2", "progress=false",
                                  "device=cpu"], out))
    described = json.loads((out / "gallery.json").read_text())
    trajectory = next(s["grid"] for s in described["sections"] if s["name"] == "trajectory")
    assert trajectory["rows"][:2] == ["x_t (image 0)", "x̂0 (image 0)"] and trajectory["cols"][0].startswith("t = ")
    assert trajectory["count"] == len(trajectory["rows"]) * len(trajectory["cols"])
    page = (out / "index.html").read_text()
    assert "network_calls_per_image" in page and "trajectory.png" in page
    assert render_run(out).read_text() == page  # rebuilt from the folder: the same page


def test_long_listings_are_cut(tmp_path):
    """A run of many images keeps a small page: the first rows of a listing, behind a disclosure."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    gallery = Gallery(tmp_path, "t")
    gallery.section("images").extend([[("mask_used", tmp_path / "a.png")]] * 20)
    page = gallery.write({}).read_text()
    assert "<summary>20 rows</summary>" in page and "and 4 more rows" in page and page.count("href='a.png'") == 16
