"""alignkit.rl.optim.adamw: fused where possible, the same update as torch's default AdamW."""

from __future__ import annotations

import torch
from torch import nn

from alignkit.rl.optim import adamw, can_fuse


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))


def test_fused_adamw_matches_the_default_update() -> None:
    a, b = _model(), _model()
    a[0].bias.requires_grad_(False)
    b[0].bias.requires_grad_(False)
    opt_a = adamw(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_b = torch.optim.AdamW(
        [p for p in b.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95),
        weight_decay=0.1,
    )  # fmt: skip
    assert opt_a.defaults["fused"] is True
    assert len(opt_a.param_groups[0]["params"]) == 3  # the frozen bias is left out
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
    assert not torch.equal(a[0].weight, _model()[0].weight)  # it did train


def test_meta_or_no_parameters_keep_the_default() -> None:
    assert not can_fuse([])
    assert not can_fuse([nn.Parameter(torch.zeros(2, device="meta"))])
    assert can_fuse([nn.Parameter(torch.zeros(2))])
