"""PNG charts of the benchmarks' results, written next to ``bench/RESULTS.md`` so a reader looks.

Each function takes a benchmark's own result objects and writes one file; matplotlib runs headless.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from bench.common import LevelResult
    from bench.load import BaselineResult
    from bench.overhead import SizeResult

PLOT_DIR: Final = Path(__file__).resolve().parent


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_charts(
    levels: Sequence[LevelResult], baselines: Sequence[BaselineResult], stages: Sequence[str], out: Path
) -> list[Path]:
    """Latency percentiles and images/s against concurrency, and the per-stage split, per size."""
    from bench.common import percentile

    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for size in dict.fromkeys(r.size for r in levels):
        rows = [r for r in levels if r.size == size and r.latencies]
        base = next((b for b in baselines if b.size == size and b.latencies), None)
        if not rows:
            continue
        x = [r.concurrency for r in rows]
        fig, (lat, thr, split) = plt.subplots(1, 3, figsize=(15, 4.2))
        for q, style in ((50, "o-"), (95, "s--"), (99, "^:")):
            lat.plot(x, [percentile(r.latencies, q) for r in rows], style, label=f"service p{q}")
        if base is not None:
            lat.axhline(percentile(base.latencies, 50), color="grey", label="diffusers p50 (sequential)")
        lat.set(xlabel="concurrency", ylabel="seconds per request", title=f"{size}: latency")
        thr.plot(x, [r.images_per_s for r in rows], "o-", label="service")
        if base is not None:
            thr.axhline(base.images_per_s, color="grey", label="diffusers (sequential)")
        thr.set(xlabel="concurrency", ylabel="images/s", title=f"{size}: throughput")
        bottom = [0.0] * len(rows)
        for stage in stages:
            values = [
                r.stages[stage].seconds / max(len(r.latencies), 1) if stage in r.stages else 0.0 for r in rows
            ]
            split.bar([str(c) for c in x], values, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        split.set(xlabel="concurrency", ylabel="seconds per request", title=f"{size}: where the time goes")
        for ax in (lat, thr, split):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        lat.set_xticks(x)
        thr.set_xticks(x)
        fig.tight_layout()
        path = out / f"load-{size}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def overhead_chart(results: Sequence[SizeResult], out: Path) -> Path:
    """Per UNet step: the service against its floor, split into Triton queue, compute and the rest."""
    import statistics

    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    labels, floor, queue, compute, rest = [], [], [], [], []
    for r in results:
        for concurrency in dict.fromkeys(s.concurrency for s in r.service):
            levels = [s for s in r.service if s.concurrency == concurrency]
            step = statistics.median(s.step_s for s in levels) * 1e3
            q = statistics.median(s.triton_queue_s for s in levels) * 1e3
            c = statistics.median(s.triton_compute_s for s in levels) * 1e3
            rows = statistics.median(s.rows_per_execution for s in levels)
            if concurrency == 1:
                ref = statistics.median(f.step_s for f in r.floor) * 1e3
            else:
                ref = (
                    statistics.median(f.graph_s.get(max(2, round(rows)), float("nan")) for f in r.floor) * 1e3
                )
            labels.append(f"{r.size}\nc={concurrency}")
            floor.append(ref)
            queue.append(q)
            compute.append(c)
            rest.append(max(step - q - c, 0.0))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 4.5))
    xs = list(range(len(labels)))
    ax.bar([x - 0.2 for x in xs], floor, width=0.4, color="grey", label="floor (in-process)")
    service = [x + 0.2 for x in xs]
    ax.bar(service, compute, width=0.4, label="Triton compute")
    ax.bar(service, queue, width=0.4, bottom=compute, label="Triton queue")
    ax.bar(
        service,
        rest,
        width=0.4,
        bottom=[a + b for a, b in zip(compute, queue, strict=True)],
        label="service rest (HTTP to Triton, IPC, scheduler math)",
    )
    ax.set_xticks(xs, labels)
    ax.set(ylabel="ms per UNet step", title="Per-step time: service against the same graph in-process")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "overhead.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
