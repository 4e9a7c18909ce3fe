"""The run report: ``report.md`` and ``report.html`` with metric tables and figures.

``write_report`` takes plain Python values (numbers, PIL images, lists of points), so the caller
(the evaluation runner, the quickstart's report stage) decides what was measured and this module
only decides how it looks.  Everything goes into one folder::

    out_dir/report.md                 metric tables, sample tables, figure links
    out_dir/report.html               the same, readable in a browser
    out_dir/figures/t2i_grid.png      text-to-image samples under their prompts, green / red frames
    out_dir/figures/vqa_examples.png  VQA images with question, answer and prediction
    out_dir/figures/loss_curves.png   training loss against step, one line per run
    out_dir/figures/speed_quality.png quality against speed across sampler settings
    out_dir/images/*.png              each sample image, nearest-neighbour upscaled

Both documents reference the images by relative path, so the folder is self-contained and can
be moved or zipped as a whole; ``embed_images=True`` also inlines them into the HTML as base64
(one file that opens anywhere).

Figures use ``matplotlib.figure.Figure`` objects directly (no ``pyplot``, no backend switch, no
global state), so importing or calling this module never changes the caller's matplotlib
setup.  32-px images are upscaled with nearest-neighbour (``UPSCALE``) before plotting: the
flat colours and hard edges the ShapesEval checker sees stay visible instead of being blurred.
"""

from __future__ import annotations

import base64
import html
import math
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["write_report", "flatten_metrics", "format_value", "UPSCALE"]

UPSCALE = 4  # nearest-neighbour factor for sample images (32 px -> 128 px)
OK_COLOR = "#2ca02c"  # green frame: prompt satisfied / answer right
BAD_COLOR = "#d62728"  # red frame
GRID_COLUMNS = 6


# ---------------------------------------------------------------------------------- values
def format_value(v: Any) -> str:
    """One table cell: 4 significant digits for floats, ``yes`` / ``no`` for booleans."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    if v is None:
        return "-"
    return str(v)


def flatten_metrics(metrics: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; lists of scalars are joined, other lists skipped."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_metrics(v, key + "/"))
        elif isinstance(v, (list, tuple)):
            if all(isinstance(x, (int, float, str, bool)) or x is None for x in v):
                out[key] = ", ".join(format_value(x) for x in v)
        else:
            out[key] = v
    return out


def _metric_sections(metrics: Mapping) -> list[tuple[str, dict[str, Any]]]:
    """Top-level scalars form "Summary"; every top-level mapping becomes its own section."""
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    sections = [("Summary", flatten_metrics(scalars))] if scalars else []
    sections += [(str(k), flatten_metrics(v)) for k, v in metrics.items() if isinstance(v, Mapping)]
    return [(name, rows) for name, rows in sections if rows]


def _columns(rows: Sequence[Mapping]) -> list[str]:
    """Union of the rows' keys, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def _answer_ok(answer: str, prediction: str) -> bool:
    return str(answer).strip().lower() == str(prediction).strip().lower()


# ---------------------------------------------------------------------------------- images
def _upscale(image, factor: int = UPSCALE):
    """PIL image (or (H, W, 3) array) -> RGB PIL image, nearest-neighbour upscaled."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        import numpy as np

        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _frame(ax, color: str, width: float = 5.0) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _grid_shape(n: int, columns: int = GRID_COLUMNS) -> tuple[int, int]:
    cols = max(1, min(columns, n))
    return math.ceil(n / cols), cols


def _t2i_figure(samples: Sequence[tuple[str, Any, bool]], path: Path) -> None:
    from matplotlib.figure import Figure

    rows, cols = _grid_shape(len(samples))
    fig = Figure(figsize=(2.2 * cols, 3.1 * rows))
    for i, (prompt, image, ok) in enumerate(samples):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(_upscale(image), interpolation="nearest")
        _frame(ax, OK_COLOR if ok else BAD_COLOR)
        ax.set_title("\n".join(textwrap.wrap(prompt, 26)[:4]), fontsize=7)
    n_ok = sum(bool(ok) for _, _, ok in samples)
    fig.suptitle(f"text-to-image: {n_ok}/{len(samples)} prompts satisfied (green frame)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _vqa_figure(examples: Sequence[tuple[Any, str, str, str]], path: Path) -> None:
    from matplotlib.figure import Figure

    rows, cols = _grid_shape(len(examples), columns=4)
    fig = Figure(figsize=(2.8 * cols, 3.2 * rows))
    for i, (image, question, answer, prediction) in enumerate(examples):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(_upscale(image), interpolation="nearest")
        ok = _answer_ok(answer, prediction)
        _frame(ax, OK_COLOR if ok else BAD_COLOR)
        q = "\n".join(textwrap.wrap(f"Q: {question}", 32)[:3])
        ax.set_title(q, fontsize=7)
        ax.set_xlabel(f"answer: {answer}\nmodel: {prediction}", fontsize=7, color=OK_COLOR if ok else BAD_COLOR)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _loss_figure(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    positive = True
    for name, points in curves.items():
        if not points:
            continue
        steps, losses = zip(*points)
        positive &= min(losses) > 0
        ax.plot(steps, losses, label=name, linewidth=1.2)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


SPEED_KEYS = (("seconds_per_sample", "seconds per sample (lower is faster)"),
              ("tokens_per_s", "tokens per second (higher is faster)"))


def _speed_figure(rows: Sequence[Mapping], path: Path) -> None:
    """One panel per speed measure present; each point labelled with its setting and NFE."""
    from matplotlib.figure import Figure

    panels = [(k, label) for k, label in SPEED_KEYS if any(r.get(k) is not None for r in rows)]
    fig = Figure(figsize=(5.6 * max(1, len(panels)), 4.2))
    for p, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        pts = [r for r in rows if r.get(key) is not None and r.get("quality") is not None]
        ax.scatter([r[key] for r in pts], [r["quality"] for r in pts], s=30, zorder=3)
        for r in pts:
            note = str(r.get("setting", ""))
            if r.get("nfe") is not None:
                note += f" (NFE {format_value(r['nfe'])})"
            ax.annotate(note, (r[key], r["quality"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("quality")
        ax.grid(True, alpha=0.3)
    fig.suptitle("speed vs quality across sampler settings", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------- documents
def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], raw_columns: Sequence[int] = ()) -> str:
    """Cells are escaped, except those in ``raw_columns`` (already HTML, e.g. an ``<img>``)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f"<td>{c if i in raw_columns else html.escape(str(c))}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Img:
    """How the HTML points at an image: a relative path, or a base64 data URI."""

    def __init__(self, out_dir: Path, embed: bool):
        self.out_dir, self.embed = out_dir, embed

    def src(self, path: Path) -> str:
        if self.embed:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        return html.escape(path.relative_to(self.out_dir).as_posix())

    def tag(self, path: Path, alt: str, width: int | None = None) -> str:
        w = f' width="{width}"' if width else ""
        return f'<img src="{self.src(path)}" alt="{html.escape(alt)}"{w}>'


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f4f4f4}img{image-rendering:pixelated}.ok{color:#2ca02c}.bad{color:#d62728}"""


def write_report(
    out_dir: str | Path,
    metrics: Mapping | None = None,
    t2i_samples: Sequence[tuple[str, Any, bool]] = (),
    vqa_examples: Sequence[tuple[Any, str, str, str]] = (),
    loss_curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    speed_quality: Sequence[Mapping] = (),
    summary_rows: Sequence[Mapping] = (),
    title: str = "mmdiff report",
    embed_images: bool = False,
) -> dict:
    """Write ``report.md``, ``report.html`` and their figures into ``out_dir``.

    metrics:       nested dict; top-level scalars form the "Summary" table, each top-level dict
                   its own table (nested keys joined with ``/``).
    t2i_samples:   ``(prompt, PIL image, satisfied)`` per generated image.
    vqa_examples:  ``(PIL image, question, answer, prediction)``.
    loss_curves:   ``{run name: [(step, loss), ...]}``.
    speed_quality: ``{"setting", "seconds_per_sample" or "tokens_per_s", "quality", "nfe"}`` rows.
    summary_rows:  free-form rows (dicts) shown first as one table, e.g. one row per stage.

    Returns ``{"markdown": path, "html": path, "figures": [paths]}`` (paths as strings).
    """
    out = Path(out_dir)
    fig_dir, img_dir = out / "figures", out / "images"
    fig_dir.mkdir(parents=True, exist_ok=True)
    metrics = dict(metrics or {})
    curves = {k: list(v) for k, v in (loss_curves or {}).items() if v}
    speed_rows = [dict(r) for r in speed_quality]
    figures: list[Path] = []
    img = _Img(out, embed_images)
    md = [f"# {title}", ""]
    hd = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
          f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]

    def section(name: str) -> None:
        md.extend([f"## {name}", ""])
        hd.append(f"<h2>{html.escape(name)}</h2>")

    def figure(path: Path, alt: str) -> None:
        figures.append(path)
        md.extend([f"![{alt}]({path.relative_to(out).as_posix()})", ""])
        hd.append(f"<p>{img.tag(path, alt)}</p>")

    if summary_rows:
        cols = _columns(summary_rows)
        rows = [[format_value(r.get(c)) for c in cols] for r in summary_rows]
        section("Overview")
        md.extend(_md_table(cols, rows))
        hd.append(_html_table(cols, rows))

    for name, table in _metric_sections(metrics):
        rows = [[k, format_value(v)] for k, v in table.items()]
        section(f"Metrics: {name}")
        md.extend(_md_table(["metric", "value"], rows))
        hd.append(_html_table(["metric", "value"], rows))

    if t2i_samples:
        section("Text-to-image samples")
        _t2i_figure(t2i_samples, fig_dir / "t2i_grid.png")
        figure(fig_dir / "t2i_grid.png", "text-to-image samples")
        img_dir.mkdir(exist_ok=True)
        md_rows, html_rows = [], []
        for i, (prompt, image, ok) in enumerate(t2i_samples):
            path = img_dir / f"t2i_{i:03d}.png"
            _upscale(image).save(path)
            mark = "yes" if ok else "no"
            md_rows.append([f"![t2i {i}]({path.relative_to(out).as_posix()})", prompt, mark])
            html_rows.append([img.tag(path, f"t2i {i}", 64), prompt,
                              f"<span class='{'ok' if ok else 'bad'}'>{mark}</span>"])
        md.extend(_md_table(["image", "prompt", "satisfied"], md_rows))
        hd.append(_html_table(["image", "prompt", "satisfied"], html_rows, raw_columns=(0, 2)))

    if vqa_examples:
        section("VQA examples")
        _vqa_figure(vqa_examples, fig_dir / "vqa_examples.png")
        figure(fig_dir / "vqa_examples.png", "VQA examples")
        img_dir.mkdir(exist_ok=True)
        md_rows, html_rows = [], []
        for i, (image, question, answer, prediction) in enumerate(vqa_examples):
            path = img_dir / f"vqa_{i:03d}.png"
            _upscale(image).save(path)
            mark = "yes" if _answer_ok(answer, prediction) else "no"
            md_rows.append([f"![vqa {i}]({path.relative_to(out).as_posix()})", question, answer, prediction, mark])
            html_rows.append([img.tag(path, f"vqa {i}", 64), question, answer, prediction,
                              f"<span class='{'ok' if mark == 'yes' else 'bad'}'>{mark}</span>"])
        header = ["image", "question", "answer", "prediction", "correct"]
        md.extend(_md_table(header, md_rows))
        hd.append(_html_table(header, html_rows, raw_columns=(0, 4)))

    if curves:
        section("Training loss")
        _loss_figure(curves, fig_dir / "loss_curves.png")
        figure(fig_dir / "loss_curves.png", "training loss curves")
        rows = [[name, len(pts), format_value(pts[0][1]), format_value(pts[-1][1]), format_value(pts[-1][0])]
                for name, pts in curves.items()]
        header = ["run", "points", "first loss", "last loss", "last step"]
        md.extend(_md_table(header, rows))
        hd.append(_html_table(header, rows))

    if speed_rows:
        section("Speed vs quality")
        _speed_figure(speed_rows, fig_dir / "speed_quality.png")
        figure(fig_dir / "speed_quality.png", "speed vs quality")
        cols = _columns(speed_rows)
        rows = [[format_value(r.get(c)) for c in cols] for r in speed_rows]
        md.extend(_md_table(cols, rows))
        hd.append(_html_table(cols, rows))

    hd.append("</body></html>")
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    html_path.write_text("\n".join(hd) + "\n", encoding="utf-8")
    return {"markdown": str(md_path), "html": str(html_path), "figures": [str(p) for p in figures]}
