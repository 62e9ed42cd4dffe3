"""Plots for run and sweep pages (matplotlib, Agg canvas, PNG bytes): only what the metrics hold.

run_plots(metrics): P(attribute) against scale (directions), achieved against target fractions (debias), influence
over t (codiff). sweep_plots(rows): key metrics against network calls or a numeric override across a sweep's jobs
(e.g. PSNR against calls for fuzzy and the samplers).
"""
from __future__ import annotations

import io
import math

Plot = tuple[str, bytes]  # (title, PNG bytes)


def run_plots(metrics: dict) -> list[Plot]:
    plots = []
    for make in (directions_plot, debias_plot, influence_plot):
        try:
            plot = make(metrics)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # metrics of another shape
            plot = None
        except ImportError:  # no matplotlib: pages without plots
            return []
        if plot:
            plots.append(plot)
    return plots


def directions_plot(metrics: dict, attributes: int = 4, directions: int = 6) -> Plot | None:
    """P(attribute) against scale, one panel per direction, the attributes that move most along it."""
    edits = metrics.get("edits")
    if not isinstance(edits, dict) or not edits:
        return None
    first = next(iter(edits.values()))
    if not (isinstance(first, dict) and all(isinstance(v, dict) and _all_numbers(v.values()) for v in first.values())):
        return None  # not {direction: {scale: {attribute: P}}} (cyclediff's edits are per attribute)
    names = list(edits)[:directions]
    fig, axes = _figure(len(names), 3.2, 2.6)
    for ax, name in zip(axes, names):
        by_scale = edits[name]
        scales = sorted(by_scale, key=float)
        attrs = list(by_scale[scales[0]])
        spread = {a: max(by_scale[s][a] for s in scales) - min(by_scale[s][a] for s in scales) for a in attrs}
        moved = sorted(attrs, key=lambda a: -spread[a])
        for attr in moved[:attributes]:
            ax.plot([float(s) for s in scales], [by_scale[s][attr] for s in scales], marker="o", label=attr)
        ax.set(title=f"direction {name}", xlabel="scale", ylabel="P(attribute)", ylim=(-0.03, 1.03))
        ax.legend(fontsize=7)
    return "P(attribute) against scale", _png(fig)


def debias_plot(metrics: dict) -> Plot | None:
    """Achieved class fractions (evaluator, and the h-classifier's during sampling) against the targets."""
    attributes = metrics.get("attributes")
    if not isinstance(attributes, dict):
        return None
    shown = {k: v for k, v in attributes.items() if isinstance(v, dict) and "target" in v
             and any(key in v for key in ("fractions", "hclf_fractions"))}
    if not shown:
        return None
    fig, axes = _figure(len(shown), 3.4, 2.6)
    for ax, (name, entry) in zip(axes, shown.items()):
        series = [("target", entry["target"]), ("achieved (evaluator)", entry.get("fractions")),
                  ("h-classifier", entry.get("hclf_fractions"))]
        series = [(label, values) for label, values in series if values]
        width = 0.8 / len(series)
        for k, (label, values) in enumerate(series):
            ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(values))], values, width, label=label)
        ax.set(title=name, xlabel="class", ylabel="fraction", ylim=(0, 1), xticks=range(len(entry["target"])))
        ax.legend(fontsize=7)
    return "achieved against target fractions", _png(fig)


def influence_plot(metrics: dict) -> Plot | None:
    """Mean influence of each modality over t (learned maps and final weights)."""
    influence = metrics.get("influence")
    if not isinstance(influence, dict) or "t" not in influence:
        return None
    t = influence["t"]
    kinds = [k for k in ("learned", "weights") if isinstance(influence.get(k), dict)]
    if not kinds:
        return None
    fig, axes = _figure(len(kinds), 3.6, 2.6)
    for ax, kind in zip(axes, kinds):
        for name, values in influence[kind].items():
            ax.plot(t, values, marker="o", label=name)
        region = influence.get("region")
        ax.set(title=f"{kind} influence" + (f" ({region})" if region else ""), xlabel="t", ylabel="mean",
               ylim=(-0.03, 1.03))
        ax.invert_xaxis()  # sampling runs from t = T to 0
        ax.legend(fontsize=7)
    return "influence over t", _png(fig)


def sweep_plots(rows: list[dict], overrides: list[str], metrics: list[str], panels: int = 4) -> list[Plot]:
    """Each key metric (`metrics`) against the network calls per image, or else against the first numeric override
    that varies, over the completed jobs (`rows`: flat dicts); [] if nothing varies."""
    x_name = None
    for name in ["network_calls_per_image", *overrides]:
        values = [_number(row.get(name)) for row in rows]
        if len({v for v in values if v is not None}) > 1:
            x_name = name
            break
    if x_name is None:
        return []
    ys = [m for m in metrics if m != x_name and "second" not in m
          and sum(_number(row.get(m)) is not None for row in rows) > 1][:panels]
    if not ys:
        return []
    # one line per value of the other varying overrides that are not numbers (numbers: positions along x)
    groups = [o for o in overrides if o != x_name and len({str(row.get(o)) for row in rows}) > 1
              and any(_number(row.get(o)) is None for row in rows)]
    fig, axes = _figure(len(ys), 3.2, 2.6)
    for ax, y in zip(axes, ys):
        series: dict[str, list] = {}
        for row in rows:
            x, v = _number(row.get(x_name)), _number(row.get(y))
            if x is not None and v is not None:
                key = ", ".join(f"{g}={row.get(g)}" for g in groups)
                series.setdefault(key, []).append((x, v))
        for key, points in series.items():
            points.sort()
            ax.plot(*zip(*points), marker="o", label=key or None)
        ax.set(xlabel=x_name, ylabel=y.rsplit("/", 1)[-1])
        if any(series) and len(series) <= 8:
            ax.legend(fontsize=6)
    return [(f"key metrics against {x_name}", _png(fig))]


def _figure(panels: int, width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend or state

    cols = min(panels, 3)
    fig = Figure(figsize=(width * cols, height * math.ceil(panels / cols)), dpi=90, layout="constrained")
    axes = fig.subplots(math.ceil(panels / cols), cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    return fig, axes[:panels]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _all_numbers(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
