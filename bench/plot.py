"""The benchmark's picture, drawn from the results JSON of the same run as its table: rows/s per
contender against the ceiling, and the client's resident memory over time for flux and
pgloader on the same axes."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # a file, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

COLOURS = {"flux": "#1f77b4", "pgloader": "#d62728", "original": "#7f7f7f", "ceiling": "#2ca02c"}
MEMORY_OF = ("flux", "pgloader")


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose wall time is the median one (the lower middle for an even count)."""
    ordered = sorted(runs, key=lambda r: r["wall"])
    return ordered[(len(ordered) - 1) // 2]


def draw(results: dict[str, Any], path: Path) -> None:
    """Write the two-panel PNG for ``results`` (the bench's results JSON) to ``path``."""
    rows = results["sessions"] + results["messages"]
    measured = {
        name: c["runs"] for name, c in results["contenders"].items() if c["runs"]
    }  # contenders not installed have no runs
    rates = {
        name: rows / statistics.median(r["wall"] for r in runs) for name, runs in measured.items()
    }
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    fig.suptitle(
        f"{results['sessions']:,} sessions + {results['messages']:,} messages"
        f" ({rows:,} rows), median of {results['repeat']} run(s)"
    )

    names = [n for n in rates if n != "ceiling"]
    bars = speed.barh(
        names, [rates[n] for n in names], color=[COLOURS.get(n, "#999") for n in names]
    )
    speed.invert_yaxis()
    ceiling = rates.get("ceiling")
    if ceiling:
        speed.axvline(ceiling, color=COLOURS["ceiling"], linestyle="--", linewidth=2)
        speed.text(
            ceiling, len(names) - 0.45, f" ceiling\n {ceiling:,.0f}", color=COLOURS["ceiling"],
            va="bottom", ha="left",
        )  # fmt: skip
    for bar, name in zip(bars, names, strict=True):
        share = f" ({rates[name] / ceiling:.0%} of ceiling)" if ceiling else ""
        speed.text(
            bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {rates[name]:,.0f}{share}",
            va="center", ha="left", fontsize=9,
        )  # fmt: skip
    top = max([*rates.values(), 1.0])
    speed.set_xlim(0, top * 1.45)
    speed.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    speed.set_xlabel("rows/s (higher is better)")
    speed.set_title("Throughput against the ceiling (COPY of ready rows + keys)")

    for name in MEMORY_OF:
        if name not in measured:
            continue
        series = _median_run(measured[name]).get("rss_series") or []
        if series:
            seconds, mb = zip(*series, strict=True)
            memory.plot(seconds, mb, label=name, color=COLOURS[name], linewidth=2)
    memory.set_xlabel("seconds since start")
    memory.set_ylabel("client resident memory, MB")
    memory.set_ylim(bottom=0)
    memory.set_title("Client RSS over time (median run)")
    if memory.lines:
        memory.legend(loc="lower right")
    else:
        memory.text(
            0.5, 0.5, "flux and pgloader not measured", ha="center", transform=memory.transAxes
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
