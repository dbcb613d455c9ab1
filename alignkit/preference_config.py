"""Config schemas of the feedback and reward-model stages (``feedback.*``, ``reward_model.*``).

Both are structured configs, so a misspelt key (``reward_model.epoch=2``) fails at composition
with a message naming the key. The defaults are the small CPU budget of the built-in task: the
whole pipeline (SFT -> feedback -> reward model -> RL -> eval) fits in minutes on two cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QueueConfig:
    """``feedback.queue``: how ``feedback.annotator=app`` hands the samples to people
    (docs/labelling.md)."""

    labels_per_item: int = 2
    """Answers (labels or flags) each item needs, from different annotators."""
    serve: bool = True
    """Serve the labelling app from the stage while it waits (false: run ``alignkit label``)."""
    host: str = "127.0.0.1"
    port: int = 8765
    wait_seconds: float | None = None
    """How long the stage waits for the labels (null: until they are all given); when it
    runs out the stage stops, and running it again goes on waiting."""
    poll_seconds: float = 5.0
    """How often the stage looks at the queue's progress."""


@dataclass
class FeedbackConfig:
    """``stage=feedback``: sample K responses per prompt and have an annotator label them.

    Writes ``<run_dir>/feedback/<format>.jsonl`` in one of the formats of ``docs/feedback.md``.
    """

    policy: str | None = None
    """Policy folder to sample from; null: ``model.path``, else ``<run_dir>/sft``."""
    samples_per_prompt: int = 6
    """K responses sampled per prompt (identical responses are merged before labelling).

    6, in the range human teams rank (InstructGPT's labellers ranked 4 to 9). A reward model
    learns what makes an answer right from responses to one prompt that differ in exactly
    that, so more is better when labels are free: the noise-free study setting
    (``experiment=oracle_feedback``) ranks 32, with which the built-in task's reward model
    agreed with gold on 0.81 of held-out pairs against 0.72 with 16 (docs/feedback.md)."""
    num_prompts: int | None = None
    """Prompts to label (a seeded random subset of the split); null: the whole split."""
    max_labels: int | None = 2200
    """The label budget: labelling stops before it would be exceeded (prompts in a seeded
    order). A label is one comparison (a ranking of K responses counts ``K (K - 1) / 2``, the
    pairs it implies) or one rating; null: no limit. 2200: about what a small team labels in a
    few days, and on the built-in task a ranking of each training prompt's distinct samples
    (2,199 comparisons)."""
    selection: str = "random"
    """Which prompts the budget is spent on (``alignkit.stages.active``): random (a seeded
    order) | disagreement (a reward-model ensemble's disagreement on the prompt's samples,
    highest first) | uncertainty (the reward model's Bradley-Terry probability closest to
    1/2). Needs ``max_labels``; the model-based ones need ``selection_model``."""
    selection_model: str | None = None
    """The reward-model folder (or folder of ``member_<i>`` folders) that ``selection`` scores
    with; ``pipeline.rounds`` sets it to the previous round's."""
    format: str = "rankings"
    """pairwise (every pair of the K responses compared) | rankings (K-wise) | ratings."""
    annotator: str = "simulated_human"
    """The ``annotator`` component that labels responses: simulated_human, app (people, in
    the labelling app: ``feedback.queue``), rlaif, or a plugin's."""
    queue: QueueConfig = field(default_factory=QueueConfig)
    noise: float = 0.2
    """The simulated human's noise: flip probability (pairwise), Gumbel scale (rankings),
    rating std. 0.2 (rankings): two such annotators agree on 73% of the comparisons of the SFT
    policy's samples, the agreement InstructGPT reports between its labellers (72.6 +- 1.5%,
    Ouyang et al. 2022); 0: the noise-free oracle of studies."""
    annotator_temperature: float = 0.0
    """> 0: pairwise labels are sampled from Bradley-Terry on gold scores at this temperature."""
    rating_scale: int = 7
    """Ratings are Likert scores in ``1..rating_scale``."""
    seed: int = 0
    """Seed of the sampling generator and the annotator's private random stream."""
    temperature: float = 1.0
    """Sampling temperature of the policy (1.0: its own distribution, i.e. reference samples)."""
    max_new_tokens: int = 32
    batch_size: int = 64
    """Sequences generated per forward."""
    split: str = "train"
    """Task prompts to label: train | eval | all."""


@dataclass
class RewardModelConfig:
    """``stage=reward_model``: train a scalar-head reward model on feedback files.

    The loss is the ``rm_loss`` of the active ``reward=`` plugin (``default_loss`` when none
    of the active reward plugins defines one).
    """

    default_loss: str = "bradley_terry"
    """The registered ``rm_loss`` used when no active reward plugin defines one."""
    data: list[str] = field(default_factory=list)
    """Feedback JSONL files, folders of them, or ``datasets.save_to_disk`` folders; empty:
    ``<run_dir>/feedback``."""
    backbone: str | None = None
    """HF folder or hub name of the backbone; null: ``feedback.policy``, ``model.path``, else
    ``<run_dir>/sft``."""
    init: str | None = None
    """A trained reward-model folder to go on training (extend) instead of a fresh head on the
    backbone: member ``i`` of an ensemble continues ``<init>/member_<i>``, so ``init`` must
    hold ``ensemble_size`` members. ``pipeline.rounds`` sets it to the previous round's."""
    epochs: float = 20.0
    """Passes over the training feedback (ignored when ``steps`` is set). Judging correctness
    (is this the sum, is this the word asked for) takes many passes over a few hundred
    prompts' rankings: at 2, 4 or 10 epochs the built-in task's reward model mostly learned
    length and style."""
    steps: int | None = None
    """Optimiser steps; null: derived from ``epochs``."""
    batch_size: int = 16
    """Feedback groups (a pair, a ranking, or one prompt's ratings) per optimiser step."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.15
    """Fraction of prompts held out (split by prompt, so no prompt is on both sides)."""
    max_length: int = 96
    """Tokens per (prompt, response) sequence; prompts lose tokens from the left."""
    normalize: bool = True
    """Shift and scale the output to mean 0, std 1 on the reference policy's samples."""
    normalize_policy: str | None = None
    """Policy whose fresh samples define the normalisation; null: the responses in the
    feedback data (sampled from the policy that generated it)."""
    normalize_samples: int = 512
    """At most this many (prompt, response) pairs for the normalisation statistics."""
    ensemble_size: int = 3
    """Members trained with seeds ``seed + i``: averaged into one model (``merge``), or saved
    into ``reward_model/member_<i>``. 3: under the default's noisy labels three averaged
    members agreed with gold on 0.658 of held-out pairs against 0.609 for one
    (docs/feedback.md); 1 trains a single model."""
    merge: str = "average"
    """What becomes of an ensemble's members: average (one model whose weights are the
    members' mean, WARM: Ramé et al. 2024, "Weight Averaged Reward Models"; the members then
    share their head's initialisation and differ in data order, so they stay averageable; an
    ordinary reward-model folder that any learned reward scores) | none (saved side by side).
    An active reward that scores several members (``min_members > 1``) always gets them
    side by side."""
    score_batch_size: int = 64
    """Sequences per forward when scoring (evaluation, normalisation) and per length-sorted
    chunk of a training step."""
    log_every: int = 10
