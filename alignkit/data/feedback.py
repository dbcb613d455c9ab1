"""Human feedback data: the three record formats, readers, writers, checks and conversions.

Formats (one JSON object per line, or one row of a ``datasets`` dataset saved to disk; see
``docs/feedback.md`` for examples). Every record has ``prompt`` (the text the model sees) and
may have ``prompt_id`` (the task's record id, used to ask the gold oracle about held-out data).

* pairwise: ``chosen``, ``rejected`` and an optional ``margin`` (the strength of the
  preference, e.g. 3 for "significantly better", 1 for "slightly better"; Touvron et al. 2023).
* rankings: ``responses`` (K >= 2 strings) and ``ranks`` (K integers, lower is better, equal
  ranks are ties), as the K-wise comparisons of Ouyang et al. (2022).
* ratings: ``response``, ``score`` (e.g. a 1-7 Likert rating) and optional ``attributes``
  (name -> score, e.g. helpfulness and harmlessness).

A malformed record raises :class:`~alignkit.errors.DataError` naming the file, the line (the
row, 1-based, for a dataset) and the field; so does a rating outside ``1..rating_scale`` when
the reader is given the scale (``feedback.rating_scale``). Duplicate records, empty responses
and pairs whose two responses are identical are not errors: :func:`check_feedback` reports them.

Training code sees every format through one view, :class:`PreferenceGroup`: one prompt, its
responses, their dense ranks and the ordered pairs among them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from alignkit.data.jsonl import read_jsonl, require_str
from alignkit.errors import DataError
from alignkit.io import atomic_write_dir, atomic_write_text

FORMATS: tuple[str, ...] = ("pairwise", "rankings", "ratings")

# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


@dataclass
class PairwiseFeedback:
    """``chosen`` was preferred over ``rejected`` for ``prompt``."""

    format: ClassVar[str] = "pairwise"
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    """Preference strength (>= 0); the Llama 2 margin term uses it."""
    prompt_id: str | None = None
    source: str = field(default="", compare=False)
    """``file:line`` the record was read from (empty for records built in memory)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen}
        out["rejected"] = self.rejected
        if self.margin is not None:
            out["margin"] = self.margin
        return _with_id(out, self.prompt_id)

    def response_fields(self) -> list[tuple[str, str]]:
        """(field name, response text) of every response in the record."""
        return [("chosen", self.chosen), ("rejected", self.rejected)]


@dataclass
class RankingFeedback:
    """K responses to ``prompt`` with ``ranks[i]`` the rank of ``responses[i]`` (0 = best)."""

    format: ClassVar[str] = "rankings"
    prompt: str
    responses: list[str]
    ranks: list[int]
    prompt_id: str | None = None
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {"prompt": self.prompt, "responses": list(self.responses), "ranks": list(self.ranks)}
        return _with_id(out, self.prompt_id)

    def response_fields(self) -> list[tuple[str, str]]:
        return [(f"responses[{i}]", r) for i, r in enumerate(self.responses)]


@dataclass
class RatingFeedback:
    """An absolute ``score`` of ``response`` (e.g. 1-7 Likert), optionally per attribute."""

    format: ClassVar[str] = "ratings"
    prompt: str
    response: str
    score: float
    attributes: dict[str, float] | None = None
    prompt_id: str | None = None
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "response": self.response}
        out["score"] = self.score
        if self.attributes:
            out["attributes"] = dict(self.attributes)
        return _with_id(out, self.prompt_id)

    def response_fields(self) -> list[tuple[str, str]]:
        return [("response", self.response)]

    def value(self, attribute: str | None = None) -> float:
        """The overall ``score``, or one attribute's score (DataError when it is missing)."""
        if attribute is None:
            return self.score
        if not self.attributes or attribute not in self.attributes:
            raise DataError(f"{self.source or 'rating'}: no attribute {attribute!r}")
        return self.attributes[attribute]


FeedbackRecord = PairwiseFeedback | RankingFeedback | RatingFeedback


def _with_id(out: dict[str, Any], prompt_id: str | None) -> dict[str, Any]:
    if prompt_id is not None:
        out["prompt_id"] = prompt_id
    return out


def record_key(record: FeedbackRecord) -> str:
    """A canonical string of the record's content (its ``source`` excluded)."""
    return json.dumps({"format": record.format, **record.to_dict()}, sort_keys=True)


# --------------------------------------------------------------------------------------------
# parsing one record
# --------------------------------------------------------------------------------------------

_FORMAT_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pairwise", ("chosen", "rejected")),
    ("rankings", ("responses", "ranks")),
    ("ratings", ("response", "score", "attributes")),
)


def detect_format(raw: Mapping[str, Any], where: str) -> str:
    """The format whose fields the record has (the first that matches)."""
    for name, keys in _FORMAT_FIELDS:
        if any(k in raw and raw[k] is not None for k in keys):
            return name
    raise DataError(
        f"{where}: cannot tell the feedback format: expected fields chosen/rejected (pairwise), "
        "responses/ranks (rankings) or response/score (ratings)"
    )


def _number(raw: Mapping[str, Any], key: str, where: str) -> float:
    value = raw[key]
    # bool is an int subclass, but true/false is never a meaningful score.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{where}: field {key!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise DataError(f"{where}: field {key!r} must be finite, got {value!r}")
    return float(value)


def _optional(raw: Mapping[str, Any], key: str) -> bool:
    """Whether an optional field is present (a dataset row has None for absent columns)."""
    return key in raw and raw[key] is not None


def _prompt_id(raw: Mapping[str, Any], where: str) -> str | None:
    return require_str(raw, "prompt_id", where) if _optional(raw, "prompt_id") else None


def _str_list(raw: Mapping[str, Any], key: str, where: str) -> list[str]:
    if key not in raw or raw[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    value = raw[key]
    if not isinstance(value, list):
        raise DataError(f"{where}: field {key!r} must be a list, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(
                f"{where}: field '{key}[{i}]' must be a string, got {type(item).__name__}"
            )
    return list(value)


def _parse_pairwise(raw: Mapping[str, Any], where: str) -> PairwiseFeedback:
    margin = _number(raw, "margin", where) if _optional(raw, "margin") else None
    if margin is not None and margin < 0:
        raise DataError(f"{where}: field 'margin' must be >= 0, got {margin}")
    return PairwiseFeedback(
        prompt=require_str(raw, "prompt", where),
        chosen=require_str(raw, "chosen", where, allow_empty=True),
        rejected=require_str(raw, "rejected", where, allow_empty=True),
        margin=margin,
        prompt_id=_prompt_id(raw, where),
        source=where,
    )


def _parse_ranking(raw: Mapping[str, Any], where: str) -> RankingFeedback:
    prompt = require_str(raw, "prompt", where)
    responses = _str_list(raw, "responses", where)
    if len(responses) < 2:
        raise DataError(
            f"{where}: field 'responses' needs at least 2 entries, got {len(responses)}"
        )
    if "ranks" not in raw or raw["ranks"] is None:
        raise DataError(f"{where}: missing field 'ranks'")
    ranks = raw["ranks"]
    if not isinstance(ranks, list):
        raise DataError(f"{where}: field 'ranks' must be a list, got {type(ranks).__name__}")
    if len(ranks) != len(responses):
        raise DataError(
            f"{where}: field 'ranks' has {len(ranks)} entries but 'responses' has {len(responses)}"
        )
    for i, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise DataError(f"{where}: field 'ranks[{i}]' must be an integer >= 0, got {rank!r}")
    return RankingFeedback(prompt, responses, list(ranks), _prompt_id(raw, where), where)


def _check_scale(value: float, key: str, where: str, scale: int | None) -> float:
    """``value`` when it lies on the Likert scale ``1..scale`` (or no scale is given).

    A score off the scale (a 0-10 file read as 1-7, a typo) would otherwise become a large
    rating gap, i.e. a confident preference, without any warning.
    """
    if scale is not None and not 1 <= value <= scale:
        raise DataError(
            f"{where}: field {key!r} is {value:g}, outside the rating scale 1..{scale} "
            "(feedback.rating_scale)"
        )
    return value


def _parse_rating(
    raw: Mapping[str, Any], where: str, rating_scale: int | None = None
) -> RatingFeedback:
    prompt = require_str(raw, "prompt", where)
    response = require_str(raw, "response", where, allow_empty=True)
    if "score" not in raw or raw["score"] is None:
        raise DataError(f"{where}: missing field 'score'")
    score = _check_scale(_number(raw, "score", where), "score", where, rating_scale)
    attributes = None
    if _optional(raw, "attributes"):
        value = raw["attributes"]
        if not isinstance(value, Mapping):
            raise DataError(
                f"{where}: field 'attributes' must be an object, got {type(value).__name__}"
            )
        # Dataset rows store a struct column with None for attributes a row does not have.
        present = {str(k): v for k, v in value.items() if v is not None}
        attributes = {
            k: _check_scale(
                _number({f"attributes.{k}": v}, f"attributes.{k}", where),
                f"attributes.{k}",
                where,
                rating_scale,
            )
            for k, v in present.items()
        }
    return RatingFeedback(prompt, response, score, attributes, _prompt_id(raw, where), where)


_PARSERS = {"pairwise": _parse_pairwise, "rankings": _parse_ranking, "ratings": _parse_rating}


def parse_record(
    raw: Mapping[str, Any], where: str, *, rating_scale: int | None = None
) -> FeedbackRecord:
    """One record of any format; ``where`` (``file:line``) prefixes every error.

    ``rating_scale``: ratings (overall and per attribute) must lie in ``1..rating_scale``;
    None accepts any finite number.
    """
    fmt = detect_format(raw, where)
    if fmt == "ratings":
        return _parse_rating(raw, where, rating_scale)
    return _PARSERS[fmt](raw, where)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def is_dataset_dir(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset(Dict).save_to_disk``."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json")
    )


def read_feedback_jsonl(
    path: str | Path, *, rating_scale: int | None = None
) -> list[FeedbackRecord]:
    """Records of a JSONL file; errors name ``file:line`` and the field."""
    return [
        parse_record(raw, f"{path}:{lineno}", rating_scale=rating_scale)
        for lineno, raw in read_jsonl(path)
    ]


def read_feedback_dataset(
    path: str | Path, *, rating_scale: int | None = None
) -> list[FeedbackRecord]:
    """Records of a dataset saved with ``save_to_disk``; rows are numbered from 1.

    A ``DatasetDict`` contributes every split, located as ``<path>/<split>:<row>``.
    """
    try:
        import datasets
    except ImportError as exc:  # an optional dependency of the reader, not of alignkit
        raise DataError(f"{path}: reading a saved dataset needs the 'datasets' package") from exc
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a dataset saved with save_to_disk: {exc}") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    records: list[FeedbackRecord] = []
    for split, ds in parts:
        prefix = f"{path}/{split}" if split else str(path)
        for row, raw in enumerate(ds, start=1):
            records.append(parse_record(raw, f"{prefix}:{row}", rating_scale=rating_scale))
    return records


def feedback_files(path: str | Path) -> list[Path]:
    """The data sources under ``path``: itself, a saved dataset, or a folder's ``*.jsonl``."""
    path = Path(path)
    if path.is_file() or is_dataset_dir(path):
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise DataError(f"{path}: no *.jsonl feedback files or saved dataset in this folder")
        return files
    raise DataError(f"{path}: feedback data not found")


def read_feedback(path: str | Path, *, rating_scale: int | None = None) -> list[FeedbackRecord]:
    """Records from a JSONL file, a saved dataset, or every ``*.jsonl`` in a folder.

    ``rating_scale``: reject ratings outside ``1..rating_scale`` (None: any finite number).
    """
    records: list[FeedbackRecord] = []
    for source in feedback_files(path):
        if is_dataset_dir(source):
            records += read_feedback_dataset(source, rating_scale=rating_scale)
        else:
            records += read_feedback_jsonl(source, rating_scale=rating_scale)
    return records


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


@dataclass
class FeedbackReport:
    """What :func:`check_feedback` found; none of it stops training."""

    records: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    """(where, where the same record first appeared)."""
    empty_responses: list[str] = field(default_factory=list)
    """``file:line: field 'chosen'`` for each empty or whitespace-only response."""
    identical_pairs: list[str] = field(default_factory=list)
    """Pairwise records whose chosen and rejected are the same text (no preference signal)."""

    def lines(self, limit: int = 5) -> list[str]:
        """Human-readable summary, at most ``limit`` locations per problem."""
        counts = ", ".join(f"{n} {fmt}" for fmt, n in sorted(self.formats.items()))
        out = [f"{self.records} feedback records ({counts or 'none'})"]
        problems: list[tuple[str, list[str]]] = [
            ("duplicate records", [f"{a} (same as {b})" for a, b in self.duplicates]),
            ("empty responses", self.empty_responses),
            ("pairs with identical responses", self.identical_pairs),
        ]
        for title, where in problems:
            if where:
                more = f" ... and {len(where) - limit} more" if len(where) > limit else ""
                out.append(f"{len(where)} {title}: {'; '.join(where[:limit])}{more}")
        return out

    def metrics(self) -> dict[str, float]:
        return {
            "feedback_records": float(self.records),
            "feedback_duplicates": float(len(self.duplicates)),
            "feedback_empty_responses": float(len(self.empty_responses)),
            "feedback_identical_pairs": float(len(self.identical_pairs)),
        }


def check_feedback(records: Sequence[FeedbackRecord]) -> FeedbackReport:
    """Count formats; locate duplicate records, empty responses and identical pairs."""
    report = FeedbackReport(records=len(records))
    first_seen: dict[str, str] = {}
    for i, record in enumerate(records):
        where = record.source or f"record {i}"
        report.formats[record.format] = report.formats.get(record.format, 0) + 1
        key = record_key(record)
        if key in first_seen:
            report.duplicates.append((where, first_seen[key]))
        else:
            first_seen[key] = where
        for name, text in record.response_fields():
            if not text.strip():
                report.empty_responses.append(f"{where}: field {name!r}")
        if (
            isinstance(record, PairwiseFeedback)
            and record.chosen.strip() == record.rejected.strip()
        ):
            report.identical_pairs.append(where)
    return report


def drop_duplicates(records: Iterable[FeedbackRecord]) -> list[FeedbackRecord]:
    """Records in order with later exact duplicates removed (they would leak across splits)."""
    seen: set[str] = set()
    out = []
    for record in records:
        key = record_key(record)
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


def load_feedback(
    paths: Sequence[str | Path], *, rating_scale: int | None = None
) -> tuple[list[FeedbackRecord], FeedbackReport]:
    """Read every source, report problems, and return the records without duplicates.

    ``rating_scale`` (``feedback.rating_scale``): ratings must lie in ``1..rating_scale``.
    """
    if not paths:
        raise DataError("no feedback data given")
    records = [r for p in paths for r in read_feedback(p, rating_scale=rating_scale)]
    if not records:
        raise DataError(f"{', '.join(map(str, paths))}: no feedback records")
    return drop_duplicates(records), check_feedback(records)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def write_feedback_jsonl(path: str | Path, records: Iterable[FeedbackRecord]) -> Path:
    """Write records as JSON lines, atomically (a crash leaves the old file or none)."""
    text = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records)
    return atomic_write_text(path, text)


def write_feedback_dataset(path: str | Path, records: Sequence[FeedbackRecord]) -> Path:
    """Save records of one format as a ``datasets`` dataset (``load_from_disk`` reads it)."""
    import datasets

    formats = {r.format for r in records}
    if len(formats) != 1:
        raise ValueError(f"a dataset holds one feedback format, got {sorted(formats) or 'none'}")
    rows = [r.to_dict() for r in records]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    columns = {k: [row.get(k) for row in rows] for k in keys}
    dataset = datasets.Dataset.from_dict(columns)
    return atomic_write_dir(path, lambda tmp: dataset.save_to_disk(str(tmp)))


# --------------------------------------------------------------------------------------------
# conversions
# --------------------------------------------------------------------------------------------


def dense_ranks(values: Sequence[float], *, higher_is_better: bool) -> list[int]:
    """Dense ranks, best first: ``[0.5, 1.0, 0.5]`` (higher better) -> ``[1, 0, 1]``."""
    order = sorted(set(values), reverse=higher_is_better)
    index = {v: i for i, v in enumerate(order)}
    return [index[v] for v in values]


def ordered_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Every (better, worse) index pair with strictly different ranks; ties give no pair."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def ranking_to_pairs(record: RankingFeedback) -> list[PairwiseFeedback]:
    """The C(K, 2) comparisons a K-wise ranking implies (fewer with ties; Ouyang et al. 2022)."""
    return [
        PairwiseFeedback(
            record.prompt,
            record.responses[i],
            record.responses[j],
            prompt_id=record.prompt_id,
            source=record.source,
        )
        for i, j in ordered_pairs(record.ranks)
    ]


def _rating_groups(
    records: Iterable[RatingFeedback],
) -> dict[tuple[str, str | None], list[RatingFeedback]]:
    groups: dict[tuple[str, str | None], list[RatingFeedback]] = {}
    for record in records:
        groups.setdefault((record.prompt, record.prompt_id), []).append(record)
    return groups


def ratings_to_pairs(
    records: Iterable[RatingFeedback], attribute: str | None = None
) -> list[PairwiseFeedback]:
    """Pairs of differently rated responses to the same prompt, ``margin`` = score difference.

    Using the rating gap as the margin follows Llama 2 (Touvron et al. 2023), whose margin is a
    function of how much better the annotator found the chosen response.
    """
    pairs = []
    for (prompt, prompt_id), group in _rating_groups(records).items():
        for a in group:
            for b in group:
                gap = a.value(attribute) - b.value(attribute)
                if gap > 0:
                    pairs.append(
                        PairwiseFeedback(
                            prompt, a.response, b.response, gap, prompt_id, source=a.source
                        )
                    )
    return pairs


@dataclass
class PreferenceGroup:
    """One prompt's responses and what the feedback says about them (the training view).

    ``pairs`` are (better index, worse index, margin) comparisons; ``ranks`` are dense ranks
    (0 best, ties share a rank) consistent with them; ``scores`` are the ratings, if any.
    """

    prompt: str
    prompt_id: str | None
    responses: list[str]
    ranks: list[int]
    pairs: list[tuple[int, int, float]]
    scores: list[float] | None = None
    source: str = ""
    messages: Any = None
    """The prompt's conversation (a message list, or verbatim text), when known: a reward
    model renders it in its own format instead of reading ``prompt``."""

    @property
    def key(self) -> str:
        """The prompt identity used to split train and held-out data."""
        return self.prompt_id if self.prompt_id is not None else self.prompt


def to_groups(
    records: Sequence[FeedbackRecord], attribute: str | None = None
) -> list[PreferenceGroup]:
    """One group per pairwise or ranking record, one per prompt for ratings.

    Pairs whose two responses are the same text are skipped: they carry no preference.
    ``attribute`` picks which rating is the score (null: the overall ``score``).
    """
    groups: list[PreferenceGroup] = []
    ratings: list[RatingFeedback] = []
    for r in records:
        if isinstance(r, PairwiseFeedback):
            if r.chosen.strip() != r.rejected.strip():
                pair = (0, 1, r.margin or 0.0)
                groups.append(
                    PreferenceGroup(
                        r.prompt,
                        r.prompt_id,
                        [r.chosen, r.rejected],
                        [0, 1],
                        [pair],
                        None,
                        r.source,
                    )
                )
        elif isinstance(r, RankingFeedback):
            ranks = dense_ranks([float(x) for x in r.ranks], higher_is_better=False)
            pairs = [(i, j, 0.0) for i, j in ordered_pairs(ranks)]
            groups.append(
                PreferenceGroup(
                    r.prompt, r.prompt_id, list(r.responses), ranks, pairs, None, r.source
                )
            )
        else:
            ratings.append(r)
    for (prompt, prompt_id), members in _rating_groups(ratings).items():
        scores = [m.value(attribute) for m in members]
        ranks = dense_ranks(scores, higher_is_better=True)
        pairs = [(i, j, scores[i] - scores[j]) for i, j in ordered_pairs(ranks)]
        groups.append(
            PreferenceGroup(
                prompt,
                prompt_id,
                [m.response for m in members],
                ranks,
                pairs,
                scores,
                members[0].source,
            )
        )
    return groups


# --------------------------------------------------------------------------------------------
# annotators
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Annotator(Protocol):
    """A labelling source: the built-in simulated human, or a team's own (a plugin).

    ``record`` is the task's prompt record (for the built-in task a
    :class:`~alignkit.tasks.PromptRecord`). Register a factory ``factory(ctx) -> Annotator``
    with ``registry.add("annotator", name, factory)`` and select it with
    ``feedback.annotator=name``.
    """

    def compare(self, record: Any, a: str, b: str) -> int:
        """0 if ``a`` is preferred, 1 if ``b`` is."""
        ...

    def rank(self, record: Any, responses: Sequence[str]) -> list[int]:
        """Dense ranks, 0 for the best; equal ranks are ties."""
        ...

    def rate(self, record: Any, response: str) -> float | Mapping[str, float]:
        """A score, or attribute -> score (the overall score is ``"overall"`` if present, else
        the mean of the attributes)."""
        ...


@runtime_checkable
class BatchAnnotator(Protocol):
    """A labelling source that takes the whole set at once (people in the labelling app,
    ``feedback.annotator=app``): the feedback stage hands it every prompt's responses."""

    def label_batch(self, fmt: str, items: Sequence[Mapping[str, Any]]) -> list[FeedbackRecord]:
        """Records in format ``fmt`` for ``items`` (``id``, ``prompt``, ``prompt_id``,
        ``responses``: at least two distinct ones)."""
        ...


def label(
    annotator: Annotator,
    fmt: str,
    record: Any,
    prompt: str,
    responses: Sequence[str],
    prompt_id: str | None = None,
) -> list[FeedbackRecord]:
    """Have ``annotator`` label one prompt's responses in format ``fmt``.

    pairwise compares every pair (i < j) once; rankings ranks all K at once; ratings rates each
    response.
    """
    if fmt == "pairwise":
        out: list[FeedbackRecord] = []
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                a, b = responses[i], responses[j]
                first = annotator.compare(record, a, b) == 0
                chosen, rejected = (a, b) if first else (b, a)
                out.append(PairwiseFeedback(prompt, chosen, rejected, prompt_id=prompt_id))
        return out
    if fmt == "rankings":
        ranks = [int(r) for r in annotator.rank(record, list(responses))]
        return [RankingFeedback(prompt, list(responses), ranks, prompt_id)]
    if fmt == "ratings":
        return [_rating(prompt, r, annotator.rate(record, r), prompt_id) for r in responses]
    raise DataError(f"unknown feedback format {fmt!r}; known formats: {', '.join(FORMATS)}")


def _rating(
    prompt: str, response: str, value: float | Mapping[str, float], prompt_id: str | None
) -> RatingFeedback:
    if isinstance(value, Mapping):
        attributes = {str(k): float(v) for k, v in value.items()}
        if not attributes:
            raise DataError("the annotator returned an empty rating")
        score = attributes.get("overall", sum(attributes.values()) / len(attributes))
        return RatingFeedback(prompt, response, score, attributes, prompt_id)
    return RatingFeedback(prompt, response, float(value), None, prompt_id)
