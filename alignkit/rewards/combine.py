"""The combined reward: ``sum_k weight_k * component_k`` over every reward plugin's components."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from alignkit.errors import PluginError


def combine_rewards(
    results: Sequence[Mapping[str, torch.Tensor]],
    weight: Callable[[str], float],
    rows: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The (B,) weighted total of the reward plugins' components, and the raw components.

    Args:
        results: each reward plugin's ``{component: (B,) scores}``.
        weight: the weight of a component by name (``RunContext.reward_weight``).
        rows: B.

    A component may be returned by one plugin only. Plugins may score on different devices
    (a model on the GPU, a judge on the CPU): the total is taken on the first component's.
    """
    components: dict[str, torch.Tensor] = {}
    for result in results:
        for name, scores in result.items():
            if name in components:
                raise PluginError(f"two reward plugins returned the component {name!r}")
            components[name] = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if not components:
        raise PluginError("no reward plugin scored the batch; configure reward=[...]")
    device = next(iter(components.values())).device
    components = {name: scores.to(device) for name, scores in components.items()}
    total = torch.zeros(rows, device=device)
    for name, scores in components.items():
        if scores.shape != (rows,):
            raise PluginError(
                f"reward component {name!r} has shape {tuple(scores.shape)}, expected ({rows},)"
            )
        total = total + weight(name) * scores
    return total, components
