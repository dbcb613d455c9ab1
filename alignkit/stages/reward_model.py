"""``stage=reward_model``: train a scalar-head reward model on human feedback.

The backbone (by default the policy that produced the feedback, as in Ouyang et al. 2022)
gets a linear head; the reward of a (prompt, response) is the head's output at the last
non-pad token. The loss is the ``rm_loss`` of the active ``reward=`` plugin (Bradley-Terry,
Plackett-Luce, rating regression). Prompts are split into training and held-out sets, so a
prompt never appears on both sides; held-out pairwise accuracy is reported against the labels
and, where the task knows the prompt (``prompt_id``), against its gold oracle.

After training the output is normalised to mean 0 and std 1 on the reference policy's samples
and the model is saved as an HF folder with its tokenizer: ``<run_dir>/reward_model``, or
``<run_dir>/reward_model/member_<i>`` for an ensemble (``reward_model.ensemble_size > 1``).

Summary keys: ``rm_heldout_accuracy``, ``rm_heldout_pairs``, ``rm_gold_agreement``,
``rm_gold_agreement_noise_free``, ``rm_noise_free_pairs`` and
``rm_gold_agreement_noise_free/<kind>`` (the gold keys only when the oracle knows the prompts),
``rm_train_accuracy``, ``rm_loss``, ``rm_steps``, ``rm_train_groups``, ``rm_heldout_groups``,
``rm_norm_mean``, ``rm_norm_std``, ``rm_pairs_per_second``, ``rm_sequences_per_second``,
``rm_train_seconds``, ``rm_data_records``, ``rm_data_duplicates``, ``rm_data_empty_responses``,
``rm_data_identical_pairs``, and ``rm_member_<i>_heldout_accuracy`` for ensembles.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignkit.backends import Backend, CPUBackend
from alignkit.context import RunContext
from alignkit.data.chat import Conversation
from alignkit.data.feedback import (
    PairwiseFeedback,
    PreferenceGroup,
    RatingFeedback,
    check_feedback,
    load_feedback,
    to_groups,
)
from alignkit.data.prompts import conversation, prompt_format, template_mode
from alignkit.errors import ConfigError, DataError
from alignkit.evaluation import sample_policy
from alignkit.io import atomic_write_dir
from alignkit.models import ScalarHeadModel, is_scalar_head_folder
from alignkit.preference_config import RewardModelConfig
from alignkit.progress import print_report, progress_bar, sample_with_progress, tracked
from alignkit.rewards.learned import (
    EnsembleScorer,
    RewardBatch,
    RewardLoss,
    RewardScorer,
    Scorer,
    collate_groups,
    fit_normalization,
    heldout_metrics,
    loss_attribute,
    member_folders,
    model_max_length,
    pairwise_accuracy,
    score_groups,
)
from alignkit.rl.optim import adamw
from alignkit.stages.common import linear_warmup_decay, load_model
from alignkit.tracking import console

STAGE = "reward_model"

# --------------------------------------------------------------------------------------------
# what to train on, from what, with which loss
# --------------------------------------------------------------------------------------------


def resolve_backbone(ctx: RunContext, backbone: str | Path | None = None) -> str:
    """``backbone``, else ``reward_model.backbone``, ``feedback.policy``, ``model.path``, else
    ``<run_dir>/sft``."""
    for value in (backbone, ctx.cfg.reward_model.backbone, ctx.cfg.feedback.policy):
        if value:
            return str(value)
    if ctx.cfg.model.path:
        return str(ctx.cfg.model.path)
    sft = ctx.run_dir / "sft"
    if (sft / "config.json").is_file():
        return str(sft)
    raise ConfigError(
        "stage=reward_model needs a backbone: set reward_model.backbone or model.path "
        "(e.g. the SFT policy folder)"
    )


def resolve_data(ctx: RunContext, data: Sequence[str | Path] | None = None) -> list[str]:
    """``data``, else ``reward_model.data``, else ``<run_dir>/feedback``."""
    paths = list(data) if data else list(ctx.cfg.reward_model.data or [])
    if paths:
        return [str(p) for p in paths]
    default = ctx.run_dir / "feedback"
    if not default.is_dir():
        raise ConfigError(
            "stage=reward_model needs feedback data: set reward_model.data=[<file or folder>] "
            f"or run stage=feedback into this run_dir first ({default} does not exist)"
        )
    return [str(default)]


def select_loss(ctx: RunContext) -> tuple[str, RewardLoss]:
    """The ``rm_loss`` of the active reward plugin (Bradley-Terry defaults when none has one)."""
    reward = ctx.cfg.get("reward") or {}
    known = set(ctx.registry.names("rm_loss"))
    names = [str(n) for n in reward if str(n) in known]
    size = int(ctx.cfg.reward_model.ensemble_size)
    for name in (str(n) for n in reward if str(n) in ctx.registry.names("learned_reward")):
        need = int(getattr(ctx.registry.get("learned_reward", name), "min_members", 1))
        if size < need:
            raise ConfigError(
                f"reward={name} scores with an ensemble of {need} or more members: set "
                f"reward_model.ensemble_size to {need} or more"
            )
    if len(names) > 1:
        raise ConfigError(
            f"stage=reward_model trains one preference model, but reward= names several "
            f"losses: {', '.join(names)}"
        )
    if not names:
        default = str(ctx.cfg.reward_model.get("default_loss") or RewardModelConfig.default_loss)
        console.print(f"reward_model: no active reward plugin defines a loss; using {default}")
        return default, ctx.registry.build("rm_loss", default, cfg=None)
    name = names[0]
    return name, ctx.registry.build("rm_loss", name, cfg=reward[name])


def usable_groups(groups: Sequence[PreferenceGroup], loss: RewardLoss) -> list[PreferenceGroup]:
    """Groups the loss can learn from: with an ordered pair, or with ratings."""
    if loss.requires == "ratings":
        return [g for g in groups if g.scores is not None and len(g.responses) >= 1]
    return [g for g in groups if g.pairs]


def _unit(key: str) -> float:
    # Salted: the task splits its own prompts by the same kind of hash of the id, so an
    # unsalted hash would find no training-split prompt below a small fraction.
    text = f"alignkit/reward_model/split/{key}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_groups(
    groups: Sequence[PreferenceGroup], fraction: float
) -> tuple[list[PreferenceGroup], list[PreferenceGroup]]:
    """(train, held-out) by a stable hash of each group's prompt, so a prompt is on one side.

    Hashing (not shuffling with the seed) keeps the held-out set fixed across seeds, so runs
    are compared on the same pairs.
    """
    if fraction <= 0:
        return list(groups), []
    keys = sorted({g.key for g in groups}, key=_unit)
    held = {k for k in keys if _unit(k) < fraction}
    if not held and len(keys) > 1:
        held.add(keys[0])
    if len(held) == len(keys) and len(keys) > 1:
        held.discard(keys[-1])
    return [g for g in groups if g.key not in held], [g for g in groups if g.key in held]


# --------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Optimisation settings of one reward model (a member of an ensemble)."""

    steps: int
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    max_length: int = 96
    seed: int = 0
    log_every: int = 10
    score_rows: int = 64
    """Sequences per forward: a step's sequences go through in length-sorted chunks."""
    template: str = "auto"
    """How groups' conversations are rendered (``task.template``)."""


def settings_from_config(rcfg: Any, train_groups: int, seed: int) -> TrainSettings:
    """``reward_model.*`` -> settings; ``steps`` null means ``ceil(epochs * groups / batch)``."""
    batch = int(rcfg.batch_size)
    if batch < 1:
        raise ConfigError(f"reward_model.batch_size must be >= 1, got {batch}")
    steps = rcfg.steps
    if steps is None:
        steps = max(1, math.ceil(float(rcfg.epochs) * train_groups / batch))
    return TrainSettings(
        steps=int(steps),
        batch_size=batch,
        lr=float(rcfg.lr),
        weight_decay=float(rcfg.weight_decay),
        warmup_steps=int(rcfg.warmup_steps),
        max_grad_norm=float(rcfg.max_grad_norm),
        max_length=int(rcfg.max_length),
        seed=seed,
        score_rows=int(rcfg.score_batch_size),
        log_every=max(1, int(rcfg.log_every)),
    )


def rating_stats(groups: Sequence[PreferenceGroup]) -> tuple[float, float]:
    """(mean, std) of every rating in ``groups`` ((0, 1) when there are none)."""
    values = [s for g in groups if g.scores is not None for s in g.scores]
    if len(values) < 2:
        return 0.0, 1.0
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), max(float(t.std(unbiased=False)), 1e-6)


def _batches(n: int, batch_size: int, rng: random.Random) -> Any:
    """Endless shuffled passes over ``range(n)``, ``batch_size`` indices at a time."""
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        yield order[:batch_size]
        order = order[batch_size:]


def score_by_length(model: ScalarHeadModel, ids: Tensor, mask: Tensor, rows: int) -> Tensor:
    """(N,) scores of right-padded (N, T) sequences, in chunks of ``rows`` similar lengths.

    A step's sequences are padded to its longest; with K responses per prompt a few long ones
    set T for all. Sorting by length and cutting each chunk to its own longest row skips those
    padding columns (on K = 16 rankings about half the tokens of a step). Scores, and the
    gradients through them, equal the one-batch forward's to float rounding.
    """
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    pieces = []
    for start in range(0, ids.shape[0], rows):
        chunk = order[start : start + rows]
        width = int(lengths[chunk].max())
        pieces.append(model.score(ids[chunk, :width], mask[chunk, :width]))
    return torch.cat(pieces)[torch.argsort(order)]


def _score_batch(
    model: ScalarHeadModel, batch: RewardBatch, ids: Tensor, mask: Tensor, rows: int
) -> Tensor:
    """(M,) scores of a training batch: packed (each prompt's tokens once) where the backbone
    has the lean path, else padded in length-sorted chunks."""
    if batch.packed is not None:
        scores = model.score_packed(batch.packed.to(ids.device))
        if scores is not None:
            return scores
    return score_by_length(model, ids, mask, rows)


def train_reward_model(
    model: ScalarHeadModel,
    tokenizer: Any,
    groups: Sequence[PreferenceGroup],
    loss_fn: RewardLoss,
    settings: TrainSettings,
    *,
    log: Callable[[dict[str, float], int], None] | None = None,
    progress_label: str | None = None,
    backend: Backend | None = None,
) -> dict[str, float]:
    """Optimise ``model`` in place on ``groups``; return the final training metrics.

    Each step forwards the batch's distinct sequences once (a response shared by several
    pairs of a ranking is not recomputed), reads the raw reward at each last token and calls
    ``loss_fn(rewards, batch)``. The model's normalisation buffers are reset to 0 / 1 so
    training sees raw rewards.

    With a multi-rank ``backend`` (``model`` already prepared by it) every rank draws the same
    batch of ``batch_size`` groups and trains on its contiguous share; gradients are averaged
    over ranks, so the step equals one process's when every share holds the same number of
    comparisons (pairwise feedback, or rankings of one size). Logged metrics are rank means.
    """
    backend = backend if backend is not None else CPUBackend({"device": "cpu"})
    if not groups:
        raise DataError("no feedback groups to train the reward model on")
    if settings.batch_size % backend.world_size:
        raise ConfigError(
            f"reward_model.batch_size={settings.batch_size} must be a multiple of the number "
            f"of ranks ({backend.world_size})"
        )
    model.mean.fill_(0.0)
    model.std.fill_(1.0)
    device = next(model.parameters()).device
    max_length = model_max_length(model, settings.max_length)
    stats = rating_stats(groups)
    optimizer = adamw(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = linear_warmup_decay(optimizer, settings.warmup_steps, settings.steps)
    batches = _batches(len(groups), settings.batch_size, random.Random(settings.seed))
    recent_loss: list[float] = []
    recent_acc: list[float] = []
    pairs_seen, sequences_seen, start = 0, 0, time.perf_counter()
    model.train()
    with _progress_bar(progress_label, settings.steps) as advance:
        for step in range(settings.steps):
            share = backend.shard(next(batches))
            batch = collate_groups(
                [groups[i] for i in share], tokenizer, max_length, stats, settings.template
            )
            with backend.autocast():
                ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
                if backend.distributed:  # every forward is collective: one per rank and step
                    rewards = model.score(ids, mask)
                else:
                    rewards = _score_batch(model, batch, ids, mask, settings.score_rows)
                rewards = rewards.float().cpu()
            loss = loss_fn(rewards, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            acc = pairwise_accuracy(
                rewards[batch.chosen].detach(), rewards[batch.rejected].detach()
            )
            loss_value = loss.item()
            if backend.distributed:
                means = backend.all_reduce_mean({"loss": loss_value, "accuracy": acc})
                loss_value, acc = means["loss"], means["accuracy"]
            pairs_seen += int(batch.chosen.numel()) * backend.world_size
            sequences_seen += int(batch.input_ids.shape[0]) * backend.world_size
            recent_loss = [*recent_loss[-9:], loss_value]
            recent_acc = [*recent_acc[-9:], acc] if not math.isnan(acc) else recent_acc
            if log is not None and (step % settings.log_every == 0 or step == settings.steps - 1):
                metrics = {"loss": loss_value, "grad_norm": float(grad_norm)}
                metrics |= {"accuracy": acc, "lr": scheduler.get_last_lr()[0]}
                log(metrics, step)
            advance(f"loss {loss_value:.3f}")
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "rm_loss": sum(recent_loss) / len(recent_loss),
        "rm_train_accuracy": sum(recent_acc) / len(recent_acc) if recent_acc else math.nan,
        "rm_steps": float(settings.steps),
        "rm_train_seconds": seconds,
        "rm_pairs_per_second": pairs_seen / max(seconds, 1e-9),
        "rm_sequences_per_second": sequences_seen / max(seconds, 1e-9),
    }


@contextlib.contextmanager
def _progress_bar(label: str | None, total: int) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(info)``: a rich progress bar when labelled, a no-op otherwise."""
    if label is None:
        yield lambda info: None
        return
    with progress_bar() as progress:
        bar = progress.add_task(label, total=total, info="")
        yield lambda info: progress.update(bar, advance=1, info=info)


# --------------------------------------------------------------------------------------------
# normalisation samples and the gold oracle
# --------------------------------------------------------------------------------------------


def normalization_samples(
    ctx: RunContext, groups: Sequence[PreferenceGroup]
) -> tuple[list[str], list[str], list[Conversation | None] | None]:
    """(prompts, responses, conversations) of the reference policy: fresh samples of
    ``reward_model.normalize_policy``, else the feedback's own responses (a seeded subset)."""
    rcfg = ctx.cfg.reward_model
    limit = int(rcfg.normalize_samples)
    if rcfg.normalize_policy:
        policy, tokenizer = load_model(ctx, str(rcfg.normalize_policy))
        records = ctx.task.train_prompts()
        # A seeded sample, not a prefix: the task lists its prompts kind by kind.
        records = random.Random(int(ctx.cfg.seed)).sample(records, min(limit, len(records)))
        generator = torch.Generator().manual_seed(int(ctx.cfg.seed) + 7)
        fmt = prompt_format(ctx.cfg, tokenizer, policy)
        batch_size = int(ctx.cfg.feedback.batch_size)

        def sample(part: Sequence[Any]) -> Any:
            return sample_policy(
                policy,
                tokenizer,
                ctx.task,
                part,
                max_new_tokens=int(ctx.cfg.feedback.max_new_tokens),
                temperature=1.0,
                batch_size=batch_size,
                max_prompt_tokens=int(ctx.cfg.task.max_prompt_tokens),
                generator=generator,
                fmt=fmt,
            )

        # In slices of whole batches, so progress shows (same samples as one call).
        samples = sample_with_progress(
            "normalisation sampling", records, batch_size, int(tokenizer.pad_token_id), sample
        )
        raw = template_mode(ctx.cfg) == "raw"
        convs: list[Conversation | None] = [conversation(ctx.task, r, raw) for r in records]
        return [ctx.task.format_prompt(r) for r in records], samples.responses, convs
    messages = {g.prompt: g.messages for g in groups}
    pairs = list(dict.fromkeys((g.prompt, r) for g in groups for r in g.responses))
    if len(pairs) > limit:
        pairs = random.Random(int(ctx.cfg.seed)).sample(pairs, limit)
    found = [messages.get(p) for p, _ in pairs]
    return [p for p, _ in pairs], [r for _, r in pairs], found if any(found) else None


def task_preferences(ctx: RunContext) -> list[PairwiseFeedback | RatingFeedback]:
    """The task's own preference data (``task.preference_data`` of ``task=data``) as
    feedback records; empty for a task without any.

    A pair becomes a pairwise record; an unpaired KTO-style record becomes a rating of 1
    (desirable) or 0, so a prompt's desirable responses are preferred to its undesirable
    ones (:func:`alignkit.data.feedback.to_groups`) under every reward-model loss.
    """
    prefs = getattr(ctx.task, "preferences", None)
    if prefs is None:
        return []
    source = str(ctx.cfg.task.preference_data)
    out: list[PairwiseFeedback | RatingFeedback] = []
    for p in prefs():
        prompt = ctx.task.format_prompt(p.prompt)
        if hasattr(p, "chosen"):
            out.append(
                PairwiseFeedback(prompt, p.chosen, p.rejected, p.margin, p.prompt.id, source)
            )
        else:
            score = 1.0 if p.label else 0.0
            out.append(RatingFeedback(prompt, p.completion, score, None, p.prompt.id, source))
    return out


def attach_conversations(ctx: RunContext, groups: Sequence[PreferenceGroup]) -> None:
    """Give each group whose ``prompt_id`` the task knows that prompt's conversation, so the
    reward model renders it in its own format (its chat template, ``task.template``)."""
    task = ctx.task
    if task is None or not hasattr(task, "all_prompts"):
        return
    raw = template_mode(ctx.cfg) == "raw"
    records = {str(getattr(r, "id", "")): r for r in task.all_prompts()}
    for pref in getattr(task, "preferences", list)():
        records.setdefault(pref.prompt.id, pref.prompt)
    for group in groups:
        record = records.get(str(group.prompt_id)) if group.prompt_id is not None else None
        if record is not None:
            group.messages = conversation(task, record, raw)


def _task_records(task: Any) -> dict[str, Any]:
    if task is None or not hasattr(task, "all_prompts") or not hasattr(task, "gold_score"):
        return {}
    return {r.id: r for r in task.all_prompts()}


def gold_oracle(task: Any) -> Callable[[PreferenceGroup, str], float | None] | None:
    """``gold(group, response)`` from the task's oracle, by ``prompt_id`` (None if unknown)."""
    records = _task_records(task)
    if not records:
        return None

    def gold(group: PreferenceGroup, response: str) -> float | None:
        record = records.get(group.prompt_id) if group.prompt_id is not None else None
        return None if record is None else float(task.gold_score(record, response))

    return gold


def prompt_kind(task: Any) -> Callable[[PreferenceGroup], str | None] | None:
    """``kind(group)``: the task record's ``kind`` (e.g. arith), for per-kind agreement."""
    records = _task_records(task)
    if not records:
        return None
    return lambda group: getattr(records.get(group.prompt_id or ""), "kind", None)


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------


def init_members(ctx: RunContext, init: str | Path | None) -> list[Path] | None:
    """The folders each member goes on training from (``reward_model.init``), one per member;
    None: fresh heads on the backbone."""
    folder = init or ctx.cfg.reward_model.get("init")
    if not folder:
        return None
    members = member_folders(folder)
    size = max(1, int(ctx.cfg.reward_model.ensemble_size))
    trained = all(is_scalar_head_folder(m) for m in members)
    if trained and merged(ctx) and len(members) == 1:
        return members * size  # WARM: every member goes on from the one averaged model
    if len(members) != size or not trained:
        found = f"{len(members)} member(s)" if trained else "no trained reward model"
        raise ConfigError(
            f"reward_model.init={folder}: expected a trained reward model with {size} "
            f"member(s) (reward_model.ensemble_size), found {found}"
        )
    return members


MERGES: tuple[str, ...] = ("none", "average")


def merged(ctx: RunContext) -> bool:
    """Whether the ensemble's members are averaged into one model (``reward_model.merge``):
    not when an active reward scores several members side by side (``min_members > 1``)."""
    merge = str(ctx.cfg.reward_model.get("merge", "none"))
    if merge not in MERGES:
        raise ConfigError(f"reward_model.merge={merge!r}; expected one of {', '.join(MERGES)}")
    if merge != "average" or int(ctx.cfg.reward_model.ensemble_size) < 2:
        return False
    return max(_min_members(ctx), default=1) < 2


def _min_members(ctx: RunContext) -> list[int]:
    learned = set(ctx.registry.names("learned_reward"))
    return [
        int(getattr(ctx.registry.get("learned_reward", str(n)), "min_members", 1))
        for n in (ctx.cfg.get("reward") or {})
        if str(n) in learned
    ]


@torch.no_grad()
def average_weights(members: Sequence[RewardScorer]) -> RewardScorer:
    """The first member with every parameter replaced by the members' mean (WARM, Ramé et al.
    2024, eq. 1: ``phi = (1/M) sum_i phi_i``), in place.

    Parameter by parameter, so under FSDP each rank averages its own shards (the members are
    sharded alike) and no full copy is gathered. Buffers stay the first member's: the
    normalisation is fitted afterwards, and the others are the backbone's constants.
    """
    params = [list(m.model.parameters()) for m in members]
    for group in zip(*params, strict=True):
        total = group[0].detach().clone()
        for p in group[1:]:
            total.add_(p.detach())
        group[0].copy_(total.div_(len(group)))
    return members[0]


def _train_member(
    ctx: RunContext,
    index: int,
    backbone: str,
    train: Sequence[PreferenceGroup],
    loss_fn: RewardLoss,
) -> tuple[RewardScorer, dict[str, float]]:
    rcfg = ctx.cfg.reward_model
    seed = int(ctx.cfg.seed) + index
    # The head is initialised from torch's global RNG: seeding here gives each ensemble member
    # its own head (and data order), the only differences between members on one backbone.
    # Members to be averaged share the head's initialisation (WARM needs one starting point)
    # and differ in data order only.
    torch.manual_seed(int(ctx.cfg.seed) if merged(ctx) else seed)
    model = ScalarHeadModel.from_pretrained(
        backbone, trust_remote_code=bool(ctx.cfg.model.trust_remote_code), device=ctx.device
    )
    # Placed and (under FSDP) sharded before the optimizer sees the parameters.
    model = ctx.backend.prepare_model(model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        backbone, trust_remote_code=bool(ctx.cfg.model.trust_remote_code)
    )
    settings = settings_from_config(rcfg, len(train), seed)
    settings.template = template_mode(ctx.cfg)
    suffix = f" {index}" if int(rcfg.ensemble_size) > 1 else ""

    def log(metrics: dict[str, float], step: int) -> None:
        prefix = f"member_{index}/" if int(rcfg.ensemble_size) > 1 else ""
        ctx.tracker.log({prefix + k: v for k, v in metrics.items()}, step=step, stage=STAGE)

    metrics = train_reward_model(
        model,
        tokenizer,
        train,
        loss_fn,
        settings,
        log=log,
        progress_label=f"reward model{suffix}",
        backend=ctx.backend,
    )
    scorer = RewardScorer(
        model,
        tokenizer,
        batch_size=int(rcfg.score_batch_size),
        max_length=int(rcfg.max_length),
        template=settings.template,
    )
    return scorer, metrics


def _save(ctx: RunContext, members: list[RewardScorer]) -> Path:
    out = ctx.run_dir / "reward_model"
    # Under FSDP the shards are gathered (a collective) into plain models on rank 0.
    plain = [ctx.backend.unwrap(m.model) for m in members]
    if ctx.is_main_process:
        _write_members(out, [p for p in plain if p is not None], members)
    ctx.backend.barrier()
    return out


def _write_members(out: Path, models: list[Any], members: list[RewardScorer]) -> Path:
    if len(members) == 1:
        return models[0].save_pretrained(out, members[0].tokenizer)

    def fill(tmp: Path) -> None:
        for i, (model, member) in enumerate(zip(models, members, strict=True)):
            model.save_pretrained(tmp / f"member_{i}", member.tokenizer)

    return atomic_write_dir(out, fill)


def run_reward_model(
    ctx: RunContext,
    data: Sequence[str | Path] | None = None,
    backbone: str | Path | None = None,
    init: str | Path | None = None,
) -> dict[str, float]:
    """Train (an ensemble of) reward model(s) on feedback; save ``<run_dir>/reward_model``.

    ``init`` (else ``reward_model.init``): a trained reward model to go on training."""
    rcfg = ctx.cfg.reward_model
    # Under several ranks the feedback may just have been written by rank 0 (pipeline).
    ctx.backend.barrier()
    loss_name, loss_fn = select_loss(ctx)
    task_prefs = [] if data or ctx.cfg.reward_model.data else task_preferences(ctx)
    paths = [str(ctx.cfg.task.preference_data)] if task_prefs else resolve_data(ctx, data)
    backbone_path = resolve_backbone(ctx, backbone)
    starts = init_members(ctx, init)
    if task_prefs:
        records: list[Any] = task_prefs
        report = check_feedback(records)
    else:
        records, report = load_feedback(paths, rating_scale=int(ctx.cfg.feedback.rating_scale))
    print_report("reward_model data", report.lines())
    groups = usable_groups(to_groups(records, loss_attribute(loss_fn)), loss_fn)
    attach_conversations(ctx, groups)
    if not groups:
        raise DataError(
            f"{', '.join(paths)}: no feedback that reward={loss_name} can learn from "
            f"(it needs {loss_fn.requires}; found {report.formats})"
        )
    train, heldout = split_groups(groups, float(rcfg.eval_fraction))
    if not train:
        raise DataError(f"{', '.join(paths)}: every prompt was held out; lower eval_fraction")
    console.print(
        f"reward_model: {loss_name} loss on {len(train)} train / {len(heldout)} held-out groups, "
        + (
            f"extending {init or ctx.cfg.reward_model.init}"
            if starts
            else f"backbone {backbone_path}"
        )
    )
    members: list[RewardScorer] = []
    summary: dict[str, float] = {}
    for i in range(max(1, int(rcfg.ensemble_size))):
        source = str(starts[i]) if starts else backbone_path
        scorer, metrics = _train_member(ctx, i, source, train, loss_fn)
        members.append(scorer)
        # The first member's training numbers; the time is the whole ensemble's.
        seconds = summary.get("rm_train_seconds", 0.0) + metrics["rm_train_seconds"]
        summary = {**(summary or metrics), "rm_train_seconds": seconds}
    if merged(ctx):
        member_accuracy = _evaluate(ctx, members, heldout)
        members = [average_weights(members)]
        summary |= {k: v for k, v in member_accuracy.items() if k.startswith("rm_member_")}
    summary |= _normalize(ctx, members, groups)
    summary |= _evaluate(ctx, members, heldout)
    out = _save(ctx, members)
    console.print(f"reward model saved to {out}")
    ctx.tracker.log(
        {k: v for k, v in summary.items() if k.startswith("rm_heldout") or "gold" in k},
        step=int(summary["rm_steps"]),
        stage=STAGE,
    )
    return {
        **summary,
        "rm_train_groups": float(len(train)),
        "rm_heldout_groups": float(len(heldout)),
        **{k.replace("feedback_", "rm_data_"): v for k, v in report.metrics().items()},
    }


def _normalize(
    ctx: RunContext, members: list[RewardScorer], groups: Sequence[PreferenceGroup]
) -> dict[str, float]:
    if not bool(ctx.cfg.reward_model.normalize):
        return {"rm_norm_mean": 0.0, "rm_norm_std": 1.0}
    prompts, responses, convs = normalization_samples(ctx, groups)
    # One scoring pass per member; its batches are sorted by length over all samples, so it
    # is not cut into slices (that would change the batches): progress counts members.
    stats = []
    with tracked(f"reward model normalisation ({len(prompts)} samples)", len(members)) as advance:
        for m in members:
            stats.append(fit_normalization(m, prompts, responses, convs))
            advance(1, f"mean {stats[-1][0]:.3f} std {stats[-1][1]:.3f}")
    return {
        "rm_norm_mean": sum(s[0] for s in stats) / len(stats),
        "rm_norm_std": sum(s[1] for s in stats) / len(stats),
    }


def _evaluate(
    ctx: RunContext, members: list[RewardScorer], heldout: Sequence[PreferenceGroup]
) -> dict[str, float]:
    if not heldout:
        console.print("reward_model: no held-out prompts (eval_fraction=0); no accuracy reported")
        return {}
    gold, kind = gold_oracle(ctx.task), prompt_kind(ctx.task)
    scorer: Scorer = members[0] if len(members) == 1 else EnsembleScorer(members, mode="mean")
    out = heldout_metrics(heldout, score_groups(scorer, heldout), gold, kind)
    if len(members) > 1:
        for i, member in enumerate(members):
            member_metrics = heldout_metrics(heldout, score_groups(member, heldout), gold)
            out[f"rm_member_{i}_heldout_accuracy"] = member_metrics["rm_heldout_accuracy"]
    return out
