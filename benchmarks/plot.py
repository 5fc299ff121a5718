"""``lguest-jit bench ... --plot=FILE``: the reports as horizontal bar charts.

One panel per benchmark and unit (a benchmark reporting requests/s and MB/s
gets two), cases down the side so their names read horizontally, one bar
per measured side (Numba, pure Python, the physical reference), the value
axis logarithmic and labelled with its unit.  Ratios are not drawn: they
are the gaps between the bars.
"""
from __future__ import annotations

import math


def _unit(rep: dict, side: str, metric: str) -> str | None:
    """The unit of ``rep[side][metric]``, or None for what is not plotted
    (exit statuses, ratios, notes)."""
    if side.endswith("_us"):
        return "microseconds per exit (lower is better)"
    if metric.endswith("MB_per_s"):
        return "MB/s (log scale)"
    if "_per_s" in metric:
        # The report's unit names what is counted: "read requests per second and MB/s; ..."
        what = rep.get("unit", "operations per second").split(";")[0].split(",")[0].replace(" and MB/s", "")
        return f"{what} (log scale)"
    if metric.startswith("seconds_"):
        return "wall seconds (lower is better)"
    return None


def _panels(reports: list) -> list:
    """[(title, unit, {metric: {side: value}})] in report order."""
    panels = {}
    for rep in reports:
        if "skipped" in rep:
            continue
        for side, values in rep.items():
            if not isinstance(values, dict) or "_vs_" in side or side == "speedup":
                continue
            for metric, v in values.items():
                unit = _unit(rep, side, metric)
                if unit is None or not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                    continue
                key = (rep["benchmark"], unit)
                panels.setdefault(key, {}).setdefault(metric, {})[side] = v
    return [(bench, unit, metrics) for (bench, unit), metrics in panels.items()]


def plot(reports: list, path: str) -> int:
    """Draw ``reports`` into the PNG ``path``; returns how many panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = _panels(reports)
    if not panels:
        return 0
    heights = [1.2 + 0.22 * len(m) * max(len(s) for s in m.values()) for _, _, m in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (bench, unit, metrics) in zip(axes[:, 0], panels):
        sides = list(dict.fromkeys(s for by_side in metrics.values() for s in by_side))
        names = list(metrics)
        bar = 0.8 / len(sides)
        for j, side in enumerate(sides):
            rows = [i for i, m in enumerate(names) if side in metrics[m]]
            ax.barh([i + (j - (len(sides) - 1) / 2) * bar for i in rows], [metrics[names[i]][side] for i in rows],
                    bar, label=side)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()       # first case on top, as in the table
        if "log scale" in unit:
            ax.set_xscale("log")
            # Bars start a decade below the smallest value, so the shortest is visible.
            values = [v for by_side in metrics.values() for v in by_side.values()]
            left = 10 ** math.floor(math.log10(min(values)))
            ax.set_xlim(left=left)
            if max(values) >= 100 * left:
                ax.xaxis.set_minor_formatter(NullFormatter())   # decades only: 2x10^5, 3x10^5... overlap
        ax.set_xlabel(unit, fontsize=9)
        ax.set_ylabel("metric", fontsize=9)
        ax.set_title(f"bench {bench}", fontsize=10, loc="left")
        ax.grid(axis="x", which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(panels)


# What a knob's values count, for the x axis of a sweep.
KNOB_UNITS = {"queue-size": "entries per queue", "blk-poll-us": "microseconds", "seg-max": "segments per request",
              "event-idx": "offered", "indirect": "offered"}


def sweep_series(rep: dict) -> list:
    """[(unit, {metric: [value at each knob value]})] of a `bench sweep`
    report, one entry per unit (as the bar panels split them)."""
    values = rep["values"]
    by_unit = {}
    for i, v in enumerate(values):
        col = rep[f"{rep['param']}={v}"]
        for metric, x in col.items():
            unit = _unit({"unit": rep.get("unit", "")}, "numba", metric)
            if unit is None or not isinstance(x, (int, float)) or isinstance(x, bool):
                continue
            by_unit.setdefault(unit, {}).setdefault(metric, [None] * len(values))[i] = x
    return list(by_unit.items())


def sweep_figure(rep: dict):
    """The figure of a sweep: one panel per unit, the knob's values along the
    x axis (in the order given, evenly spaced), one line per case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sweep_series(rep)
    param, values = rep["param"], rep["values"]
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 3.6 * len(series)), squeeze=False)
    for ax, (unit, metrics) in zip(axes[:, 0], series):
        for metric, ys in metrics.items():
            pts = [(i, y) for i, y in enumerate(ys) if y is not None and y > 0]
            ax.plot([i for i, _ in pts], [y for _, y in pts], marker="o", label=metric)
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(f"{param} ({KNOB_UNITS.get(param, 'value')})", fontsize=9)
        ax.set_ylabel(unit, fontsize=9)
        if "log scale" in unit:
            ax.set_yscale("log")
        ax.set_title(f"bench sweep {rep['bench']}: {param}", fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_sweep(rep: dict, path: str) -> None:
    """Draw a `bench sweep` report into the PNG ``path``."""
    import matplotlib.pyplot as plt
    fig = sweep_figure(rep)
    fig.savefig(path, dpi=110)
    plt.close(fig)
