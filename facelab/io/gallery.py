"""Run pages: a self-contained index.html that explains a run, rebuilt from the run folder alone.

A run's Gallery collects its image grids (with row / column labels and which columns are maps) and rows of images;
`write` saves that description as gallery.json and renders index.html from the folder: the command line
(.hydra/overrides.yaml, or cell.json of a study), the key metrics (metrics.json; units and which way is better from
METRICS), the grids (maps coloured, with a colour bar), plots of what the metrics hold (facelab.plots) and the full
metrics and config behind disclosures. `python -m facelab.gallery RUN` renders the page again, e.g. in a copied folder.
No network, no framework: inline CSS and a few lines of JavaScript (table sorting, copy button).
"""
from __future__ import annotations

import base64
import fnmatch
import html
import io
import json
import math
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

DESCRIPTION = "gallery.json"
PAGE = "index.html"

# Known metrics, by a pattern of the last part of a flattened name (fnmatch), first match wins: unit, which way is
# better ("higher", "lower" or ""), number format, meaning. The key-metrics table shows the metrics found here.
METRICS = [
    ("psnr_to_input", "dB", "", ".2f", "PSNR of the output to its input"),
    ("*psnr*", "dB", "higher", ".2f", "PSNR to the reference"),
    ("*ssim*", "", "higher", ".3f", "SSIM to the reference"),
    ("flip_rate", "", "higher", ".0%", "edits whose target attributes read as intended"),
    ("preservation", "", "higher", ".0%", "other attributes kept"),
    ("flip_rate_input", "", "", ".0%", "the same rate on the unedited inputs, for reference"),
    ("preservation_input", "", "", ".0%", "the same rate on the unedited inputs, for reference"),
    ("auroc*", "", "higher", ".3f", "anomaly map vs true damage, area under ROC"),
    ("ap", "", "higher", ".3f", "anomaly map vs true damage, average precision"),
    ("ap_*", "", "higher", ".3f", "anomaly map vs true damage, average precision"),
    ("fd_mean", "", "lower", ".3f", "distance of achieved to target attribute fractions, mean"),
    ("fd", "", "lower", ".3f", "distance of achieved to target attribute fractions"),
    ("fractions", "", "", ".2f", "achieved attribute fractions (classes 0 / 1 / …)"),
    ("frechet*", "", "lower", ".3g", "Fréchet distance of classifier features"),
    ("*accuracy*", "", "higher", ".1%", "accuracy"),
    ("*miou*", "", "higher", ".3f", "parsing mean IoU"),
    ("mean_m", "", "", ".3f", "mean keep weight m (1 = keep the input)"),
    ("degraded_fraction", "", "", ".1%", "pixels damaged on purpose"),
    ("explained_variance", "", "", ".3f", "variance of h explained by each direction"),
    ("network_calls_per_image", "calls", "lower", ".4g", "network evaluations per image"),
    ("network_calls", "calls", "lower", ".4g", "network evaluations"),
    ("*seconds_per_*", "s", "lower", ".3g", "wall time"),
]
# Maps by label (the first word of a row cell's label): the colour bar's title and value range.
MAPS = {"mask_used": ("keep weight m", 0.0, 1.0), "mask_nolambda": ("1 − A (anomaly-free)", 0.0, 1.0),
        "degradation_mask": ("true damage", 0.0, 1.0), "err": ("squared error / 255²", 0.0, 1.0),
        "errzscore": ("normalised error ẑ", 0.0, 1.0)}
# What each method does, in one line, for a reader who has not met it.
METHODS = {
    "generate": "Unconditional samples from a pixel diffusion model.",
    "ddim": "Unconditional samples from a pixel diffusion model.",
    "fuzzy": "Fuzzy-conditioned diffusion: every step blends the sample with a noised copy of the input under a keep "
             "weight m ∈ [0, 1] (1 = keep the input); zscore mode finds damage and lowers m there.",
    "debias": "h-space distribution guidance: steers a batch towards target attribute fractions.",
    "directions": "Semantic directions in h-space: each face decoded along each direction at several scales.",
    "cyclediff": "CycleDiff: attribute edits (counterfactuals) of input faces.",
    "codiff": "Collaborative Diffusion: a face from a mask and a caption; influence maps say which one leads where.",
    "ldm": "Latent diffusion conditioned on a mask or a caption.",
    "hextract": "h-space extraction: the U-Net bottleneck of inverted faces, stored as shards.",
}
# viridis at 9 evenly spaced points (value 0 -> 1); the colour bar is the same gradient in CSS
VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"]

CSS = """body{font-family:system-ui,sans-serif;margin:1.2em auto;max-width:1300px;padding:0 1em;color:#222}
table.metrics{margin-bottom:.8em}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}.sub{color:#666;margin:0}
table.data{border-collapse:collapse;font-size:14px}table.data td,table.data th{border:1px solid #ddd;padding:3px 8px}
table.data th{background:#f4f4f4;cursor:pointer;text-align:left}table.data td.n{text-align:right;font-variant-numeric:
tabular-nums}.muted{color:#777}pre{background:#f6f6f6;padding:8px;overflow-x:auto}
.cmd{display:flex;gap:.5em;align-items:flex-start}.cmd pre{flex:1;margin:0;white-space:pre-wrap}
.grid{display:grid;justify-content:start;align-items:center;margin:.4em 0}
.grid img,.cells img{image-rendering:pixelated}
.cl{font-size:12px;text-align:center;overflow:hidden;padding-bottom:2px}.rl{font-size:12px;text-align:right;
padding-right:6px;max-width:14em}.cap{font-size:13px;color:#555;margin:.2em 0 .6em}
.bar{display:inline-block;margin:.2em 1em .6em 0;font-size:12px}
.bar div.g{width:220px;height:12px;border:1px solid #999}
.bar .ticks{display:flex;justify-content:space-between;width:222px}.cells td{text-align:center;font-size:12px}
.plot{max-width:100%}.failed{color:#b00}.completed{color:#070}.running,.unfinished{color:#a60}
img.thumb{height:112px;max-width:360px;image-rendering:pixelated}
details{margin:1em 0}summary{cursor:pointer;font-weight:600}"""
# Sort a table.data by a clicked header (numbers by data-v); copy the command line.
JS = """
document.querySelectorAll('table.data th').forEach((th, i) => th.onclick = () => {
  const body = th.closest('table').tBodies[0], dir = th.dataset.d = th.dataset.d === '1' ? '-1' : '1';
  const key = r => { const c = r.cells[i]; return c && c.dataset.v !== undefined ? parseFloat(c.dataset.v)
                                                                                  : (c ? c.textContent : ''); };
  const cmp = (p, q) => typeof p === 'number' && typeof q === 'number'
    ? (isNaN(p) ? 1 : isNaN(q) ? -1 : (p - q) * dir) : String(p).localeCompare(String(q)) * dir;
  [...body.rows].sort((x, y) => cmp(key(x), key(y))).forEach(r => body.appendChild(r));
});
function copyCmd(id) {
  const text = document.getElementById(id).textContent;
  if (navigator.clipboard) navigator.clipboard.writeText(text);
  const range = document.createRange(); range.selectNode(document.getElementById(id));
  getSelection().removeAllRanges(); getSelection().addRange(range);
}"""


class Gallery:
    """Collects a run's image grids and rows of (label, image path) by section; `write` renders index.html."""

    def __init__(self, root: str | Path, title: str):
        self.root, self.title = Path(root), title
        self.sections: list[dict] = []

    def section(self, name: str) -> list[list[tuple[str, Path]]]:
        """A new section; the caller appends rows of (label, image path) to the returned list."""
        rows: list[list[tuple[str, Path]]] = []
        self.sections.append({"name": name, "rows": rows})
        return rows

    def add_grid(self, section: str, path: Path, caption: str, count: int, tile: Sequence[int], nrow: int,
                 upscale: int = 1, pad: int = 2, rows: Sequence | None = None, cols: Sequence | None = None,
                 maps: dict | None = None) -> None:
        """A grid image (facelab.io.grids.save_grid: `count` tiles of `tile` = (h, w) px, `nrow` a row, `pad` px apart,
        scaled by `upscale`) with its row and column labels; maps = {"label", "vmin", "vmax", "cols": [indices] or
        None for all}: those tiles are greyscale values shown in colour with a colour bar."""
        self.sections.append({"name": section, "grid": {
            "path": Path(path), "caption": caption, "count": int(count), "tile": [int(t) for t in tile],
            "nrow": int(nrow), "upscale": int(upscale), "pad": int(pad), "rows": _labels(rows),
            "cols": _labels(cols), "maps": maps}})

    def describe(self) -> dict:
        """The JSON description (gallery.json): paths relative to the run folder."""
        def rel(path) -> str:  # paths are made from the root (runner.out / ...)
            return os.path.relpath(path, self.root)

        sections = []
        for s in self.sections:
            if "grid" in s:
                sections.append({"name": s["name"], "grid": {**s["grid"], "path": rel(s["grid"]["path"])}})
            else:
                sections.append({"name": s["name"], "rows": [[[str(label), rel(p)] for label, p in row]
                                                             for row in s["rows"]]})
        return {"title": self.title, "sections": sections}

    def write(self, metrics: dict | None = None, config_text: str | None = None) -> Path:
        """gallery.json, then index.html (render_run); returns the page's path."""
        _write_text(self.root / DESCRIPTION, json.dumps(self.describe(), indent=1))
        return render_run(self.root, metrics, config_text)


# --- the run page -----------------------------------------------------------------------------------------------------
def render_run(root: str | Path, metrics: dict | None = None, config_text: str | None = None) -> Path:
    """Write root/index.html from the run folder (and `metrics` / `config_text` where the folder has none yet)."""
    root = Path(root)
    described = read_json(root / DESCRIPTION) or _fallback_description(root)
    if metrics is None:
        metrics = read_json(root / "metrics.json") or {}
    if config_text is None and (root / "config.yaml").is_file():
        config_text = (root / "config.yaml").read_text(encoding="utf-8", errors="replace")
    method = _method(config_text)
    parts = [f"<h1>{esc(described.get('title') or 'facelab run')}</h1>",
             f"<p class=sub>{esc(root.name)} · {'finished' if metrics else 'unfinished'}</p>"]
    if method in METHODS:
        parts.append(f"<p>{esc(METHODS[method])}</p>")
    parts.append(command_html(root))
    parts.append("<h2>Key metrics</h2>" + (metrics_table(metrics) or "<p class=muted>none of the known metrics</p>"))
    plots = _plots(metrics)
    if plots:
        parts.append("<h2>Plots</h2>" + "".join(f"<img class=plot alt='{esc(title)}' src='{data_uri(png)}'>"
                                                for title, png in plots))
    previous, sections = None, described.get("sections", [])
    listings = [s for s in sections if len(s.get("rows", [])) > 1]  # per-image listings after the overviews
    for section in [s for s in sections if s not in listings] + listings:
        if section["name"] != previous:  # consecutive sections of one name: one heading
            parts.append(f"<h2>{esc(section['name'])}</h2>")
        previous = section["name"]
        parts.append(grid_html(root, section["grid"]) if "grid" in section else rows_html(root, section["rows"]))
    flat = flatten(metrics)
    parts.append(f"<details><summary>All metrics ({len(flat)})</summary>{all_metrics_table(flat)}</details>")
    if config_text:
        parts.append(f"<details><summary>Config (config.yaml)</summary><pre>{esc(config_text)}</pre></details>")
    parts.append("<p class=muted>Rebuild this page: <code>python -m facelab.gallery RUN_FOLDER</code></p>")
    return write_page(root / PAGE, described.get("title") or "facelab run", "\n".join(parts))


def render_overview(folder: str | Path, runs: Sequence[str], title: str, intro: str = "") -> Path:
    """folder/index.html: a section per run folder (`runs`, relative to `folder`): what the method does, its command,
    key metrics and first grid, and a link to its own page (e.g. `make demo`)."""
    folder = Path(folder)
    parts = [f"<h1>{esc(title)}</h1>", f"<p>{esc(intro)}</p>" if intro else ""]
    for i, name in enumerate(runs):
        run = folder / name
        metrics = read_json(run / "metrics.json") or {}
        method = _method((run / "config.yaml").read_text() if (run / "config.yaml").is_file() else None)
        parts.append(f"<h2>{esc(name)}</h2><p>{esc(METHODS.get(method, ''))} "
                     f"<a href='{href(Path(name) / PAGE)}'>the run's page</a></p>")
        parts.append(command_html(run, f"cmd{i}", heading=False))
        parts.append(metrics_table(metrics))
        grids = [s["grid"] for s in (read_json(run / DESCRIPTION) or {}).get("sections", []) if "grid" in s]
        if grids:
            parts.append(grid_html(folder, {**grids[0], "path": str(Path(name) / grids[0]["path"])}))
    return write_page(folder / PAGE, title, "\n".join(parts))


def command_html(root: Path, element: str = "cmd", heading: bool = True) -> str:
    overrides = run_overrides(root)
    if overrides is None:
        return "<p class=muted>No command line recorded (.hydra/overrides.yaml): run from the Python API.</p>"
    cmd = shlex.join(["python", "-m", "facelab.sample", *overrides])
    return (f"{'<h2>Command</h2>' if heading else ''}<div class=cmd><pre id={element}>{esc(cmd)}</pre>"
            f"<button onclick=\"copyCmd('{element}')\">copy</button></div>")


def run_overrides(root: Path) -> list[str] | None:
    """The run's command-line overrides: Hydra's record, or a study cell's cell.json; None if neither exists."""
    hydra = root / ".hydra" / "overrides.yaml"
    if hydra.is_file():
        from omegaconf import OmegaConf

        try:
            return [str(o) for o in OmegaConf.load(hydra)]
        except Exception:  # a damaged record: the page says there is none
            return None
    cell = read_json(root / "cell.json")
    return [str(o) for o in cell["overrides"]] if cell and "overrides" in cell else None


def _method(config_text: str | None) -> str | None:
    if not config_text:
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.create(config_text).get("method", {}).get("name")
    except Exception:  # a damaged config.yaml: the page still renders
        return None


def _plots(metrics: dict) -> list[tuple[str, bytes]]:
    from facelab.plots import run_plots

    return run_plots(metrics)


# --- metrics ----------------------------------------------------------------------------------------------------------
def flatten(metrics: dict, prefix: str = "") -> dict:
    """{name/sub/leaf: value} of nested metrics."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def known(name: str) -> tuple | None:
    """(unit, better, format, meaning) of a flattened metric name, or None if METRICS has no pattern for it."""
    leaf = name.rsplit("/", 1)[-1]
    for pattern, *info in METRICS:
        if fnmatch.fnmatchcase(leaf, pattern):
            return tuple(info)
    return None


def key_metrics(flat: dict) -> dict:
    """The known numeric metrics (numbers or lists of numbers) of flattened metrics, in METRICS order."""
    found = {name: value for name, value in flat.items() if known(name) and _numeric(value)}
    order = {pattern: i for i, (pattern, *_) in enumerate(METRICS)}

    def rank(name):
        leaf = name.rsplit("/", 1)[-1]
        return next(order[p] for p, *_ in METRICS if fnmatch.fnmatchcase(leaf, p))

    return {name: found[name] for name in sorted(found, key=rank)}


def fmt(value, spec: str = ".4g") -> str:
    """A rounded number (or list of numbers) as text."""
    if isinstance(value, list):
        return " / ".join(fmt(v, spec) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) and spec.endswith(("g", "f")):
        return str(value)
    return format(value, spec)


def better_html(better: str) -> str:
    return {"higher": "higher ↑", "lower": "lower ↓"}.get(better, "")


def metrics_table(metrics: dict) -> str:
    """The key metrics, one row each; where they repeat over two or more groups (edits/Smiling/psnr,
    edits/Eyeglasses/psnr; psnr_before, psnr_after), one row per metric and a column per group."""
    found = key_metrics(flatten(metrics))
    if not found:
        return ""
    split = {name: _group(name) for name in found}
    groups = list(dict.fromkeys(group for group, _ in split.values() if group))
    columns = ([""] if any(not group for group, _ in split.values()) else []) + groups
    if len(groups) < 2:
        columns, cell = [""], {("", name): value for name, value in found.items()}
    else:
        cell = {split[name]: value for name, value in found.items()}
    leaves = list(dict.fromkeys(leaf for _, leaf in cell))
    rows = []
    for leaf in leaves:
        unit, better, spec, meaning = known(leaf)
        values = "".join(f"<td class=n data-v='{sort_value(cell.get((c, leaf)))}'>"
                         f"{esc(fmt(cell[(c, leaf)], spec)) if (c, leaf) in cell else ''}</td>" for c in columns)
        rows.append(f"<tr><td><code>{esc(leaf)}</code></td>{values}<td>{esc(unit)}</td><td>{better_html(better)}</td>"
                    f"<td class=muted>{esc(meaning)}</td></tr>")
    heads = "".join(f"<th>{esc(c or 'value') if len(columns) == 1 else esc(c or 'run')}</th>" for c in columns)
    return (f"<table class='data metrics'><thead><tr><th>metric</th>{heads}<th>unit</th><th>better</th>"
            f"<th>meaning</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _group(name: str) -> tuple[str, str]:
    """(group, metric) of a flattened name: its folder, and before / after for names that end so."""
    group, _, leaf = name.rpartition("/")
    for when in ("before", "after"):
        if leaf.endswith(f"_{when}"):
            return f"{group}/{when}" if group else when, leaf[:-len(when) - 1]
    return group, leaf


def all_metrics_table(flat: dict) -> str:
    rows = "".join(f"<tr><td><code>{esc(k)}</code></td><td>{esc(fmt(v))}</td></tr>" for k, v in flat.items())
    return f"<table class=data><thead><tr><th>name</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>"


def _numeric(value) -> bool:
    """A number, or a flat list of numbers."""
    if isinstance(value, list):
        return bool(value) and all(_number(v) for v in value)
    return _number(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sort_value(value) -> str:
    value = value[0] if isinstance(value, list) and value else value
    return repr(float(value)) if _numeric(value) else "NaN"


# --- grids and rows of images -----------------------------------------------------------------------------------------
def grid_html(root: Path, grid: dict) -> str:
    """The grid image with its column labels above and row labels left of it; map tiles coloured, with a bar."""
    h, w = grid["tile"]
    up, pad, nrow = grid["upscale"], grid["pad"], grid["nrow"]
    nrows = math.ceil(grid["count"] / nrow)
    width, height = (nrow * (w + pad) + pad) * up, (nrows * (h + pad) + pad) * up
    scale = max(1.0, 96 / (w * up))  # tiles at least 96 px wide
    scale = min(scale, max(1100 / width, 0.25)) if width * scale > 1100 else scale
    cell_w, cell_h = (w + pad) * up * scale, (h + pad) * up * scale
    offset = pad * up * scale
    path = root / grid["path"]
    src = href(Path(grid["path"]))
    maps = grid.get("maps")
    if maps and path.is_file():
        coloured = _colour_grid(path, grid, maps)
        src = data_uri(coloured) if coloured else src
    cols, rows = grid.get("cols"), grid.get("rows")
    label_col = "auto " if rows else ""
    style = (f"grid-template-columns:{label_col}{offset:.1f}px repeat({nrow},{cell_w:.1f}px);"
             f"grid-template-rows:{'auto ' if cols else ''}{offset:.1f}px repeat({nrows},{cell_h:.1f}px)")
    first_col, first_row = (2 if rows else 1), (2 if cols else 1)
    cells = []
    for j, label in enumerate(cols or []):
        cells.append(f"<div class=cl style='grid-row:1;grid-column:{first_col + 1 + j}'>{esc(label)}</div>")
    for i, label in enumerate(rows or []):
        cells.append(f"<div class=rl style='grid-row:{first_row + 1 + i};grid-column:1'>{esc(label)}</div>")
    cells.append(f"<img alt='{esc(grid['path'])}' src='{src}' width={width * scale:.0f} height={height * scale:.0f} "
                 f"style='grid-row:{first_row}/span {nrows + 1};grid-column:{first_col}/span {nrow + 1};"
                 "align-self:start'>")
    bar = colour_bar(maps) if maps else ""
    return (f"<div class=grid style='{style}'>{''.join(cells)}</div>{bar}<p class=cap>{esc(grid['caption'])} "
            f"· <a href='{href(Path(grid['path']))}'>{esc(grid['path'])}</a></p>")


def rows_html(root: Path, rows: list, shown: int = 16) -> str:
    """Rows of (label, image): one table, with the labels as its header where every row has the same ones; the first
    `shown` rows (the page of a run of thousands of images stays small)."""
    if not rows:
        return ""
    more = len(rows) - shown
    rows = rows[:shown]
    labels = [label for label, _ in rows[0]]
    same = len(rows) > 1 and all([label for label, _ in row] == labels for row in rows)
    head = "<tr>" + "".join(f"<th>{esc(label)}</th>" for label in labels) + "</tr>" if same else ""
    body = []
    for row in rows:
        cells = "".join(f"<td>{_cell_image(root, label, rel)}{'' if same else f'<br>{esc(label)}'}</td>"
                        for label, rel in row)
        body.append(f"<tr>{cells}</tr>")
    keys = dict.fromkeys(word for row in rows for label, _ in row for word in _text(label).split()[:1] if word in MAPS)
    bar = "".join(colour_bar({"label": f"{key}: {MAPS[key][0]}", "vmin": MAPS[key][1], "vmax": MAPS[key][2]})
                  for key in keys)
    table = f"<table class=cells><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>{bar}"
    if more > 0:
        table += f"<p class=muted>… and {more} more rows: the images are in the run folder.</p>"
    if len(rows) > 4:
        return f"<details><summary>{len(rows) + max(more, 0)} rows</summary>{table}</details>"
    return table


def _cell_image(root: Path, label: str, rel: str) -> str:
    link = href(Path(rel))
    src = link
    words = _text(label).split()
    if words and words[0] in MAPS and (root / rel).is_file():
        title, lo, hi = MAPS[words[0]]
        coloured = _colour_image(root / rel, lo, hi)
        src = data_uri(coloured) if coloured else src
    return f"<a href='{link}'><img alt='{esc(rel)}' src='{src}' style='min-width:96px'></a>"


def colour_bar(maps: dict) -> str:
    lo, hi = float(maps.get("vmin", 0.0)), float(maps.get("vmax", 1.0))
    stops = ",".join(VIRIDIS)
    ticks = "".join(f"<span>{fmt(lo + (hi - lo) * f, '.3g')}</span>" for f in (0, 0.5, 1))
    return (f"<div class=bar><div class=g style='background:linear-gradient(to right,{stops})'></div>"
            f"<div class=ticks>{ticks}</div>{esc(maps.get('label', 'value'))}</div>")


def _lut() -> np.ndarray:
    stops = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in VIRIDIS], dtype=float)
    x = np.linspace(0, 255, len(VIRIDIS))
    return np.stack([np.interp(np.arange(256), x, stops[:, k]) for k in range(3)], 1).round().astype(np.uint8)


def _colour_grid(path: Path, grid: dict, maps: dict) -> bytes | None:
    """The grid with its map tiles in colour (greyscale v -> viridis(v)), as PNG bytes; None if it cannot be read."""
    array = _read_rgb(path)
    if array is None:
        return None
    h, w = grid["tile"]
    up, pad, nrow = grid["upscale"], grid["pad"], grid["nrow"]
    cols = maps.get("cols")
    lut = _lut()
    for i in range(grid["count"]):
        r, c = divmod(i, nrow)
        if cols is not None and c not in cols:
            continue
        top, left = (pad + r * (h + pad)) * up, (pad + c * (w + pad)) * up
        tile = array[top:top + h * up, left:left + w * up]
        if tile.size:
            tile[:] = lut[_grey(tile)]
    return _png(array)


def _colour_image(path: Path, lo: float, hi: float) -> bytes | None:
    array = _read_rgb(path)
    return None if array is None else _png(_lut()[_grey(array)])


def _grey(rgb: np.ndarray) -> np.ndarray:
    """The value of a map image: its grey level, the mean over R, G, B where a map has one value per channel."""
    return rgb.astype(np.float32).mean(-1).round().astype(np.uint8)


def _read_rgb(path: Path) -> np.ndarray | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except Exception:  # an unreadable image: shown as its file instead
        return None


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fallback_description(root: Path) -> dict:
    """A run folder without gallery.json (an older run): its top-level images, one section each."""
    images = sorted(p for p in root.glob("*.png") if not p.name.startswith("."))
    return {"title": f"facelab run {root.name}",
            "sections": [{"name": p.stem, "rows": [[[p.name, p.name]]]} for p in images]}


def _labels(labels: Sequence | None) -> list[str] | None:
    return None if labels is None else [_text(label) for label in labels]


# --- html -------------------------------------------------------------------------------------------------------------
def esc(value: object) -> str:
    """Text for HTML: every character that could open markup or end an attribute escaped."""
    return html.escape(_text(value), quote=True)


def write_page(path: Path, title: str, body: str) -> Path:
    text = (f"<!doctype html><html lang=en><meta charset='utf-8'><meta name=viewport content='width=device-width'>"
            f"<title>{esc(title)}</title><style>{CSS}</style>\n<body>\n{body}\n<script>{JS}</script></body></html>\n")
    return _write_text(path, text)


def _write_text(path: Path, text: str) -> Path:
    """Temp file -> rename: never a truncated file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def href(relative: Path) -> str:
    """A relative URL of a file, whatever bytes its name holds (non-UTF-8 names: percent-encoded bytes)."""
    return html.escape(quote(os.fsencode(relative)), quote=True)


def _text(label: object) -> str:
    """A label as text that encodes as UTF-8: bytes of non-UTF-8 file names (surrogate escapes) shown as \\xNN."""
    text = os.fsdecode(label) if isinstance(label, bytes) else str(label)
    return text.encode("utf-8", "surrogateescape" if _escaped(text) else "backslashreplace").decode(
        "utf-8", "backslashreplace")


def _escaped(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False
