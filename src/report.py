"""The accuracy-vs-GFLOPs curve as a terminal table, JSON, CSV and a PNG plot; a checkpoint's
stored results as a table."""

from __future__ import annotations

import csv
import io
import itertools
import os

from .atomic import write_atomic, write_json, write_text

CURVE_FIELDS = ("budget_gflops", "expected_gflops", "top1", "exit_fractions", "thresholds")
PLOT_HINT = "pip install matplotlib (or -r requirements-plot.txt) to get budget_curve.png"


def aligned(rows: list[list[str]]) -> list[str]:
    """Rows of cells (the first a header) as lines, each column right-aligned to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]


def table(curve: list[dict], exits: dict, gflops: list[float]) -> str:
    """The per-exit results, then one line per budget, columns aligned."""
    lines = aligned([["exit", "GFLOPs", "top-1", "top-5"]]
                    + [[str(k + 1), f"{cost:.4g}", f"{exits['top1'][k]:.2f}", f"{exits['top5'][k]:.2f}"]
                       for k, cost in enumerate(gflops)])
    if curve:
        lines.append("")
        lines += aligned([["budget", "expected", "top-1", "exit fractions"]]
                         + [[f"{row['budget_gflops']:.4g}", f"{row['expected_gflops']:.4g}", f"{row['top1']:.2f}",
                             " ".join(f"{f:.3f}" for f in row["exit_fractions"])] for row in curve])
    return "\n".join(lines)


def _cell(values: list, k: int, spec: str) -> str:
    if k >= len(values):
        return "-"
    value = values[k]
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def stored_table(meta: dict, source: str) -> str:
    """A checkpoint's stored results as aligned tables under a line naming `source` and the model, or "" if it
    stores none: every exit's GFLOPs and accuracy (training's best.json: validation top-1 / top-5; a converted
    official checkpoint: its GFLOPs and anytime top-1 next to ours), then the official release's budgeted points."""
    gflops = meta.get("exit_gflops") or []
    official = meta.get("flops") or []
    val = meta.get("val") if isinstance(meta.get("val"), dict) else {}
    top1, top5 = val.get("top1") or meta.get("anytime_classification") or [], val.get("top5") or []
    columns = [("GFLOPs", gflops, ".4g"), ("official GFLOPs", official, ".4g"), ("top-1", top1, ".2f"),
               ("top-5", top5, ".2f")]
    columns = [column for column in columns if column[1]]
    exits = max((len(values) for _, values, _ in columns), default=0)
    lines = aligned([["exit"] + [name for name, _, _ in columns]]
                    + [[str(k + 1)] + [_cell(values, k, spec) for _, values, spec in columns] for k in range(exits)])
    budgeted = meta.get("budgeted_batch_classification")
    if isinstance(budgeted, list) and len(budgeted) == 2 and all(isinstance(part, list) for part in budgeted):
        points = range(min(len(budgeted[0]), len(budgeted[1])))
        lines += ["", "budgeted batch classification (official):"]
        lines += aligned([["GFLOPs", "top-1"]] + [[_cell(budgeted[0], i, ".4g"), _cell(budgeted[1], i, ".2f")]
                                                  for i in points])
    if not exits and not budgeted:
        return ""
    model = meta.get("model") or "a model"
    epoch = f", epoch {meta['epoch']}" if "epoch" in meta else ""
    count = f"; accuracy on {val['count']} validation images" if "count" in val else ""
    return "\n".join([f"{source}: {model}{epoch}{count}", *lines])


def write_curve(curve: list[dict], output_dir: str) -> list[str]:
    """budget_curve.json and budget_curve.csv (each written whole or not at all); returns their paths."""
    json_path = os.path.join(output_dir, "budget_curve.json")
    write_json(json_path, curve)
    csv_path = os.path.join(output_dir, "budget_curve.csv")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CURVE_FIELDS)
    for row in curve:
        writer.writerow([row["budget_gflops"], row["expected_gflops"], row["top1"],
                         " ".join(map(str, row["exit_fractions"])), " ".join(map(str, row["thresholds"]))])
    write_text(csv_path, text.getvalue())
    return [json_path, csv_path]


def budget_groups(curve: list[dict]) -> list[tuple[str, float, float]]:
    """(label, GFLOPs, top-1) of each distinct point of the curve: budgets are numbered from 1 in the table's
    order, and consecutive budgets that reach the same point share one label ("5-7")."""
    groups = []
    numbered = enumerate(curve, start=1)
    for point, rows in itertools.groupby(numbered, key=lambda item: (item[1]["expected_gflops"], item[1]["top1"])):
        numbers = [number for number, _ in rows]
        label = str(numbers[0]) if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}"
        groups.append((label, *point))
    return groups


def draw_curve(curve: list[dict], exits: dict, gflops: list[float], title: str,
               backbone: tuple[float, float] | None = None):
    """The figure of budget_curve.png: the DVT curve with each budget's point numbered as in the table, each
    exit's own point and (if given) the backbone's. The axes keep a margin so that no label is clipped.

    A bare Figure on an Agg canvas: no pyplot, so no global backend switch and nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["expected_gflops"] for r in curve], [r["top1"] for r in curve], "-o", ms=4,
            label=f"DVT (early exit), {len(curve)} budgets")
    for label, x, y in budget_groups(curve):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(-4, 5), ha="right", fontsize=7,
                    color="tab:blue")
    ax.plot(gflops, exits["top1"], "s", label="each exit, all images")
    for k, (x, y) in enumerate(zip(gflops, exits["top1"], strict=True)):
        ax.annotate(f"exit {k + 1}", (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8)
    if backbone:
        ax.plot([backbone[0]], [backbone[1]], "^", label="backbone")
    ax.margins(x=0.14, y=0.14)
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def plot_curve(curve: list[dict], exits: dict, gflops: list[float], output_dir: str, title: str,
               backbone: tuple[float, float] | None = None) -> str | None:
    """Write budget_curve.png (`draw_curve`); None without matplotlib, which is an optional extra."""
    try:
        fig = draw_curve(curve, exits, gflops, title, backbone)
    except ImportError:
        return None
    path = os.path.join(output_dir, "budget_curve.png")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path
