"""The local judge backend: a transformers causal LM loaded from a folder (or the hub).

Critiques are generated greedily in batches with alignkit's KV-cache sampler on the run's
device; the verdict options are then scored by teacher forcing on
``context + critique + verdict prefix``, so ``option_logprobs`` are exact sequence
log-probabilities (the sum over an option's tokens), not a top-k approximation.

A judge whose tokenizer has a chat template reads each judge prompt as one user turn in that
template (the critique and the verdict are then its reply); one without reads the prompt as
plain text, as the built-in task's tiny judge was trained to.

Shapes: B = contexts in a chunk, O = verdict options, P = prefix length, L = the longest
option in tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alignkit.data.chat import PromptFormat
from alignkit.judges.base import JudgeError, RawVerdict, cut_critique
from alignkit.models import load_causal_lm, position_ids_from_mask, sequence_logprobs
from alignkit.models.generation import generate, pad_prompts

__all__ = ["LocalJudge"]


class LocalJudge:
    """A causal LM judging in-process.

    Args:
        path: HF folder or hub name.
        device: where the judge runs (the training backend's device).
        batch_size: contexts per generation batch.
        max_critique_tokens: generation budget for critique plus verdict.
        max_length: tokens kept of each context (from the right); null: the model's limit
            minus the generation budget.
        template: ``auto`` (the judge tokenizer's chat template when it has one), ``chat``
            or ``plain`` (the judge prompt as raw text).
    """

    def __init__(
        self,
        path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        batch_size: int = 64,
        max_critique_tokens: int = 40,
        max_length: int | None = None,
        template: str = "auto",
    ) -> None:
        self.name = f"local:{path}"
        self.model, self.tokenizer = load_causal_lm(
            path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self.format = PromptFormat(self.tokenizer, template, key="judge template", model=self.model)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_critique_tokens = int(max_critique_tokens)
        limit = getattr(self.model.config, "n_positions", None) or getattr(
            self.model.config, "max_position_embeddings", 2048
        )
        self.max_length = int(max_length or max(8, int(limit) - self.max_critique_tokens - 8))

    # -- generation

    def render(self, context: str) -> str:
        """The judge prompt as this model reads it: a user turn in its chat template, or the
        text itself."""
        if not self.format.chat:
            return context
        return self.format.prompt_text([{"role": "user", "content": context}])

    def _encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        # A rendered chat template carries its own BOS; plain text gets the default tokens.
        special = not self.format.chat
        rows = [self.tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]
        return pad_prompts(self.tokenizer, rows, max_length=self.max_length)

    def _generate(self, contexts: Sequence[str], max_new_tokens: int) -> list[str]:
        ids, mask = self._encode([self.render(c) for c in contexts])
        out = generate(
            self.model,
            ids.to(self.device),
            mask.to(self.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=self.format.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            greedy=True,
            return_logprobs=False,
        )
        return self._decode(out.response_ids.cpu(), out.response_mask.cpu())

    def _decode(self, response_ids: Tensor, response_mask: Tensor) -> list[str]:
        """Generated texts without EOS and padding, leading space kept: it belongs to the token
        that follows "Critique:" (unlike :func:`alignkit.models.generation.decode_responses`)."""
        stops, texts = set(self.format.stop_ids), []
        for ids, mask in zip(response_ids.tolist(), response_mask.tolist(), strict=True):
            kept = [t for t, m in zip(ids, mask, strict=True) if m and t not in stops]
            texts.append(self.tokenizer.decode(kept, clean_up_tokenization_spaces=False))
        return texts

    @torch.no_grad()
    def option_logprobs(self, prefixes: Sequence[str], options: Sequence[str]) -> Tensor:
        """(B, O) log-probability of each option's tokens after each (rendered) prefix.

        A one-token option set takes one forward of the prefixes (the next-token
        distribution); longer options are teacher-forced as ``[left-padded prefix |
        right-padded option]`` rows and summed.
        """
        tok = self.tokenizer
        option_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
        if any(not ids for ids in option_ids):
            raise JudgeError(f"a verdict option tokenises to nothing: {list(options)}")
        ids, mask = self._encode(prefixes)
        ids, mask = ids.to(self.device), mask.to(self.device)
        if all(len(o) == 1 for o in option_ids):
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
            ).logits[:, -1, :]
            first = torch.tensor([o[0] for o in option_ids], device=self.device)
            return torch.log_softmax(logits.float(), dim=-1)[:, first].cpu()
        return self._multi_token(ids, mask, option_ids).cpu()

    def _multi_token(self, ids: Tensor, mask: Tensor, option_ids: list[list[int]]) -> Tensor:
        b, o = ids.shape[0], len(option_ids)
        width = max(len(x) for x in option_ids)
        pad = int(self.tokenizer.pad_token_id)
        opt = torch.full((o, width), pad, dtype=torch.long, device=ids.device)
        opt_mask = torch.zeros((o, width), dtype=torch.long, device=ids.device)
        for i, x in enumerate(option_ids):
            opt[i, : len(x)] = torch.tensor(x)
            opt_mask[i, : len(x)] = 1
        seq = torch.cat([ids.repeat_interleave(o, 0), opt.repeat(b, 1)], dim=1)
        seq_mask = torch.cat([mask.repeat_interleave(o, 0), opt_mask.repeat(b, 1)], dim=1)
        lp = sequence_logprobs(self.model, seq, seq_mask, ids.shape[1])
        return lp.sum(-1).view(b, o)

    # -- the backend protocol

    def critique(
        self, contexts: Sequence[str], verdict_prefix: str, options: Sequence[str]
    ) -> list[RawVerdict | JudgeError]:
        out: list[RawVerdict | JudgeError] = []
        for start in range(0, len(contexts), self.batch_size):
            chunk = list(contexts[start : start + self.batch_size])
            texts = self._generate(chunk, self.max_critique_tokens)
            critiques = [cut_critique(t, verdict_prefix) for t in texts]
            prefixes = [
                self.render(c) + k + verdict_prefix for c, k in zip(chunk, critiques, strict=True)
            ]
            lps = self.option_logprobs(prefixes, options)
            for text, crit, row in zip(texts, critiques, lps.tolist(), strict=True):
                out.append(RawVerdict(crit, dict(zip(options, row, strict=True)), text))
        return out

    def complete(self, contexts: Sequence[str], max_tokens: int) -> list[str | JudgeError]:
        out: list[str | JudgeError] = []
        for start in range(0, len(contexts), self.batch_size):
            out += self._generate(list(contexts[start : start + self.batch_size]), max_tokens)
        return [t.split("\n", 1)[0] if isinstance(t, str) else t for t in out]

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
