"""The RL loop: rollout -> reward -> advantage -> update, plus lifecycle hooks.

No algorithm-specific logic lives here. Each step the engine picks the step's prompts, calls
the four phase hooks in order handing the same :class:`~alignkit.batch.Rollout` along,
combines the reward components with their configured weights, logs metrics and writes
periodic checkpoints.

Under a multi-rank backend (``backend=fsdp``) the work of a step is split over the ranks
(data parallel) while its result stays that of one process on the same global batch:

* every rank draws the same global list of ``rl.prompts_per_step`` prompts and rolls out its
  contiguous share of them (generation, sampling log-probs and the reference forward), so all
  samples of a prompt stay on one rank;
* the reward hooks score that share only (each rank runs its reward models on its rows);
* the scored shares are gathered into the global batch (token ids, masks and per-token
  floats: small next to the forwards), so the advantage hook sees the batch one process
  would see, and batch-level statistics (advantage whitening, group baselines, the KL
  controller, metrics) are those of the whole batch with no collective in plugin code;
* per-row forwards of the advantage phase are split again where they cost (PPO's critic:
  :func:`alignkit.rl.update.rank_rows`), and the update trains each rank on its share of every
  global minibatch, normalised by the minibatch's global counts
  (:func:`alignkit.rl.update.run_minibatch_updates`): the summed gradient is the
  single-process gradient, and ``update/rows`` logs the rows this rank trained on.

Integrity (see ``alignkit.engine.guards``): a non-finite reward component stops the run with an
error naming the component and the step, before the update; an optimizer step with
non-finite gradients is skipped (metric ``guard/skipped_updates``) and the run stops after
``rl.max_consecutive_skips`` RL steps in a row with skipped updates; a checkpoint is written
only from finite parameters. A resume refuses a config whose fingerprint differs from the
checkpoint's (``rl.resume_allow_changes`` lists keys allowed to change).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.engine.checkpoint import (
    fingerprint_changes,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from alignkit.engine.gather import gather_rollout
from alignkit.engine.guards import (
    NonFiniteError,
    check_reward_components,
    guard_optimizer,
    skipped_steps,
)
from alignkit.errors import ConfigError, PluginError
from alignkit.needs import AlgorithmNeeds
from alignkit.progress import progress_bar
from alignkit.rl.update import step_metrics
from alignkit.rollout import ENGINE_LOGPROBS, IS_WEIGHTS, mismatch_metrics
from alignkit.tracking import console
from alignkit.validate import check_algorithm_needs

DEFAULT_MAX_CONSECUTIVE_SKIPS = 3
"""``rl.max_consecutive_skips`` when the config has no such key: a transient overflow is
survived, a policy that produces NaN every step is not trained on for long."""


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

    def keep(self, predicate: Callable[[Any], bool], why: str = "") -> int:
        """Draw only the records ``predicate`` accepts from now on; returns how many remain.

        Called in ``run_start`` (after a resume restored the position, before any draw), so
        the position refers to the same kept records in a resumed run as in the first one.
        ``why`` explains, in the error, a predicate that accepts nothing.
        """
        kept = [r for r in self.records if predicate(r)]
        if not kept:
            raise ConfigError(f"no training prompt is left to draw from: {why or 'keep()'}")
        self.records = kept
        self.index = min(self.index, len(kept))
        self._order = self._shuffle()
        return len(kept)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()


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


def check_advantage_phase(batch: Rollout, needs: AlgorithmNeeds, plugin: str) -> None:
    """The advantage phase set what the algorithm declared: advantages, and for a critic
    the values and returns."""
    missing = []
    if needs.advantages and batch.advantages is None:
        missing.append("advantages")
    if needs.critic:
        missing += [name for name in ("values", "returns") if getattr(batch, name) is None]
    if missing:
        raise PluginError(
            f"plugin {plugin!r} returned a batch without {', '.join(missing)} from 'advantage'"
        )


def batch_metrics(batch: Rollout, kl_coef: float = 0.0) -> dict[str, float]:
    """Reward components, response statistics, the KL to the reference (``kl/ref``,
    ``kl/coef``: ``kl_coef`` when the batch has a KL) and ``adv/abs_mean`` of a batch."""
    metrics = step_metrics(batch, kl_coef if batch.kl is not None else 0.0)
    if batch.rewards is not None:
        metrics["reward/total"] = batch.rewards.mean().item()
        metrics["reward/total_std"] = batch.rewards.std().item() if batch.num_rows > 1 else 0.0
    for name, scores in batch.reward_components.items():
        metrics[f"reward/{name}"] = scores.mean().item()
    metrics["response/length"] = batch.response_mask.sum(1).float().mean().item()
    if batch.finished is not None:
        metrics["response/eos_rate"] = batch.finished.float().mean().item()
    engine_logprobs = batch.extras.get(ENGINE_LOGPROBS)
    if engine_logprobs is not None and batch.logprobs is not None:
        weights = batch.extras.get(IS_WEIGHTS)
        metrics.update(
            mismatch_metrics(batch.logprobs, engine_logprobs, batch.response_mask, weights)
        )
    return metrics


class Engine:
    """Runs the RL loop over a fully built :class:`RunContext`."""

    def __init__(
        self,
        ctx: RunContext,
        prompts: Sequence[Any],
        fingerprint: dict[str, Any] | None = None,
        on_step: Callable[[int, bool], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self.on_step = on_step
        """Called after each step with the steps done and whether it was the last."""
        self.cfg = ctx.cfg.rl
        world = ctx.backend.world_size
        if int(self.cfg.prompts_per_step) % world:
            raise ConfigError(
                f"rl.prompts_per_step={self.cfg.prompts_per_step} must be a multiple of the "
                f"number of ranks ({world}): every rank rolls out an equal share"
            )
        # The same seed on every rank: all ranks draw the same global prompts each step.
        self.sampler = PromptSampler(prompts, seed=int(ctx.cfg.seed))
        ctx.prompt_sampler = self.sampler  # plugins draw more through ctx.draw_prompts
        self.needs = ctx.needs
        check_algorithm_needs(ctx.cfg, self.needs)
        self.start_step = 0
        self.history: list[dict[str, float]] = []
        self.fingerprint = fingerprint
        """The run-defining config values (``checkpoint.run_fingerprint``), saved with every
        checkpoint and compared on resume; None skips the comparison."""
        self.resumed_metrics: dict[str, float] = {}
        """The last step's metrics as the resumed checkpoint recorded them."""
        self.consecutive_skips = 0
        if ctx.optimizer is not None:
            guard_optimizer(ctx.optimizer)

    def maybe_resume(self) -> None:
        """With ``rl.resume=true``, continue from the latest complete checkpoint (if any).

        Restores weights, optimizer, schedule, RNG states, data position and plugin state, so
        on the CPU the resumed run follows the uninterrupted run's trajectory exactly.
        """
        if not self.cfg.resume:
            return
        path = latest_checkpoint(self.ctx.run_dir)
        if path is None:
            console.print("[yellow]rl.resume: no checkpoint yet, starting from step 0[/]")
            return
        self.check_fingerprint(path, read_checkpoint_meta(path))
        meta = load_checkpoint(self.ctx, path)
        self.sampler.restore(meta["sampler"])
        self.start_step = int(meta["step"])
        self.resumed_metrics = dict(meta.get("metrics") or {})
        # Steps logged after the checkpoint (a crash) are run again: drop their old records.
        dropped = self.ctx.tracker.rewind("rl", self.start_step)
        note = f" (re-running {dropped} logged step(s) after it)" if dropped else ""
        console.print(f"resumed from {path} at step {self.start_step}{note}")

    def check_fingerprint(self, path: Any, meta: dict[str, Any]) -> None:
        """Refuse to resume ``path`` under a config that defines a different run."""
        saved = meta.get("fingerprint")
        if self.fingerprint is None:
            return
        if saved is None:
            console.print(f"[yellow]{path.name} has no config fingerprint (an older version)[/]")
            return
        allowed = [str(k) for k in (self.cfg.get("resume_allow_changes", None) or [])]
        refused, accepted = fingerprint_changes(saved, self.fingerprint, allowed)
        if accepted:
            console.print("[yellow]rl.resume: allowed config changes: " + "; ".join(accepted))
        if refused:
            keys = ",".join(line.split(":")[0] for line in refused)
            raise ConfigError(
                f"rl.resume: the config differs from checkpoint {path} in keys that define "
                f"the run: {'; '.join(refused)}. Resuming would mix two runs: use another "
                f"run_dir, or allow the change with rl.resume_allow_changes=[{keys}]"
            )

    def log_samples(self, step: int, batch: Rollout) -> None:
        """A table of this step's generations with every reward component (and gold)."""
        if not batch.records or not batch.responses:
            return
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
        batch: Rollout = pm.call("rollout", ctx=ctx, records=ctx.backend.shard(records))
        _check_batch(batch, "rollout", pm.implementers("rollout")[0])
        parts = dict(batch.timings)  # this rank's own; the gathered batch starts afresh
        timings["time/rollout"] = time.perf_counter() - t

        t = time.perf_counter()
        # Each rank scores its own rows; the scored shares make the global batch. A batch
        # its rollout scored (ctx.score) is not scored again.
        if self.needs.reward and not batch.scored:
            ctx.score(batch)
        if ctx.backend.distributed:
            batch = gather_rollout(ctx, batch)
        # Checked per component on the global batch, so every rank stops alike, before
        # anything trains on it: the error names the culprit.
        check_reward_components(batch.reward_components, step)
        timings["time/reward"] = time.perf_counter() - t

        t = time.perf_counter()
        batch = pm.call("advantage", ctx=ctx, batch=batch)
        _check_batch(batch, "advantage", pm.implementers("advantage")[0])
        check_advantage_phase(batch, self.needs, pm.implementers("advantage")[0])
        timings["time/advantage"] = time.perf_counter() - t

        samples = batch if self.needs.sampling else self.probe(step, records)

        t = time.perf_counter()
        skipped_before = skipped_steps()
        update_metrics = pm.call("update", ctx=ctx, batch=batch) or {}
        timings["time/update"] = time.perf_counter() - t
        update_metrics.update(self.note_skips(step, skipped_steps() - skipped_before))

        # An offline batch is data: its statistics would not describe the policy, so they
        # come from the policy's own samples (the probe's, on the steps it runs).
        kl_coef = float(self.cfg.kl_coef) if self.needs.sampling else 0.0
        sampled = self.sample_metrics(samples, kl_coef) if samples is not None else {}
        metrics = {**sampled, **update_metrics, **timings, **parts}
        metrics["time/step"] = sum(timings.values())
        pm.call("step_end", ctx=ctx, step=step, batch=batch, metrics=metrics)
        every = int(self.cfg.samples_every)
        if every > 0 and step % every == 0 and samples is not None and samples.prompts:
            self.log_samples(step, samples)
        return metrics

    def probe(self, step: int, records: Sequence[Any]) -> Rollout | None:
        """For an algorithm that samples nothing (offline DPO): every ``rl.probe_every`` steps
        and at the last, one response of the policy to each of the step's prompts, so the
        logged ``gold/score``, response statistics, ``kl/ref`` and sample tables describe
        the policy rather than the data set. None on other steps."""
        every, last = int(self.cfg.get("probe_every", 0)), int(self.cfg.steps) - 1
        if every <= 0 or (step % every and step != last):
            return None
        t = time.perf_counter()
        samples = self.ctx.sample(self.ctx.backend.shard(records), samples_per_prompt=1)
        if self.ctx.backend.distributed:
            samples = gather_rollout(self.ctx, samples)
        samples.timings["time/probe"] = time.perf_counter() - t
        return samples

    def sample_metrics(self, samples: Rollout, kl_coef: float) -> dict[str, float]:
        """:func:`batch_metrics` of the policy's samples, with the gold oracle's mean score
        (``gold/score``) when the task has one: logged beside a learned reward, it makes
        over-optimisation visible (the reward rises while ``gold/score`` stalls or falls).
        The gold score is never part of the reward unless ``reward=gold`` is active."""
        metrics = batch_metrics(samples, kl_coef)
        gold = getattr(self.ctx.task, "gold_score", None)
        if gold is not None and samples.records:
            scores = [gold(r, y) for r, y in zip(samples.records, samples.responses, strict=True)]
            metrics["gold/score"] = sum(scores) / len(scores)
        if not self.needs.sampling:
            metrics.update(samples.timings)
        return metrics

    def note_skips(self, step: int, skipped: int) -> dict[str, float]:
        """Count skipped optimizer steps; stop after too many RL steps in a row had some."""
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        limit = int(self.cfg.get("max_consecutive_skips", DEFAULT_MAX_CONSECUTIVE_SKIPS))
        if skipped:
            console.print(
                f"[yellow]step {step}: {skipped} optimizer step(s) skipped: non-finite loss or "
                f"gradients ({self.consecutive_skips} RL step(s) in a row, limit {limit})[/]"
            )
        if skipped and self.consecutive_skips >= limit:
            raise NonFiniteError(
                f"non-finite loss or gradients in {self.consecutive_skips} consecutive RL steps "
                f"(up to step {step}; rl.max_consecutive_skips={limit}): stopped; the policy "
                "was not updated by them and the checkpoints on disk are unchanged"
            )
        return {
            "guard/skipped_updates": float(skipped),
            "guard/consecutive_skipped_steps": float(self.consecutive_skips),
        }

    def checkpoint_extra(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What ``state.json`` records besides the step: data position, fingerprint, metrics."""
        plain = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        return {"sampler": self.sampler.state(), "fingerprint": self.fingerprint, "metrics": plain}

    def run(self) -> dict[str, float]:
        """All steps from the start (or the resumed step); returns the last step's metrics.

        When a resumed checkpoint is already at (or past) ``rl.steps`` nothing runs: that is
        said, and the checkpoint's own last metrics are returned.
        """
        ctx, pm = self.ctx, self.ctx.plugins
        self.maybe_resume()
        pm.call("run_start", ctx=ctx)
        total, every = int(self.cfg.steps), int(self.cfg.checkpoint_every)
        if self.start_step >= total:
            console.print(
                f"rl: nothing to do: the checkpoint is at step {self.start_step} and "
                f"rl.steps={total}; keeping the policy and the summary"
            )
            return dict(self.resumed_metrics)
        metrics: dict[str, float] = {}
        with _progress() as progress:
            task = progress.add_task("rl", total=total, completed=self.start_step, info="")
            for step in range(self.start_step, total):
                with ctx.backend.autocast():
                    metrics = self.step(step)
                self.history.append(metrics)
                if step % int(self.cfg.log_every) == 0 or step == total - 1:
                    ctx.tracker.log(metrics, step=step, stage="rl")
                done = step + 1
                if (every > 0 and done % every == 0) or done == total:
                    save_checkpoint(ctx, done, self.checkpoint_extra(metrics))
                if self.on_step is not None:
                    self.on_step(done, done == total)
                info = f"reward {metrics.get('reward/total', float('nan')):.3f}"
                progress.update(task, advance=1, info=info)
        return metrics


def _progress() -> Any:
    """A rich bar on a terminal; plain periodic log lines elsewhere (:mod:`alignkit.progress`)."""
    return progress_bar()
