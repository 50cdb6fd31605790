"""Draws perf/results/{throughput,connrate}.png from perf/results/raw.jsonl, one line per target."""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the build machine
import matplotlib.pyplot as plt


def series(records, test, x_key, y_key):
    """Per target, (x, y) points; an x measured several times gets the median of its runs."""
    runs = {}
    for r in records:
        res = r["result"]
        if res["test"] == test:
            runs.setdefault(r["target"], {}).setdefault(res[x_key], []).append(res[y_key])
    return {t: sorted((x, statistics.median(ys)) for x, ys in by_x.items()) for t, by_x in runs.items()}


def draw(path, data, xlabel, ylabel, title, logx):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target, points in data.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=target)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for points in data.values() for x, _ in points}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    results = Path(sys.argv[1])
    records = [json.loads(l) for l in (results / "raw.jsonl").read_text().splitlines() if l]
    draw(results / "throughput.png", series(records, "bulk", "streams", "gbit_per_s"),
         "streams", "Gbit/s", "Bulk throughput vs streams (loopback, proxy on 1 core)", True)
    draw(results / "connrate.png", series(records, "connrate", "concurrency", "conn_per_s"),
         "concurrent connections", "connections/s", "New connections per second vs concurrency", True)


if __name__ == "__main__":
    main()
