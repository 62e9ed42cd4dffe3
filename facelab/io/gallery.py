"""A self-contained index.html that shows a run's images side by side."""
from __future__ import annotations

import html
import json
from pathlib import Path


class Gallery:
    """Collects rows of (label, image path) per section and writes `index.html` in the run directory."""

    def __init__(self, root: str | Path, title: str):
        self.root, self.title = Path(root), title
        self.sections: list[tuple[str, list[list[tuple[str, Path]]]]] = []

    def section(self, name: str) -> list[list[tuple[str, Path]]]:
        rows: list[list[tuple[str, Path]]] = []
        self.sections.append((name, rows))
        return rows

    def write(self, metrics: dict | None = None, config_text: str | None = None) -> Path:
        parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;margin:4px;"
                 "text-align:center}img{image-rendering:pixelated;min-width:128px;max-width:512px}"
                 "figcaption{font-size:12px}pre{background:#f4f4f4;padding:8px}</style>",
                 f"<h1>{html.escape(self.title)}</h1>"]
        for name, rows in self.sections:
            parts.append(f"<h2>{html.escape(name)}</h2>")
            for row in rows:
                cells = "".join(
                    f"<figure><img src='{html.escape(str(p.relative_to(self.root)))}'>"
                    f"<figcaption>{html.escape(label)}</figcaption></figure>" for label, p in row)
                parts.append(f"<div>{cells}</div>")
        if metrics:
            parts.append(f"<h2>metrics.json</h2><pre>{html.escape(json.dumps(metrics, indent=2))}</pre>")
        if config_text:
            parts.append(f"<h2>config</h2><pre>{html.escape(config_text)}</pre>")
        path = self.root / "index.html"
        path.write_text("\n".join(parts))
        return path
