"""Packed sequences (alignkit.models.packing) by hand, and the packed reward-model forward
against the padded one, values and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from alignkit.models import (
    ScalarHeadModel,
    TinyModelSpec,
    build_tiny_model,
    pack_rollout,
    packs,
    response_logprobs,
    response_read,
    sequence_logprobs,
)
from alignkit.models.lean import packed_last_hidden
from alignkit.models.packing import pack_sequences
from alignkit.rewards.learned import encode_parts, encode_texts
from alignkit.rl.update import group_sorted


def test_pack_sequences_by_hand() -> None:
    packed = pack_sequences([[1, 2], [1, 2], [3]], [[4], [5, 6], []])
    # The shared prefix (1, 2) is stored once, at row 0; row 2 is its prefix alone.
    assert packed.tokens.tolist() == [1, 2, 4, 5, 6, 3]
    assert packed.positions.tolist() == [0, 1, 2, 2, 3, 0]
    assert packed.layout.tolist() == [[0, 1, 2, 6], [0, 1, 3, 4], [5, 6, 6, 6]]
    assert packed.lengths.tolist() == [3, 4, 1]
    assert packed.home.tolist() == [0, 1, 2, 6, 7, 8]  # m * 4 + t
    assert packed.last().tolist() == [2, 4, 5]
    ids, mask = packed.padded(pad_id=0)
    assert ids.tolist() == [[1, 2, 4, 0], [1, 2, 5, 6], [3, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_pack_sequences_rejects_bad_rows() -> None:
    with pytest.raises(ValueError, match="2 prefixes but 1 suffixes"):
        pack_sequences([[1], [2]], [[3]])
    with pytest.raises(ValueError, match="row 1 is empty"):
        pack_sequences([[1], []], [[2], []])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = ["the cat sat on the mat", "a dog ran past the red house", "User: Assistant:"] * 3
    spec = TinyModelSpec(vocab_size=300, n_layer=3, n_head=2, n_embd=32, n_positions=48, seed=1)
    return build_tiny_model(tmp_path_factory.mktemp("packing") / "m", corpus, spec)


def test_encode_parts_truncates_from_the_left(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["User: the cat sat on the mat Assistant:"] * 2
    responses = ["a dog", "a dog ran past the red house"]
    whole = encode_parts(tok, prompts, responses, max_length=1000)
    prompt_len = len(whole[0][0])
    assert whole[0][0] == whole[1][0]  # one prompt, one token sequence
    long_len = prompt_len + len(whole[1][1])
    limit = long_len - 2
    parts = encode_parts(tok, prompts, responses, max_length=limit)
    assert parts[0] == whole[0]  # short enough: untouched
    assert parts[1] == (whole[1][0][2:], whole[1][1])  # the prompt loses its first 2 tokens
    assert [p + r for p, r in parts] == encode_texts(tok, prompts, responses, limit)
    tail = encode_parts(tok, prompts[:1], responses[1:], max_length=3)
    assert tail == [([], whole[1][1][-3:])]  # the end of the response and the EOS survive


def test_packed_score_equals_the_padded_forward_with_gradients(model_dir: Path) -> None:
    torch.manual_seed(0)
    model = ScalarHeadModel.from_pretrained(model_dir)
    model.train()  # the tiny spec has no dropout, so train mode is deterministic
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["User: the cat sat Assistant:"] * 3 + ["User: a dog Assistant:"] * 2 + ["mat"]
    responses = ["on the mat", "a dog", "", "ran past the red house", "the cat", "cat"]
    packed = pack_sequences(*zip(*encode_parts(tok, prompts, responses, 48), strict=True))
    assert packed.tokens.numel() < int(packed.lengths.sum())  # prompts are shared
    got = model.score_packed(packed)
    assert got is not None
    got.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ids, mask = packed.padded(tok.pad_token_id or 0)
    want = model(ids, mask).gather(1, (mask.sum(1) - 1)[:, None]).squeeze(1)
    want.pow(2).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(set(want.tolist())) == len(prompts)  # a wrong read position would show
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4)


def test_packed_forward_steps_aside_for_hooks(model_dir: Path) -> None:
    model = ScalarHeadModel.from_pretrained(model_dir)
    packed = pack_sequences([[5, 6]], [[7]])
    handle = model.backbone.h[0].register_forward_hook(lambda *_: None)
    assert packed_last_hidden(model.backbone, packed) is None
    assert model.score_packed(packed) is None
    handle.remove()
    model.register_forward_hook(lambda *_: None)  # on the reward model itself
    assert model.score_packed(packed) is None
    assert packed_last_hidden(model.backbone, packed) is not None


# -------------------------------------------------------------------------------------------
# RL: packed log-probs and values of rollouts against the padded forwards
# -------------------------------------------------------------------------------------------


def _rollout_rows(vocab: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """3 prompts x 2 samples: left-padded prompts, right-padded responses, one empty."""
    gen = torch.Generator().manual_seed(0)
    plen = torch.tensor([2, 5, 3]).repeat_interleave(2)
    rlen = torch.tensor([4, 1, 6, 0, 3, 6])
    p_ids = torch.randint(1, vocab, (3, 5), generator=gen).repeat_interleave(2, 0)
    p_mask = (torch.arange(5)[None] >= 5 - plen[:, None]).long()
    r_ids = torch.randint(1, vocab, (6, 6), generator=gen)
    r_mask = (torch.arange(6)[None] < rlen[:, None]).float()  # rollouts keep a float mask
    return p_ids * p_mask, p_mask, r_ids * r_mask.long(), r_mask


def test_pack_rollout_shares_prompts_and_refuses_holes() -> None:
    p_ids, p_mask, r_ids, r_mask = _rollout_rows(50)
    packed = pack_rollout(p_ids, p_mask, r_ids, r_mask)
    assert packed is not None
    # each prompt once (2 + 5 + 3) plus every response token (4 + 1 + 6 + 0 + 3 + 6)
    assert packed.tokens.numel() == 10 + 20
    assert packed.lengths.tolist() == [6, 3, 11, 5, 6, 9]
    read = response_read(packed, p_mask, r_mask)
    # row 0: prompt of 2, so response token 0 is predicted by the prompt's last token (1)
    assert read[0, :4].tolist() == packed.layout[0, 1:5].tolist()
    assert (read[r_mask == 0] == packed.tokens.numel()).all()  # padding reads the zero slot
    holes = r_mask.clone()
    holes[0, 1] = 0
    assert pack_rollout(p_ids, p_mask, r_ids, holes) is None
    empty = p_mask.clone()
    empty[0] = 0
    assert pack_rollout(p_ids, empty, r_ids, r_mask) is None


def _lm(layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=layers, n_embd=32, n_head=2, vocab_size=50, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def test_packed_logprobs_equal_the_padded_forward_with_gradients() -> None:
    model = _lm()
    p_ids, p_mask, r_ids, r_mask = _rollout_rows(50)
    packed_out = response_logprobs(model, p_ids, p_mask, r_ids, r_mask, 0.7, return_entropy=True)
    (packed_out[0].sum() + packed_out[1].sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    seq, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask.long()], 1)
    padded = sequence_logprobs(model, seq, mask, 5, 0.7, return_entropy=True)
    (padded[0].sum() + padded[1].sum()).backward()
    for got, want in zip(packed_out, padded, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got[r_mask == 0] == 0).all()
    for got, param in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad, atol=1e-5, rtol=1e-4)


def test_packed_values_equal_the_critic_forward(model_dir: Path) -> None:
    critic = ScalarHeadModel.from_pretrained(model_dir)
    p_ids, p_mask, r_ids, r_mask = _rollout_rows(200)
    packed = pack_rollout(p_ids, p_mask, r_ids, r_mask)
    assert packed is not None
    got = critic.values_packed(packed, response_read(packed, p_mask, r_mask))
    assert got is not None
    seq, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask.long()], 1)
    want = critic(seq, mask)[:, 4:-1]  # V_t at P - 1 + t
    valid = r_mask != 0
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_a_hooked_policy_runs_its_padded_forward() -> None:
    model = _lm()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    assert not packs(model)
    p_ids, p_mask, r_ids, r_mask = _rollout_rows(50)
    response_logprobs(model, p_ids, p_mask, r_ids, r_mask)
    assert calls == [1]


def test_group_sorted_orders_rows_by_prompt() -> None:
    rows = torch.tensor([5, 0, 3, 4, 1, 2])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    # stable: rows of one group keep their shuffled order
    assert group_sorted(rows, groups, minibatch_size=2).tolist() == [0, 1, 3, 2, 5, 4]
    assert group_sorted(rows, groups, minibatch_size=6).tolist() == rows.tolist()


def test_sequence_kl_sums_the_log_ratio_of_each_response() -> None:
    from alignkit.evaluation import Samples, sequence_kl

    policy, reference = _lm(), _lm(layers=1)
    p_ids, p_mask, r_ids, r_mask = _rollout_rows(50)
    samples = Samples([None] * 6, [""] * 6, p_ids, p_mask, r_ids, r_mask)
    seq, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask.long()], 1)
    with torch.no_grad():
        lp = sequence_logprobs(policy, seq, mask, 5)
        lr = sequence_logprobs(reference, seq, mask, 5)
    # mean over the 6 responses of sum_t (log pi - log ref), padding excluded
    want = float(((lp - lr) * r_mask).sum() / 6)
    got = sequence_kl(policy, reference, samples, batch_size=4)  # two batches: 4 + 2 rows
    assert got == pytest.approx(want, abs=1e-5)
    assert sequence_kl(policy, policy, samples) == pytest.approx(0.0, abs=1e-6)


def test_take_gathers_rows_like_advanced_indexing_with_the_same_gradient() -> None:
    from alignkit.models.lean import _take

    x = torch.arange(12.0).reshape(4, 3).requires_grad_(True)
    index = torch.tensor([[3, 0, 0], [1, 3, 2]])  # repeated rows: their gradients add
    out = _take(x, index)
    assert out.shape == (2, 3, 3)
    assert torch.equal(out, x.detach()[index])
    weights = torch.arange(18.0).reshape(2, 3, 3)
    (out * weights).sum().backward()
    # Hand-computed: row 0 is read at (0, 1) and (0, 2), row 3 at (0, 0) and (1, 1).
    expected = torch.stack(
        [
            weights[0, 1] + weights[0, 2],
            weights[1, 0],
            weights[1, 2],
            weights[0, 0] + weights[1, 1],
        ]
    )
    assert x.grad is not None and torch.equal(x.grad, expected)
