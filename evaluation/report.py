"""Evaluation results as Markdown tables and a guidance-sweep plot (PIL only, no matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from data.shapes import NUM_DIGITS

SET_LABELS = {"seen": "seen wordings", "held-out": "held-out wordings", "all": "all"}


def percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str) -> str:
    """A GitHub Markdown table; ``align`` holds one of l/r per column."""
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def result_tables(result: dict) -> str:
    """Per prompt set, per digit and per template tables of one guidance scale."""
    sets = result["sets"]
    summary = markdown_table(
        [
            "prompts",
            "samples",
            "accuracy",
            "FMD",
            "FMD floor (real vs real)",
            "thickness (real)",
            "width (real)",
            "specks (real)",
        ],  # fmt: skip
        [
            [
                SET_LABELS[name],
                s["samples"],
                percent(s["accuracy"]),
                f"{s['fmd']:.2f}",
                f"{s['fmd_floor']:.2f}",
                *(f"{s['shape'][k]:.2f} ({s['real_shape'][k]:.2f})" for k in ("thickness", "width")),
                f"{percent(s['speck_rate'])} ({percent(s['real_speck_rate'])})",
            ]
            for name, s in sets.items()
        ],
        "lrrrrrrr",
    )
    by_digit = markdown_table(
        ["accuracy by digit", *map(str, range(NUM_DIGITS))],
        [[SET_LABELS[name], *map(percent, sets[name]["per_digit"])] for name in sets if name != "all"],
        "l" + "r" * NUM_DIGITS,
    )
    by_template = markdown_table(
        ["template", "prompts", "samples", "accuracy"],
        [[f"`{t['template']}`", t["set"], t["samples"], percent(t["accuracy"])] for t in result["per_template"]],
        "llrr",
    )
    title = f"guidance scale {result['guidance_scale']:g}: {sets_total(sets)} samples in {result['seconds']:.1f} s"
    return f"### {title}\n\n{summary}\n\n{by_digit}\n\n{by_template}\n"


def sets_total(sets: dict) -> int:
    return sets["all"]["samples"] if "all" in sets else sum(s["samples"] for s in sets.values())


def sweep_table(results: Sequence[dict]) -> str:
    """One row per guidance scale: the accuracy/diversity trade-off at a glance."""
    names = [n for n in results[0]["sets"] if n != "all"]
    header = ["guidance", *[f"accuracy ({n})" for n in names], "FMD (all)", "FMD floor", "seconds"]
    rows = []
    for r in results:
        overall = r["sets"].get("all", r["sets"][names[0]])
        rows.append(
            [
                f"{r['guidance_scale']:g}",
                *[percent(r["sets"][n]["accuracy"]) for n in names],
                f"{overall['fmd']:.2f}",
                f"{overall['fmd_floor']:.2f}",
                f"{r['seconds']:.1f}",
            ]
        )
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1))


# ----------------------------------------------------------------------------- plot
PANEL_W, PANEL_H, MARGIN = 360, 260, 48
COLOURS = {"seen": (31, 119, 180), "held-out": (255, 127, 14), "all": (44, 160, 44), "floor": (120, 120, 120)}


def plot_sweep(results: Sequence[dict], title: str) -> Image.Image:
    """Accuracy and FMD against the guidance scale, one line per prompt set, the floor in grey."""
    scales = [f"{r['guidance_scale']:g}" for r in results]
    names = list(results[0]["sets"])
    accuracy = {n: [100 * r["sets"][n]["accuracy"] for r in results] for n in names}
    fmd = {n: [r["sets"][n]["fmd"] for r in results] for n in names}
    fmd["floor"] = [r["sets"][names[-1]]["fmd_floor"] for r in results]
    image = Image.new("RGB", (2 * PANEL_W + MARGIN, PANEL_H + 2 * MARGIN), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 8), title, fill="black")
    draw_panel(draw, (MARGIN, MARGIN), "conditional accuracy (%)", scales, accuracy)
    draw_panel(draw, (PANEL_W + MARGIN + MARGIN // 2, MARGIN), "Frechet MNIST distance (lower is better)", scales, fmd)
    return image


def draw_panel(
    draw: ImageDraw.ImageDraw, origin: tuple[int, int], label: str, scales: Sequence[str], lines: dict[str, list[float]]
) -> None:
    """Axes with y ticks at the ends and middle of the range and x ticks at each guidance scale (evenly
    spaced), then the lines."""
    x0, y0 = origin
    w, h = PANEL_W - MARGIN, PANEL_H - MARGIN // 2
    values = [v for series in lines.values() for v in series]
    low, high = min(values), max(values)
    pad = (high - low) * 0.1 or 1.0
    low, high = max(low - pad, 0.0), high + pad  # both quantities are non-negative
    draw.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
    draw.text((x0, y0 - 14), label, fill="black")
    draw.text((x0 + w // 2 - 40, y0 + h + 18), "guidance scale", fill="black")
    for value, y in ((high, y0), ((high + low) / 2, y0 + h // 2), (low, y0 + h)):
        draw.text((x0 - 40, y - 5), f"{value:.3g}", fill="black")
    xs = [x0 + w * (i + 0.5) / len(scales) for i in range(len(scales))]
    for x, scale in zip(xs, scales):
        draw.text((x - 3, y0 + h + 4), scale, fill="black")
    for k, (name, series) in enumerate(lines.items()):
        points = [(x, y0 + h * (high - v) / (high - low)) for x, v in zip(xs, series)]
        colour = COLOURS[name]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((x0 + 6, y0 + 4 + 12 * k), name, fill=colour)
