"""How a GRPO step's cost grows with work: batch size, response length, model size.

Each point is alignkit's GRPO step (same phases as the main table) in its own process, with
everything else at the reference workload, on the first ``--arch`` (GPT-2 by default).
Model size scales the width at fixed depth, so the per-token matmul parameters grow 1x, 4x,
16x (256, 512, 1024 wide at the defaults).
The curves are drawn to ``<out>/scaling.png``: total seconds per step and its generation and
update parts, with the analytic FLOPs per step on a second axis.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import write_json

AXES = {
    "prompts": "prompts per step (x samples)",
    "new_tokens": "max new tokens",
    "width": "model width (matmul params 1x / 4x / 16x)",
}


def axis_points(args: argparse.Namespace) -> dict[str, list[int]]:
    """The values of each axis; ``--quick`` keeps two cheap points per axis."""
    if args.quick:
        return {
            "prompts": [args.prompts, 2 * args.prompts],
            "new_tokens": [args.new_tokens, 2 * args.new_tokens],
            "width": [args.width, 2 * args.width],
        }
    return {
        "prompts": [4, 8, 16, 32],
        "new_tokens": [8, 16, 32, 64],
        "width": [args.width, 2 * args.width, 4 * args.width],
    }


def run_scaling(args: argparse.Namespace, log: Any, arch: str = "gpt2") -> dict[str, Any]:
    """Measure every point on ``arch``, plot, and return ``{"curves": {axis: [point]},
    "png": path, "arch": arch}``."""
    from benchmarks.run import build_model, spawn

    curves: dict[str, list[dict[str, float]]] = {}
    steps = {"steps": 1, "warmup": 0 if args.quick else 1}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-scaling-") as tmp:
        models: dict[int, Path] = {}
        # The reference point lies on every curve: measured once, reused.
        measured: dict[tuple, dict[str, Any]] = {}
        for axis, values in axis_points(args).items():
            for value in values:
                changes: dict[str, Any] = {axis: value, **steps}
                if axis == "prompts":
                    changes["micro"] = min(args.micro, value * args.samples)
                width = changes.get("width", args.width)
                if width not in models:
                    models[width] = build_model(args, Path(tmp) / f"w{width}", arch, width=width)
                key = tuple(sorted((k, v) for k, v in changes.items() if getattr(args, k) != v))
                if key not in measured:
                    measured[key] = spawn(args, "alignkit", "grpo", models[width], **changes)
                result = measured[key]
                sec = result["seconds_per_step"]
                point = {
                    "x": value,
                    "total": sec["total"],
                    "generation": sec["generation"],
                    "update": sec["update"],
                    "ref": sec["ref"],
                    "flops": result["flops_per_step"]["total"],
                    "peak_rss_mib": result["peak_rss_mib"],
                }
                curves.setdefault(axis, []).append(point)
                log(f"scaling {axis}={value}: {sec['total']:.3f} s/step")
    png = args.out / "scaling.png"
    plot(curves, png, arch)
    write_json(args.out / "scaling.json", json.dumps(curves, indent=2) + "\n")
    return {"curves": curves, "png": str(png), "arch": arch}


def plot(curves: dict[str, list[dict[str, float]]], png: Path, arch: str = "gpt2") -> None:
    """Three panels, log-log: seconds per step (total, generation, update) and GFLOP per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (axis, points) in zip(axes[0], curves.items(), strict=True):
        xs = [p["x"] for p in points]
        for key, style in (("total", "o-"), ("generation", "s--"), ("update", "^--")):
            ax.plot(xs, [p[key] for p in points], style, label=f"{key} s/step")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel("seconds per GRPO step")
        ax.grid(True, which="both", alpha=0.3)
        twin = ax.twinx()
        twin.plot(xs, [p["flops"] / 1e9 for p in points], "k:", label="GFLOP/step")
        twin.set_yscale("log")
        twin.set_ylabel("analytic GFLOP per step")
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    fig.suptitle(f"alignkit GRPO step cost vs work ({arch})")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
