"""The ``data`` task: a researcher's own prompts, demonstrations and preferences.

Where the built-in ``assist`` task generates its records and has a gold oracle, this task reads
everything from data in the ecosystem's standard formats (:mod:`alignkit.data.formats`: plain
or conversational prompt-only, prompt/completion, ``messages``, preference ``chosen`` /
``rejected`` with an explicit or implicit prompt) from JSONL, JSON, Parquet, CSV, a ``datasets``
folder or a dataset in the local Hugging Face cache (:mod:`alignkit.data.sources`), and has no
gold oracle: evaluation uses a reward model or an LLM judge (``docs/evaluation.md``).

* RL and feedback prompts: ``task.prompt_data``; without it, the prompts of
  ``task.preference_data``, else of ``task.sft_data``.
* Held-out prompts: ``task.eval_data``, else ``task.eval_split`` of the same source, else a
  seeded fraction ``task.eval_fraction`` of the prompts (by prompt id, so a prompt stays on one
  side whatever the file order).
* SFT: ``task.sft_data``; without it, the preferred responses of ``task.preference_data``.
* Reward model: ``task.preference_data`` is read directly by ``stage=reward_model`` and the
  pipeline, with no feedback stage.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from alignkit.data.chat import Conversation, plain_prompt
from alignkit.data.formats import (
    Example,
    Preference,
    Prompt,
    Unpaired,
    detect_kind,
    parse_preference,
    parse_unpaired,
)
from alignkit.data.sources import load_examples, load_prompts, read_records, split_heldout
from alignkit.errors import ConfigError, DataError

__all__ = ["DataTask"]


class DataTask:
    """Prompts, demonstrations and preferences read from the user's data (no gold oracle).

    Args:
        prompt_data, sft_data, preference_data, eval_data: sources (file, folder or cached
            dataset name); at least one of the first three.
        split: the split read from dataset folders and cached datasets.
        eval_split: a split of the prompt source held out for evaluation.
        eval_fraction: the seeded held-out fraction when neither eval source is given.
        columns: canonical field name -> the data's column name (``{"prompt": "question"}``).
        seed: seed of the held-out split.
        max_prompts: keep only the first N training prompts (null: all).
    """

    name = "data"

    def __init__(
        self,
        *,
        prompt_data: str | None = None,
        sft_data: str | None = None,
        preference_data: str | None = None,
        eval_data: str | None = None,
        split: str = "train",
        eval_split: str | None = None,
        eval_fraction: float = 0.1,
        columns: Mapping[str, str] | None = None,
        seed: int = 0,
        max_prompts: int | None = None,
    ) -> None:
        if not (prompt_data or sft_data or preference_data):
            raise ConfigError(
                "task=data needs data: set task.prompt_data, task.preference_data or "
                "task.sft_data (a JSONL/JSON/Parquet/CSV file, a datasets folder or a cached "
                "dataset name; formats in docs/data.md)"
            )
        if not 0.0 < float(eval_fraction) < 1.0:
            raise ConfigError(f"task.eval_fraction must be in (0, 1), got {eval_fraction!r}")
        self.sources = {"prompt": prompt_data, "sft": sft_data, "preference": preference_data}
        self.eval_data, self.split, self.eval_split = eval_data, split, eval_split
        self.eval_fraction, self.seed = float(eval_fraction), int(seed)
        self.columns = dict(columns or {})
        self.max_prompts = max_prompts
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_config(cls, tcfg: Any) -> DataTask:
        """Build from a ``task`` config node (``conf/task/data.yaml``)."""
        return cls(
            prompt_data=_path(tcfg.get("prompt_data")),
            sft_data=_path(tcfg.get("sft_data")),
            preference_data=_path(tcfg.get("preference_data")),
            eval_data=_path(tcfg.get("eval_data")),
            split=str(tcfg.get("split") or "train"),
            eval_split=tcfg.get("eval_split"),
            eval_fraction=float(tcfg.get("eval_fraction") or 0.1),
            columns=dict(tcfg.get("columns") or {}),
            seed=int(tcfg.get("seed") or 0),
            max_prompts=tcfg.get("max_prompts"),
        )

    # -- reading (each source once)

    def _once(self, key: str, load: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def examples(self) -> list[Example]:
        """SFT demonstrations: ``sft_data``, else the preferred responses of the preferences."""
        if self.sources["sft"]:
            return self._once("sft", lambda: self._load(load_examples, self.sources["sft"]))
        if self.sources["preference"]:
            return [
                Example(p.prompt, p.chosen if isinstance(p, Preference) else p.completion)
                for p in self.preferences()
                if isinstance(p, Preference) or p.label
            ]
        raise ConfigError(
            "stage=sft with task=data needs task.sft_data (or task.preference_data, whose "
            "chosen responses are then the demonstrations)"
        )

    def preferences(self) -> list[Preference | Unpaired]:
        """``preference_data``, parsed (empty when none is given): preference pairs, and
        unpaired KTO-style records (a response labelled desirable or not), in file order."""
        if not self.sources["preference"]:
            return []
        return self._once("preference", self._load_feedback)

    def _load_feedback(self) -> list[Preference | Unpaired]:
        source = str(self.sources["preference"])
        split = self.split if self.split != "train" else None
        out: list[Preference | Unpaired] = []
        for where, raw in read_records(source, split=split):
            kind = detect_kind(raw, where=where, columns=self.columns)
            if kind == "unpaired":
                out.append(parse_unpaired(raw, where, self.columns))
            else:  # anything else must be a pair: its error names the missing field
                out.append(parse_preference(raw, where, self.columns))
        if not out:
            raise DataError(f"{source}: no records")
        return out

    def _load(self, loader: Any, source: str, split: str | None = None) -> list[Any]:
        # A file has no splits: the default split is only passed on when it was changed.
        chosen = split or (self.split if self.split != "train" else None)
        return loader(source, split=chosen, columns=self.columns)

    def _prompt_pool(self) -> list[Prompt]:
        if self.sources["prompt"]:
            return self._once("prompt", lambda: self._load(load_prompts, self.sources["prompt"]))
        items = self.preferences() or self.examples()
        return _unique([item.prompt for item in items])

    def _splits(self) -> tuple[list[Prompt], list[Prompt]]:
        def build() -> tuple[list[Prompt], list[Prompt]]:
            pool = _unique(self._prompt_pool())
            held = self._explicit_eval()
            if held is None:
                train, held = split_heldout(pool, self.eval_fraction, self.seed, key=_prompt_key)
            else:
                held_ids = {p.id for p in held}
                train = [p for p in pool if p.id not in held_ids]
            if self.max_prompts is not None:
                train = train[: int(self.max_prompts)]
            if not train or not held:
                raise ConfigError(
                    f"task=data: {len(train)} training and {len(held)} held-out prompts; "
                    "both splits need prompts (more data, or task.eval_data)"
                )
            return train, held

        return self._once("splits", build)

    def _explicit_eval(self) -> list[Prompt] | None:
        if self.eval_data:
            return _unique(self._load(load_prompts, self.eval_data))
        if self.eval_split:
            source = self.sources["prompt"] or self.sources["preference"] or self.sources["sft"]
            return _unique(self._load(load_prompts, str(source), str(self.eval_split)))
        return None

    # -- the task interface every stage uses

    def train_prompts(self) -> list[Prompt]:
        return list(self._splits()[0])

    def eval_prompts(self) -> list[Prompt]:
        return list(self._splits()[1])

    def all_prompts(self) -> list[Prompt]:
        train, held = self._splits()
        return [*train, *held]

    def prompt_messages(self, record: Prompt) -> Conversation:
        """The conversation before the reply (rendered by each model's own format)."""
        return list(record.messages)

    def is_conversational(self, record: Prompt) -> bool:
        return bool(record.conversational)

    def format_prompt(self, record: Prompt) -> str:
        """A readable rendering (``User: ...\\nAssistant:``) for logs, tables and judges."""
        return plain_prompt(record.messages)

    def corpus(self) -> Iterator[str]:
        """Every text of the data, to train a tokenizer when ``model.path`` is null."""
        for p in self.all_prompts():
            yield plain_prompt(p.messages)
        for e in self._examples_if_any():
            yield f"{plain_prompt(e.prompt.messages)} {e.completion}"
        for pref in self.preferences():
            if isinstance(pref, Preference):
                replies = [pref.chosen, pref.rejected]
            else:
                replies = [pref.completion]
            for reply in replies:
                yield f"{plain_prompt(pref.prompt.messages)} {reply}"

    def _examples_if_any(self) -> list[Example]:
        return self.examples() if self.sources["sft"] else []


def _path(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _prompt_key(p: Prompt) -> str:
    return p.id


def _unique(prompts: Sequence[Prompt]) -> list[Prompt]:
    """First occurrence of each prompt id, in order."""
    seen: dict[str, Prompt] = {}
    for p in prompts:
        seen.setdefault(p.id, p)
    return list(seen.values())
