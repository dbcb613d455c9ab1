"""alignkit's side of each workload, run in-process on a prepared model folder.

Every function takes the parsed arguments and the model folder (a saved tiny decoder, GPT-2
or another ``--arch``, and its tokenizer, shared with the TRL runners) and returns a result
dict::

    seconds_per_step   {"generation", "reward", "ref", "old", "value", "update", "total"}
    flops_per_step     the analytic FLOPs of the same phases (forward + backward)
    samples_per_step   completions (RL, generation) or preference pairs (reward model)
    tokens_per_step    generated tokens (RL, generation; 0 for the reward model)
    trained_tokens_per_step   reward model: real tokens of the chosen and rejected rows

The runner adds throughput, GFLOP/s and peak memory (each workload runs in its own process).
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from alignkit.data.feedback import PreferenceGroup, RankingFeedback, to_groups
from alignkit.rl.critic import CRITIC_KEY
from alignkit.tasks import QUALITIES, AssistTask
from benchmarks.flop_counter import FlopCounter

PHASES = ("generation", "reward", "ref", "old", "value", "update")


def task_prompts(task: AssistTask, count: int) -> list[Any]:
    """The first ``count`` training prompt records, cycled if the task has fewer."""
    records = task.train_prompts()
    return [records[i % len(records)] for i in range(count)]


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------


def run_generation(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Sampling alone: the rollout's KV-cache loop over prompts x samples rows."""
    from alignkit.models import load_causal_lm
    from alignkit.models.generation import generate, tokenize_prompts

    task = AssistTask()
    model, tok = load_causal_lm(str(model_dir))
    model.eval()
    counter = FlopCounter().attach(model, "policy")
    texts = [task.format_prompt(r) for r in task_prompts(task, args.prompts)]
    ids, mask = tokenize_prompts(tok, texts, max_length=32)
    ids, mask = ids.repeat_interleave(args.samples, 0), mask.repeat_interleave(args.samples, 0)
    generator = torch.Generator().manual_seed(args.seed)
    seconds = tokens = 0.0
    step_seconds = []
    for step in range(args.warmup + args.steps):
        counter.reset()
        start = time.perf_counter()
        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=args.new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=generator,
        )
        if step >= args.warmup:
            step_seconds.append(time.perf_counter() - start)
            seconds += step_seconds[-1]
            tokens += float(out.response_mask.sum())
    n = args.steps
    return {
        "seconds_per_step": {"generation": seconds / n, "total": seconds / n},
        "flops_per_step": {"generation": counter.total(), "total": counter.total()},
        "samples_per_step": float(ids.shape[0]),
        "tokens_per_step": tokens / n,
        "step_seconds": step_seconds,
        "prompt_columns": int(ids.shape[1]),
    }


# --------------------------------------------------------------------------------------------
# online RL through the engine
# --------------------------------------------------------------------------------------------


def rl_overrides(args: argparse.Namespace, algorithm: str, model_dir: Path) -> list[str]:
    """Config overrides of the reference workload: one optimizer step over all rows."""
    rows = args.prompts * args.samples
    if rows % args.micro:
        raise SystemExit(f"--micro {args.micro} must divide prompts x samples = {rows}")
    accum = rows // args.micro
    common = [
        f"model.path={model_dir}",
        f"rl.prompts_per_step={args.prompts}",
        f"rl.samples_per_prompt={args.samples}",
        f"rl.max_new_tokens={args.new_tokens}",
        f"rl.steps={args.warmup + args.steps}",
        "rl.kl_coef=0.05",
        f"backend.threads={args.threads}",
        f"algorithm.minibatch_size={args.micro}",
        f"algorithm.grad_accum_steps={accum}",
    ]
    if algorithm == "ppo":
        return [*common, "algorithm.ppo_epochs=1", "algorithm.value_model=separate"]
    return [*common, "algorithm.epochs=1"]


def compose_rl(
    algorithm: str, overrides: list[str], run_dir: Path, seed: int
) -> tuple[Any, Any, Any]:
    """The config as ``alignkit stage=rl ...`` composes it, the active plugins, components."""
    from hydra import compose, initialize_config_module

    from alignkit.cli import registration
    from alignkit.plugins import PluginManager

    manager, registry = registration()
    full = [
        "stage=rl",
        f"algorithm={algorithm}",
        "logger=none",
        "reward=[gold]",  # the task's rule-based reward: no reward-model forward in the step
        f"seed={seed}",
        f"run_dir={run_dir}",
        *overrides,
    ]
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=full)
    active = PluginManager(installed=manager.installed)
    active.activate([str(cfg.algorithm.name), *[str(n) for n in cfg.reward]])
    return cfg, active, registry


def run_rl(args: argparse.Namespace, model_dir: Path, algorithm: str) -> dict[str, Any]:
    """``engine.step`` of PPO or GRPO, phases timed by the engine and the core rollout."""
    from alignkit.context import RunContext
    from alignkit.engine import Engine
    from alignkit.stages.common import build_task, seed_everything, train_prompts
    from alignkit.stages.rl import setup_rl
    from alignkit.tracking import Tracker

    overrides = rl_overrides(args, algorithm, model_dir) + list(getattr(args, "overrides", []))
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        run_dir = Path(tmp)
        cfg, plugins, registry = compose_rl(algorithm, overrides, run_dir, args.seed)
        ctx = RunContext(
            cfg=cfg,
            run_dir=run_dir,
            plugins=plugins,
            registry=registry,
            tracker=Tracker(run_dir, enabled=False),
        )
        ctx.generator = seed_everything(args.seed)
        ctx.task = build_task(ctx)
        rl_ctx = setup_rl(ctx, str(model_dir))
        engine = Engine(rl_ctx, train_prompts(rl_ctx))
        plugins.call("run_start", ctx=rl_ctx)
        critic = rl_ctx.state.get(CRITIC_KEY)
        critic_module = critic.module if critic is not None else None
        counter = FlopCounter().attach(rl_ctx.policy, "policy").attach(rl_ctx.ref_policy, "ref")
        counter.attach(critic_module, "value")
        phase_flops = _count_by_phase(plugins, counter)
        totals = dict.fromkeys(PHASES, 0.0)
        flops = dict.fromkeys(PHASES, 0.0)
        tokens = 0.0
        step_seconds = []
        for step in range(args.warmup + args.steps):
            counter.reset()
            phase_flops.clear()
            metrics = engine.step(step)
            if step < args.warmup:
                continue
            step_seconds.append(metrics["time/step"])
            # The rollout times its reference forward itself: a forward hook on the reference
            # model would turn its lean packed forward off (lean._has_hooks).
            ref = metrics.get("time/rollout/ref", 0.0)
            totals["generation"] += metrics["time/rollout"] - ref
            totals["ref"] += ref
            totals["reward"] += metrics["time/reward"]
            totals["value"] += metrics["time/advantage"]  # PPO: the critic (see below)
            totals["update"] += metrics["time/update"]
            flops["generation"] += phase_flops["rollout"] - counter.total("ref")
            flops["ref"] += counter.total("ref")
            # PPO's critic: its rollout forward, or its whole step where it learns from that
            # forward (``algorithm.value_forward_once``); the update's is in ``update``.
            flops["value"] += phase_flops["advantage"]
            flops["update"] += phase_flops["update"]
            tokens += metrics["response/length"] * args.prompts * args.samples
        n = args.steps
        seconds = {k: v / n for k, v in totals.items()}
        seconds["total"] = sum(seconds.values())
        flop_step = {k: v / n for k, v in flops.items()}
        flop_step["total"] = sum(flop_step.values())
        return {
            "seconds_per_step": seconds,
            "flops_per_step": flop_step,
            "samples_per_step": float(args.prompts * args.samples),
            "tokens_per_step": tokens / n,
            "step_seconds": step_seconds,
            "last_metrics": {k: float(v) for k, v in metrics.items() if not k.startswith("time/")},
            "last_timings": {k: float(v) for k, v in metrics.items() if k.startswith("time/")},
        }


def _count_by_phase(plugins: Any, counter: FlopCounter) -> dict[str, float]:
    """Route the FLOPs of each phase hook the engine calls into the returned dict, by hook."""
    by_hook: dict[str, float] = defaultdict(float)
    call = plugins.call

    def counted(hook: str, **kwargs: Any) -> Any:
        before = counter.total()
        try:
            return call(hook, **kwargs)
        finally:
            by_hook[hook] += counter.total() - before

    plugins.call = counted
    return by_hook


# --------------------------------------------------------------------------------------------
# reward model
# --------------------------------------------------------------------------------------------


def preference_pairs(task: AssistTask, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) pairs: every ordered pair of each prompt's response variants.

    The responses are the task's quality variants (ideal, verbose, wrong, unsafe), ordered by
    the gold score; ties are dropped. The same list feeds alignkit and TRL.
    """
    rng = random.Random(seed)
    pairs = []
    for record in task.train_prompts():
        variants = task.response_variants(record, rng)
        responses = list(dict.fromkeys(variants[q] for q in QUALITIES))
        scored = sorted(((task.gold_score(record, r), r) for r in responses), reverse=True)
        prompt = task.format_prompt(record)
        for i, (hi, better) in enumerate(scored):
            pairs.extend((prompt, better, worse) for lo, worse in scored[i + 1 :] if hi > lo)
    rng.shuffle(pairs)
    return pairs


def pair_groups(pairs: list[tuple[str, str, str]]) -> list[PreferenceGroup]:
    """One two-response group per pair (a pairwise comparison, as TRL's RewardTrainer sees it)."""
    return to_groups([RankingFeedback(p, [c, r], [0, 1]) for p, c, r in pairs])


def run_reward_model(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """Bradley-Terry training steps of a scalar-head model on ``--pairs`` pairs per step."""
    from alignkit_plugins.bradley_terry import BradleyTerryLoss
    from transformers import AutoTokenizer

    from alignkit.models import ScalarHeadModel
    from alignkit.stages import reward_model as stage
    from alignkit.stages.reward_model import TrainSettings, train_reward_model

    torch.manual_seed(args.seed)
    task = AssistTask()
    groups = pair_groups(preference_pairs(task, args.seed))
    model = ScalarHeadModel.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    counter = FlopCounter().attach(model, "rm")
    loss = BradleyTerryLoss()
    quiet = {"warmup_steps": 0, "max_length": 96}
    if args.warmup:
        warm = TrainSettings(steps=args.warmup, batch_size=args.pairs, seed=args.seed, **quiet)
        train_reward_model(model, tok, groups, loss, warm)
    counter.reset()
    n = args.rm_steps
    settings = TrainSettings(
        steps=n, batch_size=args.pairs, seed=args.seed + 1, log_every=1, **quiet
    )
    ends = [time.perf_counter()]  # the log hook runs at the end of every step
    batches: list[Any] = []  # each measured step's collated batch, for its token count
    collate = stage.collate_groups

    def collate_and_keep(*a: Any, **kw: Any) -> Any:
        batches.append(collate(*a, **kw))
        return batches[-1]

    stage.collate_groups = collate_and_keep
    try:
        metrics = train_reward_model(
            model, tok, groups, loss, settings, log=lambda *_: ends.append(time.perf_counter())
        )
    finally:
        stage.collate_groups = collate
    trained = sum(float(b.attention_mask.sum()) for b in batches) / max(len(batches), 1)
    seconds = metrics["rm_train_seconds"] / n
    flops = counter.total() / n
    return {
        "seconds_per_step": {"update": seconds, "total": seconds},
        "flops_per_step": {"update": flops, "total": flops},
        "samples_per_step": float(args.pairs),
        "tokens_per_step": 0.0,
        "trained_tokens_per_step": trained,
        "step_seconds": [b - a for a, b in itertools.pairwise(ends)],
        "last_metrics": {"loss": float(metrics.get("rm_loss", float("nan")))},
    }


def run_alignkit(args: argparse.Namespace, workload: str, model_dir: Path) -> dict[str, Any]:
    """Dispatch one workload of alignkit's side."""
    if workload == "generation":
        return run_generation(args, model_dir)
    if workload in ("grpo", "ppo"):
        return run_rl(args, model_dir, workload)
    if workload == "reward_model":
        return run_reward_model(args, model_dir)
    raise SystemExit(f"unknown workload {workload!r}")
