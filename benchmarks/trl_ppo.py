"""TRL's side of the PPO workload: TRL 1.12's ``trl.experimental.ppo.PPOTrainer``.

TRL 1.16 (the ``bench`` extra) ships no PPO trainer; TRL 1.12 was the last release with one.
It lives in its own folder (``.bench/trl-1.12``, ``--trl-ppo-dir``), installed with::

    .venv/bin/python -m pip install --no-deps --target .bench/trl-1.12 trl==1.12.0

(``make bench`` does it when the folder is missing), and only this workload's worker process
puts that folder first on ``sys.path``: the suite's other TRL runs keep TRL 1.16.

Settings matched to alignkit's ``ppo`` workload (``rl_overrides`` in workloads.py):

* 16 prompts x 4 samples = 64 completions per step. PPOTrainer has no ``num_generations``:
  each step's batch is the 16 prompt strings alignkit's engine draws for that step (the same
  ``PromptSampler`` and seed), each repeated 4 times, fed in order.
* ``per_device_train_batch_size=16``, ``gradient_accumulation_steps=4``, ``num_mini_batches=1``
  (one optimizer step per RL step), ``num_ppo_epochs=1``, ``local_rollout_forward_batch_size``
  = 64 (one 64-row ``generate``, as alignkit samples).
* ``response_length=32``, ``temperature=1`` (top-k 0, top-p 1 are PPOTrainer's own),
  ``stop_token="eos"``, ``missing_eos_penalty=None``, prompts truncated to their last 32 tokens.
* ``kl_coef=0.05``, k1 in the reward, ``cliprange=0.2``, ``cliprange_value=0.2``,
  ``vf_coef=0.1``, GAE gamma 1 lambda 0.95, whitened advantages, unwhitened rewards: all
  alignkit's PPO defaults.
* fp32 (``bf16=False``), no gradient checkpointing, dropout off (PPOTrainer disables it in
  every model), AdamW lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0, linear decay.
* policy, reference and a separate value model from the same folder; the value and reward
  models are ``AutoModelForSequenceClassification`` with one label.

Not matched: PPOTrainer never clips gradients (``max_grad_norm`` is ignored) and steps one
AdamW over policy and critic together (alignkit: two, each clipped to 1.0); it needs a reward
*model* and runs it on every rollout, where alignkit's workload scores with the task's rule
(``reward=[gold]``), so that forward is timed as its own ``reward`` phase.

Phases are read by wrapping the module-level functions ``PPOTrainer.train`` calls:
``batch_generation`` (sampling; its log-probs come from the sampling scores, no ``old``
forward), ``forward`` without grad (reference), ``get_reward`` on the reward model (reward)
and on the value model (critic forward). A step starts when ``train`` fetches its batch and
its rollout ends at the first forward with grad; ``value`` is the rollout's remainder (critic
forward, truncation, GAE, whitening) and ``update`` the rest of the step (PPO minibatches,
metrics, ``gc.collect``). FLOPs are counted on the policy, reference, value and reward models.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

import torch

from alignkit.tasks import AssistTask
from benchmarks.flop_counter import FlopCounter
from benchmarks.trl_side import StepTimer, _common_args, _summarise

MAX_PROMPT_TOKENS = 32
"""alignkit's ``task.max_prompt_tokens``: prompts keep their last 32 tokens on both sides."""
VERSION = "1.12"
"""The TRL release line whose ``trl.experimental.ppo`` this runner drives."""


def install_command(folder: Path) -> str:
    """The one command that puts TRL 1.12 in ``folder``."""
    return f"{sys.executable} -m pip install --no-deps --target {folder} trl=={VERSION}.0"


def installed_version(folder: Path) -> str | None:
    """The version of the ``trl`` distribution in ``folder``, read without importing it."""
    if not (folder / "trl" / "experimental" / "ppo" / "ppo_trainer.py").is_file():
        return None
    for dist in distributions(path=[str(folder)]):
        if (dist.metadata["Name"] or "").lower() == "trl":
            return str(dist.version)
    return None


def problem(folder: Path) -> str | None:
    """Why the PPO side cannot run from ``folder`` (one line), or None when it can."""
    version = installed_version(folder)
    if version is not None and version.startswith(VERSION + "."):
        return None
    found = f"found trl {version}" if version else "not installed"
    return (
        f"no TRL PPO side: TRL {VERSION} ({found}) in {folder}; "
        f"install it with `{install_command(folder)}` (`make bench` installs it in .bench/trl-1.12)"
    )


def import_ppo(folder: Path) -> Any:
    """TRL 1.12's ``trl.experimental.ppo.ppo_trainer`` module, from ``folder`` first on the path."""
    folder = folder.resolve()
    loaded = sys.modules.get("trl")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(folder)):
        raise RuntimeError(f"trl {loaded.__version__} was imported before TRL {VERSION}")
    sys.path.insert(0, str(folder))
    import trl
    from trl.experimental.ppo import ppo_trainer

    if not str(trl.__version__).startswith(VERSION + "."):
        raise RuntimeError(f"{folder} gave trl {trl.__version__}, not {VERSION}.x")
    return ppo_trainer


class PPOStepTimer(StepTimer):
    """A :class:`StepTimer` that also records when each step's rollout ends."""

    running = False

    def begin(self) -> None:
        super().begin()
        self.running = True

    def rollout_done(self) -> None:
        """First call of a step: the rollout ("scoring") spans the step so far."""
        self.current.setdefault("scoring", time.perf_counter() - self._start)

    def finish(self) -> None:
        """End the running step, if one is running."""
        if self.running:
            self.end()
            self.running = False


class StepBatches:
    """The step batches in order; fetching one ends the previous step and starts the next."""

    def __init__(self, loader: Any, timer: PPOStepTimer, on_begin: Any) -> None:
        self.loader, self.timer, self.on_begin = loader, timer, on_begin

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.timer.finish()
            self.on_begin()
            self.timer.begin()
            yield batch


def step_prompts(args: argparse.Namespace, tok: Any) -> list[list[int]]:
    """Token ids of every step's rows: alignkit's prompts for that step, each ``samples`` times."""
    from alignkit.engine import PromptSampler

    task = AssistTask()
    sampler = PromptSampler(task.train_prompts(), seed=args.seed)
    rows = []
    for _ in range(args.warmup + args.steps):
        texts = [task.format_prompt(r) for r in sampler.next(args.prompts)]
        ids = [x[-MAX_PROMPT_TOKENS:] for x in tok(texts)["input_ids"]]
        rows += [x for x in ids for _ in range(args.samples)]
    return rows


def ppo_config(args: argparse.Namespace, config_cls: Any, out: str) -> Any:
    """PPOConfig at the reference workload (see the module docstring)."""
    rows = args.prompts * args.samples
    fields = {f.name for f in dataclasses.fields(config_cls)}
    common = {k: v for k, v in _common_args(args, out).items() if k in fields}
    return config_cls(
        **common,
        gradient_checkpointing=False,
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=rows // args.micro,
        num_mini_batches=1,
        num_ppo_epochs=1,
        local_rollout_forward_batch_size=rows,
        total_episodes=rows * (args.warmup + args.steps),
        response_length=args.new_tokens,
        temperature=1.0,
        stop_token="eos",
        missing_eos_penalty=None,
        kl_coef=0.05,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        num_sample_generations=0,
    )


def load_models(model_dir: Path, pad_token_id: int, seed: int) -> dict[str, Any]:
    """Policy, reference, value and reward models, all fp32 from the same folder."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the score heads are new
    models = {
        name: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for name in ("policy", "ref")
    }
    for name in ("value", "reward"):
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, dtype=torch.float32
        )
        model.config.pad_token_id = pad_token_id
        models[name] = model
    return models


def response_tokens(responses: list[torch.Tensor], eos: int, warmup: int) -> float:
    """Generated tokens per measured step, up to and including each row's first EOS."""
    counts = []
    for new in responses[warmup:]:
        is_eos = (new == eos).int()
        counts.append(float(((is_eos.cumsum(1) - is_eos) == 0).sum()))
    return sum(counts) / max(len(counts), 1)


def wrap_trainer_calls(
    ppo: Any, timer: PPOStepTimer, models: dict[str, Any], responses: list[torch.Tensor]
) -> None:
    """Time the functions ``PPOTrainer.train`` calls by their module-level names."""
    generation = timer.timed("generation", ppo.batch_generation)

    def batch_generation(model: Any, queries: torch.Tensor, *rest: Any, **kw: Any) -> Any:
        out = generation(model, queries, *rest, **kw)
        responses.append(out[0][:, queries.shape[1] :])
        return out

    forward = timer.timed(lambda *_, **__: None if torch.is_grad_enabled() else "ref", ppo.forward)

    def timed_forward(*a: Any, **kw: Any) -> Any:
        if torch.is_grad_enabled():
            timer.rollout_done()  # the first training forward of the step
        return forward(*a, **kw)

    def reward_phase(model: Any, *_: Any, **__: Any) -> str:
        return "reward" if model is models["reward"] else "critic"

    def gc_phase(*_: Any) -> str:
        return "gc_update" if "scoring" in timer.current else "gc_rollout"

    ppo.batch_generation = batch_generation
    ppo.forward = timed_forward
    ppo.get_reward = timer.timed(reward_phase, ppo.get_reward)
    # PPOTrainer calls gc.collect() twice a step (after the rollout, at the step's end).
    ppo.gc = types.SimpleNamespace(collect=timer.timed(gc_phase, gc.collect))


def optimizer_steps(optimizer: Any) -> int:
    """AdamW steps taken so far (one per RL step when the batch split is right)."""
    steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    return max(steps, default=0)


def run_trl_ppo(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """TRL 1.12's PPOTrainer on the reference PPO workload."""
    ppo = import_ppo(Path(args.trl_ppo_dir))
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    rows = args.prompts * args.samples
    if rows % args.micro:
        raise SystemExit(f"--micro {args.micro} must divide prompts x samples = {rows}")
    dataset = Dataset.from_dict({"input_ids": step_prompts(args, tok)})
    models = load_models(model_dir, tok.pad_token_id, args.seed)
    counter = FlopCounter()
    for name, model in models.items():
        counter.attach(model, name)
    timer = PPOStepTimer()
    responses: list[torch.Tensor] = []

    class EndTiming(TrainerCallback):  # type: ignore[misc]
        def on_train_end(self, *_: Any, **__: Any) -> None:
            timer.finish()

    def on_begin() -> None:
        if len(timer.steps) == args.warmup:  # count the measured steps only
            counter.reset()

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        trainer = ppo.PPOTrainer(
            args=ppo_config(args, PPOConfig, tmp),
            processing_class=tok,
            model=models["policy"],
            ref_model=models["ref"],
            reward_model=models["reward"],
            value_model=models["value"],
            train_dataset=dataset,
            callbacks=[EndTiming()],
        )
        trainer.remove_callback(PrinterCallback)  # no log lines inside the measured steps
        # In order, not shuffled: step k gets alignkit's prompts of step k.
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=rows, collate_fn=DataCollatorWithPadding(tok), drop_last=True
        )
        trainer.dataloader = StepBatches(loader, timer, on_begin)
        wrap_trainer_calls(ppo, timer, models, responses)
        trainer.train()
    flops = {
        "generation": counter.total("policy", grad=False),
        "reward": counter.total("reward"),
        "ref": counter.total("ref"),
        "value": counter.total("value", grad=False),
        "update": counter.total("policy", grad=True) + counter.total("value", grad=True),
    }
    flops["total"] = sum(flops.values())
    result = _summarise(args, timer, flops, float(rows))
    result["tokens_per_step"] = response_tokens(responses, tok.eos_token_id, args.warmup)
    measured = timer.phases[args.warmup :]
    # Parts of the value phase (critic forward, gc after the rollout) and of the update (gc
    # at the step's end), seconds per measured step.
    result["inside_phases"] = {
        key: sum(p.get(key, 0.0) for p in measured) / len(measured)
        for key in ("critic", "gc_rollout", "gc_update")
    }
    result["optimizer_steps"] = optimizer_steps(trainer.optimizer)
    if result["optimizer_steps"] != args.warmup + args.steps:
        raise RuntimeError(f"TRL took {result['optimizer_steps']} optimizer steps, not one a step")
    result["trl_version"] = sys.modules["trl"].__version__
    # TRL pays this phase and alignkit's workload does not: ratios also leave it out.
    result["extra_phases"] = ["reward"]
    return result
