"""The RL loop: rollout -> reward -> advantage -> update, plus lifecycle hooks.

No algorithm-specific logic lives here. Each step the engine picks the step's prompts, calls
the four phase hooks in order handing the same :class:`~alignkit.batch.Rollout` along,
combines the reward components with their configured weights, logs metrics and writes
periodic checkpoints.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from alignkit.batch import Rollout
from alignkit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.context import RunContext
from alignkit.errors import ConfigError, PluginError
from alignkit.tracking import console


class PromptSampler:
    """Deterministic shuffled passes over the prompt set; its position is checkpointed."""

    def __init__(self, records: Sequence[Any], seed: int) -> None:
        if not records:
            raise ConfigError("the task has no training prompts")
        self.records = list(records)
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[Any]:
        out = []
        while len(out) < n:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.records[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()


def combine_rewards(
    ctx: RunContext, results: list[dict[str, torch.Tensor]], rows: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_k weight_k * component_k`` over every reward plugin's components.

    A component ``name`` (or ``name/sub``) takes its weight from ``reward.<name>.weight``.
    Returns the (B,) total and the raw components.
    """
    components: dict[str, torch.Tensor] = {}
    for result in results:
        for name, scores in result.items():
            if name in components:
                raise PluginError(f"two reward plugins returned the component {name!r}")
            components[name] = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if not components:
        raise PluginError("no reward plugin scored the batch; configure reward=[...]")
    total = torch.zeros(rows)
    for name, scores in components.items():
        if scores.shape != (rows,):
            raise PluginError(
                f"reward component {name!r} has shape {tuple(scores.shape)}, expected ({rows},)"
            )
        key = name.split("/")[0]
        if key not in ctx.cfg.reward:
            raise ConfigError(f"reward component {name!r} has no weight: set reward.{key}.weight")
        total = total + float(ctx.cfg.reward[key].weight) * scores
    return total, components


def _check_batch(batch: Any, hook: str, plugin: str) -> None:
    """A phase hook's batch must be a consistent Rollout; the error names plugin and hook."""
    if not isinstance(batch, Rollout):
        raise PluginError(
            f"plugin {plugin!r} returned {type(batch).__name__} from {hook!r}, expected Rollout"
        )
    try:
        batch.validate()
    except ValueError as exc:
        raise PluginError(
            f"plugin {plugin!r} returned an inconsistent batch from {hook!r}: {exc}"
        ) from None


def batch_metrics(batch: Rollout) -> dict[str, float]:
    """Reward components and response statistics of a scored batch."""
    metrics: dict[str, float] = {}
    if batch.rewards is not None:
        metrics["reward/total"] = batch.rewards.mean().item()
        metrics["reward/total_std"] = batch.rewards.std().item() if batch.num_rows > 1 else 0.0
    for name, scores in batch.reward_components.items():
        metrics[f"reward/{name}"] = scores.mean().item()
    metrics["response/length"] = batch.response_mask.sum(1).float().mean().item()
    if batch.finished is not None:
        metrics["response/eos_rate"] = batch.finished.float().mean().item()
    return metrics


class Engine:
    """Runs the RL loop over a fully built :class:`RunContext`."""

    def __init__(self, ctx: RunContext, prompts: Sequence[Any]) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg.rl
        self.sampler = PromptSampler(prompts, seed=int(ctx.cfg.seed))
        self.start_step = 0
        self.history: list[dict[str, float]] = []

    def maybe_resume(self) -> None:
        """With ``rl.resume=true``, continue from the latest complete checkpoint."""
        if not self.cfg.resume:
            return
        path = latest_checkpoint(self.ctx.run_dir)
        if path is None:
            console.print("[yellow]rl.resume: no checkpoint yet, starting from step 0[/]")
            return
        meta = load_checkpoint(self.ctx, path)
        self.sampler.restore(meta["sampler"])
        self.start_step = int(meta["step"])
        console.print(f"resumed from {path} at step {self.start_step}")

    def log_samples(self, step: int, batch: Rollout) -> None:
        """A table of this step's generations with every reward component (and gold)."""
        gold = getattr(self.ctx.task, "gold_score", None)
        names = sorted(batch.reward_components)
        columns = ["step", "prompt", "response", *names, *(["oracle"] if gold else [])]
        rows = []
        for i in range(min(batch.num_rows, int(self.cfg.samples_to_log))):
            row = [step, batch.prompts[i], batch.responses[i]]
            row += [round(batch.reward_components[n][i].item(), 4) for n in names]
            if gold:
                row.append(round(gold(batch.records[i], batch.responses[i]), 4))
            rows.append(row)
        self.ctx.tracker.log_table(f"rl_samples_step_{step:06d}", columns, rows)

    def step(self, step: int) -> dict[str, float]:
        """One rollout -> reward -> advantage -> update step; returns its metrics."""
        ctx, pm = self.ctx, self.ctx.plugins
        ctx.step = step
        pm.call("step_start", ctx=ctx, step=step)
        timings: dict[str, float] = {}

        t = time.perf_counter()
        records = self.sampler.next(int(self.cfg.prompts_per_step))
        batch: Rollout = pm.call("rollout", ctx=ctx, records=records)
        _check_batch(batch, "rollout", pm.implementers("rollout")[0])
        timings["time/rollout"] = time.perf_counter() - t

        t = time.perf_counter()
        results = [r for r in pm.call("reward", ctx=ctx, batch=batch) if r]
        batch.rewards, batch.reward_components = combine_rewards(ctx, results, batch.num_rows)
        timings["time/reward"] = time.perf_counter() - t

        t = time.perf_counter()
        batch = pm.call("advantage", ctx=ctx, batch=batch)
        _check_batch(batch, "advantage", pm.implementers("advantage")[0])
        if batch.advantages is None:
            raise PluginError(
                f"plugin {pm.implementers('advantage')[0]!r} returned a batch without advantages"
            )
        timings["time/advantage"] = time.perf_counter() - t

        t = time.perf_counter()
        update_metrics = pm.call("update", ctx=ctx, batch=batch) or {}
        timings["time/update"] = time.perf_counter() - t

        metrics = {**batch_metrics(batch), **update_metrics, **timings}
        metrics["time/step"] = sum(timings.values())
        pm.call("step_end", ctx=ctx, step=step, batch=batch, metrics=metrics)
        every = int(self.cfg.samples_every)
        if every > 0 and step % every == 0 and batch.prompts:
            self.log_samples(step, batch)
        return metrics

    def run(self) -> dict[str, float]:
        """All steps from the start (or the resumed step); returns the last step's metrics."""
        ctx, pm = self.ctx, self.ctx.plugins
        self.maybe_resume()
        pm.call("run_start", ctx=ctx)
        total, every = int(self.cfg.steps), int(self.cfg.checkpoint_every)
        metrics: dict[str, float] = {}
        with _progress() as progress:
            task = progress.add_task("rl", total=total, completed=self.start_step, info="")
            for step in range(self.start_step, total):
                metrics = self.step(step)
                self.history.append(metrics)
                if step % int(self.cfg.log_every) == 0 or step == total - 1:
                    ctx.tracker.log(metrics, step=step, stage="rl")
                done = step + 1
                if (every > 0 and done % every == 0) or done == total:
                    save_checkpoint(ctx, done, {"sampler": self.sampler.state()})
                info = f"reward {metrics.get('reward/total', float('nan')):.3f}"
                progress.update(task, advance=1, info=info)
        return metrics


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )
