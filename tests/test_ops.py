"""Tensor math checked against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.rl.ops import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

LN3 = math.log(3.0)


def test_logprobs_hand_computed() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3]]])  # (1, 2, 2)
    labels = torch.tensor([[0, 1]])
    got = logprobs_from_logits(logits, labels)
    expected = torch.tensor([[math.log(1 / 4), math.log(3 / 4)]])
    torch.testing.assert_close(got, expected)


def test_logprobs_temperature() -> None:
    # logits / 0.5 = [0, 2 ln 3] -> softmax = [1/10, 9/10]
    logits = torch.tensor([[[0.0, LN3]]])
    got = logprobs_from_logits(logits, torch.tensor([[1]]), temperature=0.5)
    torch.testing.assert_close(got, torch.tensor([[math.log(9 / 10)]]))


def test_logprobs_large_offset_does_not_overflow() -> None:
    logits = torch.tensor([[[1000.0, 1000.0 + LN3]]])
    got = logprobs_from_logits(logits, torch.tensor([[0]]))
    torch.testing.assert_close(got, torch.tensor([[math.log(1 / 4)]]))


def test_logprobs_upcasts_low_precision() -> None:
    got = logprobs_from_logits(torch.tensor([[[0.0, LN3]]]).bfloat16(), torch.tensor([[0]]))
    assert got.dtype == torch.float32
    # bf16 stores ln 3 with ~3 significant digits.
    torch.testing.assert_close(got, torch.tensor([[math.log(1 / 4)]]), atol=1e-2, rtol=0)


def test_logprobs_rejects_non_positive_temperature() -> None:
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), 0.0)


def test_entropy_hand_computed() -> None:
    # Uniform over 4 -> ln 4; [1/4, 3/4] -> -(1/4 ln 1/4 + 3/4 ln 3/4); -inf logits add nothing.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -math.inf, -math.inf]]])
    got = entropy_from_logits(logits)
    expected = torch.tensor([[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    torch.testing.assert_close(got, expected)


def test_entropy_temperature() -> None:
    # [0, ln 3] / 0.5 -> [1/10, 9/10]
    got = entropy_from_logits(torch.tensor([[[0.0, LN3]]]), temperature=0.5)
    expected = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    torch.testing.assert_close(got, torch.tensor([[expected]]))


def test_entropy_gradient_hand_computed_and_zero_at_masked_logits() -> None:
    # dH/dz_i = -p_i (log p_i + H): for p = [1/4, 3/4, 0] that is -1/4 (ln 1/4 + H), ...
    logits = torch.tensor([[[0.0, LN3, -math.inf]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    p = torch.tensor([0.25, 0.75])
    h = -(p * p.log()).sum()
    expected = torch.cat([-p * (p.log() + h), torch.zeros(1)])
    torch.testing.assert_close(logits.grad[0, 0], expected)


def test_masked_sum_and_mean_ignore_masked_garbage() -> None:
    x = torch.tensor([[1.0, 2.0, math.inf], [4.0, math.nan, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert masked_sum(x, mask).item() == 13.0
    assert masked_mean(x, mask).item() == 13.0 / 4
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 10.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0]))
    torch.testing.assert_close(masked_mean(x, mask.bool(), dim=0), torch.tensor([2.5, 2.0, 6.0]))


def test_masked_mean_of_empty_selection_is_zero() -> None:
    x = torch.tensor([[1.0, 2.0]])
    assert masked_mean(x, torch.zeros_like(x)).item() == 0.0


def test_masked_var_hand_computed() -> None:
    # Valid values 1, 2, 3, 6: mean 3, squared deviations 4 + 1 + 0 + 9 = 14.
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(14.0 / 4))
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(14.0 / 3))


def test_masked_var_single_element_is_zero_not_nan() -> None:
    x = torch.tensor([5.0, 7.0])
    assert masked_var(x, torch.tensor([1, 0])).item() == 0.0


def test_masked_whiten_hand_computed() -> None:
    # Valid 1, 3 (mean 2, unbiased var 2) -> (x - 2) / sqrt(2).
    x = torch.tensor([1.0, 3.0, 1000.0])
    mask = torch.tensor([1, 1, 0])
    s = math.sqrt(2.0)
    torch.testing.assert_close(masked_whiten(x, mask, eps=0.0), torch.tensor([-1 / s, 1 / s, 0.0]))
    # shift_mean=False only rescales: the mean 2 is added back.
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False, eps=0.0),
        torch.tensor([2 - 1 / s, 2 + 1 / s, 0.0]),
    )


def test_masked_whiten_moments_over_valid_tokens_only() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=gen) * 3 + 5
    mask = (torch.rand(4, 7, generator=gen) > 0.3).long()
    garbage = x.masked_fill(mask == 0, 1e6)
    white = masked_whiten(garbage, mask)
    assert torch.all(white[mask == 0] == 0)
    torch.testing.assert_close(masked_mean(white, mask), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_var(white, mask), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(white, masked_whiten(x, mask))
