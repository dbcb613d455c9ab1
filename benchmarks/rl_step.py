"""Seconds per RL step, split by phase, on the built-in tiny model.

Runs the real engine pieces in-process (config composition, plugin activation, the core
rollout, the gold reward and the chosen algorithm), a few warm-up steps, then N measured
steps, and reports::

    generation      sampling with the KV cache (the rollout without its reference forward)
    reward          the reward plugins (the gold oracle by default)
    extra forwards  ref: the reference log-probs; value: the advantage phase (for PPO the
                    critic's forward); old: 0, since the rollout's log-probs are reused
    update          the algorithm's optimisation (all epochs and minibatches)

plus generated tokens per second (real response tokens over generation time), the fp32
matmul throughput of this machine at the model's shapes (a ceiling to compare with), and
the peak resident memory.

    python benchmarks/rl_step.py --algorithm ppo --prompts 16 --samples 4 --new-tokens 32 \\
        --threads 2 [--steps 3] [--warmup 1] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from alignkit.cli import registration
from alignkit.context import RunContext
from alignkit.engine import Engine
from alignkit.plugins import PluginManager
from alignkit.registry import ComponentRegistry
from alignkit.stages.common import base_model_path, build_task, seed_everything, train_prompts
from alignkit.stages.rl import setup_rl
from alignkit.tracking import Tracker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--algorithm", default="ppo")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="max new tokens per response")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument(
        "overrides", nargs="*", help="extra config overrides, e.g. algorithm.ppo_epochs=2"
    )
    return p.parse_args(argv)


def compose_config(
    args: argparse.Namespace, run_dir: Path
) -> tuple[DictConfig, PluginManager, ComponentRegistry]:
    """The config as ``alignkit stage=rl ...`` would compose it, active plugins, components."""
    manager, registry = registration()
    overrides = [
        "stage=rl",
        f"algorithm={args.algorithm}",
        "logger=none",
        "reward=[gold]",  # the benchmark measures RL with the task's rule-based reward
        f"seed={args.seed}",
        f"run_dir={run_dir}",
        f"model.tiny.n_layer={args.layers}",
        f"model.tiny.n_head={args.heads}",
        f"model.tiny.n_embd={args.width}",
        f"rl.prompts_per_step={args.prompts}",
        f"rl.samples_per_prompt={args.samples}",
        f"rl.max_new_tokens={args.new_tokens}",
        f"rl.steps={args.warmup + args.steps}",
        f"backend.threads={args.threads}",
        *args.overrides,
    ]
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    active = PluginManager(installed=manager.installed)
    names = [str(cfg.algorithm.name), *[str(n) for n in cfg.reward]]
    active.activate(names)
    return cfg, active, registry


class ForwardTimer:
    """Accumulates wall time spent in a module's forward (hooks on the outermost call)."""

    def __init__(self, module: torch.nn.Module | None) -> None:
        self.seconds = 0.0
        self._start = 0.0
        if module is not None:
            module.register_forward_pre_hook(self._before)
            module.register_forward_hook(self._after)

    def _before(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _after(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start


def matmul_gflops(rows: int, width: int, out: int, repeats: int = 20) -> float:
    """fp32 GFLOP/s of a (rows x width) @ (width x out) matmul: this machine's ceiling."""
    a, b = torch.randn(rows, width), torch.randn(width, out)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * width * out * repeats / (time.perf_counter() - start) / 1e9


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars would clutter the JSON output
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        run_dir = Path(tmp)
        cfg, plugins, registry = compose_config(args, run_dir)
        ctx = RunContext(
            cfg=cfg,
            run_dir=run_dir,
            plugins=plugins,
            registry=registry,
            tracker=Tracker(run_dir, enabled=False),
        )
        ctx.generator = seed_everything(args.seed)
        ctx.task = build_task(ctx)
        rl_ctx = setup_rl(ctx, base_model_path(ctx))
        engine = Engine(rl_ctx, train_prompts(rl_ctx))
        plugins.call("run_start", ctx=rl_ctx)
        ref_timer = ForwardTimer(rl_ctx.ref_policy)

        totals = {"rollout": 0.0, "reward": 0.0, "advantage": 0.0, "update": 0.0, "ref": 0.0}
        tokens = 0.0
        for step in range(args.warmup + args.steps):
            ref_timer.seconds = 0.0
            metrics = engine.step(step)
            if step < args.warmup:
                continue
            for phase in ("rollout", "reward", "advantage", "update"):
                totals[phase] += metrics[f"time/{phase}"]
            totals["ref"] += ref_timer.seconds
            tokens += metrics["response/length"] * args.prompts * args.samples
        n = args.steps
        generation = (totals["rollout"] - totals["ref"]) / n
        per_step = {
            "generation": generation,
            "reward": totals["reward"] / n,
            "extra_forwards": {
                "ref": totals["ref"] / n,
                "value": totals["advantage"] / n,
                "old": 0.0,
            },
            "update": totals["update"] / n,
        }
        per_step["total"] = (
            totals["rollout"] + totals["reward"] + totals["advantage"] + totals["update"]
        ) / n
        rows = args.prompts * args.samples
        seq_len = int(cfg.task.max_prompt_tokens) + args.new_tokens
        return {
            "algorithm": args.algorithm,
            "model": {"n_layer": args.layers, "n_head": args.heads, "n_embd": args.width},
            "batch": {"prompts": args.prompts, "samples": args.samples, "rows": rows},
            "max_new_tokens": args.new_tokens,
            "threads": args.threads,
            "measured_steps": n,
            "seconds_per_step": per_step,
            "generated_tokens_per_step": tokens / n,
            "generated_tokens_per_s": tokens / max(generation * n, 1e-9),
            "matmul_gflops_fp32": matmul_gflops(rows * seq_len, args.width, 4 * args.width),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch": torch.__version__,
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
