"""Reward models shared by the reward-model stage and the reward plugins.

* Encoding: a (prompt, response) text pair becomes ``prompt + " " + response + EOS`` in the
  reward model's *own* tokenizer, so a reward model trained with a different tokenizer than
  the policy scores the policy's rollouts after a decode -> text -> re-encode round trip
  (the N implementation details of RLHF, Huang et al. 2024). The reward is read at the last
  non-pad token, the EOS (:meth:`alignkit.models.ScalarHeadModel.score`). A rollout cut at
  ``rl.max_new_tokens`` (``Rollout.finished`` False) gets no EOS: the reward model, which
  only ever saw ended responses, then reads an unterminated text rather than one that looks
  finished.
* :class:`RewardScorer`: batched, length-sorted scoring of texts with a trained model; its
  output is normalised with the model's saved mean / std (:func:`fit_normalization`).
* :class:`EnsembleScorer` and :func:`ensemble_reward`: mean, conservative and worst-case
  combination of several reward models (Eisenstein et al. 2023; Coste et al. 2023).
* :class:`RewardBatch` / :func:`collate_groups`: the training batch every loss reads, and the
  :class:`RewardLoss` protocol the ``rm_loss`` components implement.
* Held-out metrics: pairwise accuracy against the labels and against the gold oracle.
* :class:`LearnedRewardConfig` and :func:`reward_hook`: what each learned-reward plugin shares.

Shapes: M = distinct sequences in a batch, T = sequence length, P = comparison pairs,
G = groups (prompts), K = the largest group's number of responses, E = ensemble members.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from alignkit.config import RewardConfig, store_reward
from alignkit.data.chat import Conversation, PromptFormat
from alignkit.data.feedback import PreferenceGroup
from alignkit.errors import ConfigError
from alignkit.hookspecs import hookimpl
from alignkit.models import HEAD_WEIGHTS_NAME, ScalarHeadModel, is_scalar_head_folder
from alignkit.models.packing import PackedSequences, pack_sequences

if TYPE_CHECKING:
    from alignkit.batch import Rollout
    from alignkit.context import RunContext

ENSEMBLE_MODES: tuple[str, ...] = ("mean", "conservative", "min")

# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------


def model_max_length(model: ScalarHeadModel, limit: int | None = None) -> int:
    """The longest sequence the backbone's position table allows, capped at ``limit``."""
    config = model.config
    known = [getattr(config, name, None) for name in ("n_positions", "max_position_embeddings")]
    sizes = [int(v) for v in known if isinstance(v, int) and v > 0]
    if limit is not None:
        sizes.append(int(limit))
    return min(sizes) if sizes else 512


def encode_parts(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int,
    conversations: Sequence[Conversation | None] | None = None,
    template: str = "auto",
    finished: Sequence[bool] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per row, in the reward model's own format.

    With ``conversations`` (each row's prompt messages, or None to use the row's text), every
    row is rendered by this tokenizer's :class:`~alignkit.data.chat.PromptFormat` under
    ``template``: its chat template if it has one, whatever the policy's was. Without, a row
    is ``prompt + " " + response + EOS`` of the given prompt text.

    ``finished`` (per row; None: every row) says which responses ended. Only those are closed
    by EOS (or the chat template's end-of-turn token); a response cut at the length limit is
    left open, so the reward is read at its last token, not at a stop it never emitted.

    Prompt and response are tokenised apart (as in SFT), so the response tokens do not depend
    on how the prompt ends, and one prompt's rows share its ids exactly. A row longer than
    ``max_length`` loses tokens from the left: the end of the response and its stop token,
    where the reward is read, are kept.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ended = [True] * len(responses) if finished is None else [bool(f) for f in finished]
    if len(ended) != len(responses):
        raise ValueError(f"{len(ended)} finished flags but {len(responses)} responses")
    if not prompts:
        return []
    if conversations is not None:
        return _encode_conversations(
            PromptFormat(tokenizer, template, key="task.template"),
            [p if c is None else c for p, c in zip(prompts, conversations, strict=True)],
            responses,
            max_length,
            ended,
        )
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    texts = [" " + r.strip() if r.strip() else "" for r in responses]
    r_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    # Tokenizers that expect a leading BOS (e.g. Llama's) get it; GPT-2 style ones do not.
    bos = (
        [int(tokenizer.bos_token_id)]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
        else []
    )
    return [
        _cut_left(bos + p, r + eos if done else r, max_length)
        for p, r, done in zip(p_ids, r_ids, ended, strict=True)
    ]


def _cut_left(head: list[int], tail: list[int], max_length: int) -> tuple[list[int], list[int]]:
    cut = max(0, len(head) + len(tail) - max_length)
    return head[cut:], tail[max(0, cut - len(head)) :]


def _unterminated(response_ids: list[int], closers: set[int]) -> list[int]:
    """``response_ids`` without the stop token that closes them (the format adds exactly one)."""
    return response_ids[:-1] if response_ids and response_ids[-1] in closers else response_ids


def _encode_conversations(
    fmt: PromptFormat,
    prompts: Sequence[Conversation],
    responses: Sequence[str],
    max_length: int,
    finished: Sequence[bool],
) -> list[tuple[list[int], list[int]]]:
    # One prompt encoding per distinct conversation: a group's responses share it exactly.
    keys = [p if isinstance(p, str) else repr([sorted(m.items()) for m in p]) for p in prompts]
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    encoded = dict(
        zip(first, fmt.encode_prompts([prompts[i] for i in first.values()]), strict=True)
    )
    heads = [encoded[key] for key in keys]
    tails = fmt.encode_responses(prompts, responses)
    # A reply is closed by the template's end-of-turn token, or EOS when it has none.
    closers = {
        *fmt.stop_ids,
        *([] if fmt.tokenizer.eos_token_id is None else [fmt.tokenizer.eos_token_id]),
    }
    tails = [
        t if done else _unterminated(t, closers) for t, done in zip(tails, finished, strict=True)
    ]
    return [_cut_left(h, t, max_length) for h, t in zip(heads, tails, strict=True)]


def encode_texts(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> list[list[int]]:
    """Token ids of ``prompt + " " + response + EOS`` per row (:func:`encode_parts` joined)."""
    return [p + r for p, r in encode_parts(tokenizer, prompts, responses, max_length)]


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(M, T) right-padded ids and attention mask of ``sequences``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


class Scorer(Protocol):
    """Anything that scores (prompt, response) texts: one model or an ensemble.

    ``conversations`` optionally gives each row's prompt messages, which a scorer renders in
    its own format instead of reading the prompt text; ``finished`` which responses ended
    (None: all), the others being scored as cut off (:func:`encode_parts`).
    """

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        conversations: Sequence[Conversation | None] | None = None,
        finished: Sequence[bool] | None = None,
    ) -> Tensor: ...


@dataclass
class RewardScorer:
    """Batched scoring of text pairs with a :class:`ScalarHeadModel` and its own tokenizer."""

    model: ScalarHeadModel
    tokenizer: Any
    batch_size: int = 64
    max_length: int | None = None
    """Tokens per sequence; null: the backbone's position limit."""
    template: str = "auto"
    """How conversations are rendered for this model (``task.template``)."""

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        conversations: Sequence[Conversation | None] | None = None,
        finished: Sequence[bool] | None = None,
    ) -> Tensor:
        """(B,) float32 normalised rewards, on the CPU.

        ``conversations`` (optional, per row) are re-rendered in this model's own format;
        rows whose ``finished`` flag is False get no EOS (:func:`encode_parts`). Rows are
        sorted by length before batching, so a batch pads to similar lengths, and put back
        in order afterwards.
        """
        limit = model_max_length(self.model, self.max_length)
        parts = encode_parts(
            self.tokenizer, prompts, responses, limit, conversations, self.template, finished
        )
        seqs = [p + r for p, r in parts]
        out = torch.zeros(len(seqs), dtype=torch.float32)
        if not seqs:
            return out
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        pad = _pad_id(self.tokenizer)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask = pad_right([seqs[i] for i in rows], pad)
            values = self.model.score(ids.to(device), mask.to(device))
            out[torch.tensor(rows)] = values.float().cpu()
        self.model.train(was_training)
        return out


def ensemble_reward(scores: Tensor, mode: str = "mean", k: float = 1.0) -> Tensor:
    """Combine (E, B) member scores into (B,) rewards.

    * ``mean``: ``mean_e r_e`` (Eisenstein et al. 2023, mean aggregation).
    * ``conservative``: ``mean_e r_e - k * std_e r_e`` with the population std (1/E), a
      lower-confidence bound that penalises responses the members disagree on; Coste et al.
      (2023) use the variance in the same role (uncertainty-weighted optimisation).
    * ``min``: ``min_e r_e``, worst-case optimisation (Coste et al. 2023).
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"expected (E, B) member scores, got shape {tuple(scores.shape)}")
    if mode == "mean":
        return scores.mean(0)
    if mode == "conservative":
        return scores.mean(0) - k * scores.std(0, unbiased=False)
    if mode == "min":
        return scores.min(0).values
    raise ConfigError(f"unknown ensemble mode {mode!r}; known modes: {', '.join(ENSEMBLE_MODES)}")


@dataclass
class EnsembleScorer:
    """Scores with every member (each normalised on its own) and combines them."""

    members: list[RewardScorer]
    mode: str = "mean"
    k: float = 1.0

    def member_scores(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        conversations: Sequence[Conversation | None] | None = None,
        finished: Sequence[bool] | None = None,
    ) -> Tensor:
        """(E, B) normalised score of each member."""
        return torch.stack(
            [m.score(prompts, responses, conversations, finished) for m in self.members]
        )

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        conversations: Sequence[Conversation | None] | None = None,
        finished: Sequence[bool] | None = None,
    ) -> Tensor:
        scores = self.member_scores(prompts, responses, conversations, finished)
        return ensemble_reward(scores, self.mode, self.k)


def member_folders(path: str | Path) -> list[Path]:
    """``path`` itself, or its ``member_<i>`` folders when it holds a trained ensemble."""
    path = Path(path)
    members = sorted(
        (p for p in path.glob("member_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1])
    )
    return members or [path]


def load_scorer(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    max_length: int | None = None,
    key: str = "path",
    template: str = "auto",
) -> RewardScorer:
    """A :class:`RewardScorer` for a trained reward-model folder; ``key`` names the config entry
    in errors."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not is_scalar_head_folder(folder) and len(member_folders(folder)) > 1:
        raise ConfigError(
            f"{key}={path} holds an ensemble of {len(member_folders(folder))} reward models "
            "(member_<i> folders): score with all of them through an ensemble reward (one whose "
            "config takes `paths`), or name one member's folder"
        )
    if not is_scalar_head_folder(folder):
        raise ConfigError(
            f"{key}={path}: not a trained reward model (neither a sequence-classification "
            f"folder with one label nor {HEAD_WEIGHTS_NAME}); train one with stage=reward_model"
        )
    model = ScalarHeadModel.from_pretrained(folder, device=device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return RewardScorer(
        model, tokenizer, batch_size=batch_size, max_length=max_length, template=template
    )


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def fit_normalization(
    scorer: RewardScorer,
    prompts: Sequence[str],
    responses: Sequence[str],
    conversations: Sequence[Conversation | None] | None = None,
) -> tuple[float, float]:
    """Set the model's mean / std so its scores on these samples have mean 0 and std 1.

    The samples should come from the reference policy (Ziegler et al. 2019, Sec. 2.2): the RL
    reward then starts centred with unit scale whatever the loss left as offset, so KL
    coefficients and learning rates transfer between reward models. Returns (mean, std).
    """
    if len(prompts) < 2:
        raise ValueError("normalisation needs at least 2 samples")
    model = scorer.model
    model.mean.fill_(0.0)
    model.std.fill_(1.0)
    raw = scorer.score(prompts, responses, conversations)
    mean = float(raw.mean())
    std = max(float(raw.std(unbiased=False)), 1e-6)  # a constant model keeps a finite scale
    model.mean.fill_(mean)
    model.std.fill_(std)
    return mean, std


# --------------------------------------------------------------------------------------------
# training batches and the loss protocol
# --------------------------------------------------------------------------------------------


@dataclass
class RewardBatch:
    """One training batch of groups; losses index the (M,) rewards with these tensors."""

    input_ids: Tensor
    """(M, T) right-padded distinct (prompt, response) sequences of the batch."""
    attention_mask: Tensor
    """(M, T) 1 on real tokens."""
    chosen: Tensor
    """(P,) row of the preferred response of each comparison."""
    rejected: Tensor
    """(P,) row of the other response."""
    margin: Tensor
    """(P,) float preference strength of each comparison (0 when the data has none)."""
    pair_group: Tensor
    """(P,) group of each comparison."""
    index: Tensor
    """(G, K) row of each group's k-th response; -1 pads shorter groups."""
    ranks: Tensor
    """(G, K) dense ranks, 0 best, equal for ties; padding holds a rank below every real one."""
    targets: Tensor
    """(G, K) float rating targets (standardised), NaN where there is none or padding."""
    packed: PackedSequences | None = None
    """The same (M,) rows packed, each prompt's tokens once (:mod:`alignkit.models.packing`)."""

    @property
    def mask(self) -> Tensor:
        """(G, K) bool, True on real responses."""
        return self.index >= 0

    def group_rewards(self, rewards: Tensor) -> Tensor:
        """(M,) rewards -> (G, K) rewards per group slot (0 on padding)."""
        return rewards[self.index.clamp(min=0)].masked_fill(~self.mask, 0.0)


def collate_groups(
    groups: Sequence[PreferenceGroup],
    tokenizer: Any,
    max_length: int,
    target_stats: tuple[float, float] = (0.0, 1.0),
    template: str = "auto",
) -> RewardBatch:
    """Encode a batch of groups; a (prompt, response) seen twice is encoded and run once.

    ``target_stats`` (mean, std) standardise rating targets, so regression learns outputs of
    unit scale whatever the rating scale.
    """
    rows: dict[tuple[str, str], int] = {}
    prompts: list[str] = []
    responses: list[str] = []
    convs: list[Conversation | None] = []
    k = max(len(g.responses) for g in groups)
    index = torch.full((len(groups), k), -1, dtype=torch.long)
    ranks = torch.full((len(groups), k), 1 << 30, dtype=torch.long)
    targets = torch.full((len(groups), k), math.nan)
    chosen: list[int] = []
    rejected: list[int] = []
    margins: list[float] = []
    pair_group: list[int] = []
    mean, std = target_stats
    for g, group in enumerate(groups):
        for j, response in enumerate(group.responses):
            key = (group.prompt, response)
            if key not in rows:
                rows[key] = len(prompts)
                prompts.append(group.prompt)
                responses.append(response)
                convs.append(group.messages)
            index[g, j] = rows[key]
            ranks[g, j] = group.ranks[j]
            if group.scores is not None:
                targets[g, j] = (group.scores[j] - mean) / std
        for a, b, margin in group.pairs:
            chosen.append(int(index[g, a]))
            rejected.append(int(index[g, b]))
            margins.append(float(margin))
            pair_group.append(g)
    with_messages = None if all(c is None for c in convs) else convs
    parts = encode_parts(tokenizer, prompts, responses, max_length, with_messages, template)
    ids, mask = pad_right([p + r for p, r in parts], _pad_id(tokenizer))
    return RewardBatch(
        input_ids=ids,
        attention_mask=mask,
        packed=pack_sequences([p for p, _ in parts], [r for _, r in parts]),
        chosen=torch.tensor(chosen, dtype=torch.long),
        rejected=torch.tensor(rejected, dtype=torch.long),
        margin=torch.tensor(margins, dtype=torch.float32),
        pair_group=torch.tensor(pair_group, dtype=torch.long),
        index=index,
        ranks=ranks,
        targets=targets,
    )


class RewardLoss(Protocol):
    """A preference model's training loss: an ``rm_loss`` component.

    ``requires`` says which groups it can learn from: ``"pairs"`` (at least one ordered pair:
    every format) or ``"ratings"`` (groups with scores). A plugin registers a factory
    ``factory(cfg) -> RewardLoss`` with ``registry.add("rm_loss", name, factory)``; ``cfg`` is
    its ``reward.<name>`` config node, or None for the schema's defaults.
    """

    requires: ClassVar[str]

    def __call__(self, rewards: Tensor, batch: RewardBatch) -> Tensor:
        """(M,) raw rewards of the batch's sequences -> scalar loss."""
        ...


def loss_attribute(loss: Any) -> str | None:
    """The rating attribute a loss trains on (``attribute`` field), None for the overall score."""
    value = getattr(loss, "attribute", None)
    return str(value) if value else None


# --------------------------------------------------------------------------------------------
# held-out metrics
# --------------------------------------------------------------------------------------------


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Fraction of pairs with ``r(chosen) > r(rejected)``; an exact tie counts one half."""
    if chosen.numel() == 0:
        return math.nan
    wins = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    return float(wins.mean())


def group_conversations(groups: Sequence[PreferenceGroup]) -> list[Conversation | None] | None:
    """Each response row's prompt messages (None where a group has none), or None when no
    group carries messages (the prompt texts are then encoded as they are)."""
    if all(g.messages is None for g in groups):
        return None
    return [g.messages for g in groups for _ in g.responses]


def score_groups(scorer: Scorer, groups: Sequence[PreferenceGroup]) -> list[list[float]]:
    """Each group's response scores, from one batched scoring call over all of them."""
    prompts = [g.prompt for g in groups for _ in g.responses]
    responses = [r for g in groups for r in g.responses]
    flat = scorer.score(prompts, responses, group_conversations(groups)).tolist()
    out, start = [], 0
    for g in groups:
        out.append(flat[start : start + len(g.responses)])
        start += len(g.responses)
    return out


def heldout_metrics(
    groups: Sequence[PreferenceGroup],
    scores: Sequence[Sequence[float]],
    gold: Callable[[PreferenceGroup, str], float | None] | None = None,
    category: Callable[[PreferenceGroup], str | None] | None = None,
) -> dict[str, float]:
    """Accuracy of ``scores`` on the groups' labelled pairs, and agreement with a gold oracle.

    * ``rm_heldout_accuracy``: r(chosen) > r(rejected) against the (possibly noisy) labels.
    * ``rm_gold_agreement``: on the same pairs, agreement with the gold oracle's preference;
      a pair the oracle scores equal counts one half (it has no preferred side).
    * ``rm_gold_agreement_noise_free``: only pairs whose gold scores differ.

    ``gold(group, response)`` returns None when the prompt is unknown to the oracle; the gold
    keys are then computed on the pairs it knows, and left out when there are none. With
    ``category(group)`` (e.g. the task's prompt kind) the noise-free agreement is also given per
    category, as ``rm_gold_agreement_noise_free/<category>``.
    """
    chosen, rejected = [], []
    agree, noise_free = [], []
    by_category: dict[str, list[float]] = {}
    for group, values in zip(groups, scores, strict=True):
        name = category(group) if category is not None else None
        golds = [gold(group, r) for r in group.responses] if gold is not None else None
        for a, b, _ in group.pairs:
            chosen.append(values[a])
            rejected.append(values[b])
            if golds is None or golds[a] is None or golds[b] is None:
                continue
            g_a, g_b = float(golds[a]), float(golds[b])  # type: ignore[arg-type]
            hit = _agreement(values[a] - values[b], g_a - g_b)
            agree.append(hit)
            if g_a != g_b:
                noise_free.append(hit)
                if name is not None:
                    by_category.setdefault(name, []).append(hit)
    out = {
        "rm_heldout_accuracy": pairwise_accuracy(torch.tensor(chosen), torch.tensor(rejected)),
        "rm_heldout_pairs": float(len(chosen)),
    }
    if agree:
        out["rm_gold_agreement"] = sum(agree) / len(agree)
    if noise_free:
        out["rm_gold_agreement_noise_free"] = sum(noise_free) / len(noise_free)
        out["rm_noise_free_pairs"] = float(len(noise_free))
    for name, hits in sorted(by_category.items()):
        out[f"rm_gold_agreement_noise_free/{name}"] = sum(hits) / len(hits)
    return out


def _agreement(model_gap: float, gold_gap: float) -> float:
    if gold_gap == 0 or model_gap == 0:
        return 0.5
    return 1.0 if (model_gap > 0) == (gold_gap > 0) else 0.0


# --------------------------------------------------------------------------------------------
# reward plugins
# --------------------------------------------------------------------------------------------


@dataclass
class LearnedRewardConfig(RewardConfig):
    """Base of the learned-reward plugins' nodes (``reward.<name>``)."""

    path: str | None = None
    """The trained reward-model folder that scores rollouts in RL (``stage=reward_model``
    writes ``<run_dir>/reward_model``)."""
    batch_size: int = 64
    """Sequences per forward when scoring rollouts."""
    max_length: int | None = None
    """Tokens per scored sequence; null: the reward model's position limit."""


def rollout_texts(batch: Rollout, tokenizer: Any) -> tuple[list[str], list[str]]:
    """The batch's prompt and response texts, decoded from its tokens when not given."""
    from alignkit.models.generation import decode_responses

    prompts = list(batch.prompts)
    if len(prompts) != batch.num_rows:
        prompts = [
            tokenizer.decode(
                [t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True
            )
            for ids, mask in zip(batch.prompt_ids.tolist(), batch.prompt_mask.tolist(), strict=True)
        ]
    responses = list(batch.responses)
    if len(responses) != batch.num_rows:
        responses = decode_responses(tokenizer, batch.response_ids, batch.response_mask)
    return prompts, responses


def scorer_for(ctx: RunContext, name: str) -> Scorer:
    """The scorer of reward plugin ``name``, loaded once per run (kept in ``ctx.state``).

    Plain (not JSON-able) objects in ``ctx.state`` are not checkpointed, which is right for a
    frozen model that is re-read from its folder. A path left unset in the config is the
    reward model the pipeline trained in this run (``ctx.artifacts.reward_model``).
    """
    key = f"{name}/scorer"
    if key not in ctx.state:
        node = ctx.cfg.reward[name]
        trained = ctx.artifacts.reward_model
        if "paths" in node:
            paths = list(node.paths or []) or ([str(trained)] if trained else [])
            ctx.state[key] = _ensemble_from_config(ctx, name, node, paths)
        else:
            path = node.path or trained
            if not path:
                raise ConfigError(
                    f"reward.{name}.path is not set: the trained reward-model folder that scores "
                    f"rollouts (e.g. reward.{name}.path=<run_dir>/reward_model)"
                )
            ctx.state[key] = load_scorer(
                str(path),
                device=ctx.device,
                batch_size=int(node.batch_size),
                max_length=node.max_length,
                key=f"reward.{name}.path",
                template=_template(ctx),
            )
    return ctx.state[key]


def _template(ctx: RunContext) -> str:
    from alignkit.data.prompts import template_mode

    return template_mode(ctx.cfg)


def _ensemble_from_config(
    ctx: RunContext, name: str, node: Any, entries: list[Any]
) -> EnsembleScorer:
    paths = [p for entry in entries for p in member_folders(str(entry))]
    if not paths:
        raise ConfigError(
            f"reward.{name}.paths is empty: list the reward-model folders of the ensemble "
            f"(a folder holding member_<i> folders counts as all of them)"
        )
    if str(node.mode) not in ENSEMBLE_MODES:
        raise ConfigError(
            f"reward.{name}.mode={node.mode!r}; known modes: {', '.join(ENSEMBLE_MODES)}"
        )
    members = [
        load_scorer(
            p,
            device=ctx.device,
            batch_size=int(node.batch_size),
            max_length=node.max_length,
            key=f"reward.{name}.paths",
            template=_template(ctx),
        )
        for p in paths
    ]
    return EnsembleScorer(members, mode=str(node.mode), k=float(node.k))


def reward_hook(ctx: RunContext, batch: Rollout, name: str) -> dict[str, Tensor]:
    """The ``reward`` hook of a learned-reward plugin: ``{name: (B,) scores}``.

    Texts are re-encoded with the reward model's tokenizer, which may differ from the
    policy's; a response cut at ``rl.max_new_tokens`` is re-encoded without EOS.
    """
    prompts, responses = rollout_texts(batch, ctx.tokenizer)
    convs = rollout_conversations(ctx, batch)
    return {name: scorer_for(ctx, name).score(prompts, responses, convs, rollout_finished(batch))}


def rollout_finished(batch: Rollout) -> list[bool] | None:
    """Per row, whether the response emitted a stop token (None: the rollout did not say,
    and every response is taken as ended)."""
    if batch.finished is None:
        return None
    return [bool(f) for f in batch.finished.tolist()]


def rollout_conversations(ctx: RunContext, batch: Rollout) -> list[Conversation | None] | None:
    """The batch's prompt conversations from the task's records (None without records), so
    a reward model renders them in its own format."""
    from alignkit.data.prompts import conversation, template_mode

    records = list(batch.records)
    if len(records) != batch.num_rows or ctx.task is None:
        return None
    raw = template_mode(ctx.cfg) == "raw"
    return [conversation(ctx.task, r, raw) for r in records]


class LearnedRewardPlugin:
    """The hooks every learned-reward plugin shares, for plugin ``name``.

    Registers the config schema under ``reward.<name>``, the plugin as a ``learned_reward``
    component (the pipeline trains a reward model for it when no path is set; ``min_members``
    is the smallest ``reward_model.ensemble_size`` it can score with) and its ``rm_loss``
    when it has one; at run start it loads the scorer (failing before the first step when
    there is nothing to load), and its ``reward`` scores each rollout as component ``name``.
    A plugin module binds them as its hooks::

        _plugin = LearnedRewardPlugin(NAME, MyConfig, loss=make_loss)
        register_configs = _plugin.register_configs
        register_components = _plugin.register_components
        run_start, reward = _plugin.run_start, _plugin.reward
    """

    def __init__(
        self,
        name: str,
        config: type,
        loss: Callable[..., Any] | None = None,
        min_members: int = 1,
    ) -> None:
        self.name, self.config, self.loss, self.min_members = name, config, loss, min_members

    @hookimpl
    def register_configs(self, config_store: Any) -> None:
        store_reward(config_store, self.name, self.config)

    @hookimpl
    def register_components(self, registry: Any) -> None:
        registry.add("learned_reward", self.name, self)
        if self.loss is not None:
            registry.add("rm_loss", self.name, self.loss)

    @hookimpl
    def run_start(self, ctx: RunContext) -> None:
        # Loaded up front (a missing model fails before step 0) when the engine scores; an
        # unscored algorithm (offline DPO) loads it only if it calls ctx.score itself.
        if ctx.needs.reward:
            scorer_for(ctx, self.name)

    @hookimpl
    def reward(self, ctx: RunContext, batch: Rollout) -> dict[str, torch.Tensor]:
        return reward_hook(ctx, batch, self.name)
