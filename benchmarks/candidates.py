"""Speed changes outside the training loop, measured before they are adopted.

``python -m benchmarks.candidates [--threads 1] [--reps 7]`` times each candidate against
the current code on the reference workload's shapes, alternating the two (so load on a
shared machine hits both), and checks that it computes the same thing:

fused_gelu
    GPT-2 configs name ``gelu_new``, which ``transformers`` runs as a chain of element-wise
    Python ops (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``: 7 kernels, each
    reading and writing the (tokens x 4d) activation, and as many in the backward).
    ``gelu_pytorch_tanh`` is the same formula as one fused kernel. Measured: a forward and
    backward of one training micro-batch (16 rows x 52 tokens), and the max logit difference.
lean_decode
    The sampling loop (:func:`alignkit.models.generation.generate`) through the model's own forward
    (``transformers``' GPT-2, a ``DynamicCache`` grown by concatenation every token and a
    mask rebuilt every call) against :mod:`alignkit.models.lean`'s lean GPT-2 path (adopted:
    it is the default for plain GPT-2 models). Measured: sampling 64 rows x 32 tokens; the
    samples must be identical (same seed) and the log-probs equal to rounding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.models import load_causal_lm
from alignkit.models.generation import generate, tokenize_prompts
from alignkit.tasks import AssistTask
from benchmarks.common import add_common_args


def alternate(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run alternately ``reps`` times after a warm-up."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def fused_gelu(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """gelu_new vs gelu_pytorch_tanh: one micro-batch forward + backward."""
    base, _ = load_causal_lm(str(model_dir))
    fused, _ = load_causal_lm(str(model_dir))
    for block in fused.transformer.h:
        block.mlp.act = nn.GELU(approximate="tanh")
    base.train(), fused.train()
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(
        0, base.config.vocab_size, (args.micro, 20 + args.new_tokens), generator=gen
    )

    def step(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()

        return run

    with torch.no_grad():
        diff = (base(input_ids=ids).logits - fused(input_ids=ids).logits).abs().max().item()
    t_base, t_fused = alternate(step(base), step(fused), args.reps)
    return {"seconds_gelu_new": t_base, "seconds_fused": t_fused, "max_logit_diff": diff}


def lean_decode(model_dir: Path, args: argparse.Namespace) -> dict[str, float]:
    """The model's own forward vs the lean GPT-2 decoder: same samples, time."""
    model, tok = load_causal_lm(str(model_dir))
    model.eval()
    task = AssistTask()
    texts = [task.format_prompt(r) for r in task.train_prompts()[: args.prompts]]
    ids, mask = tokenize_prompts(tok, texts, max_length=32)
    ids, mask = ids.repeat_interleave(args.samples, 0), mask.repeat_interleave(args.samples, 0)

    def sample(lean: bool) -> Callable[[], Any]:
        def run() -> Any:
            gen = torch.Generator().manual_seed(args.seed)
            return generate(
                model,
                ids,
                mask,
                max_new_tokens=args.new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                generator=gen,
                lean=lean,
            )

        return run

    hf, lean = sample(False), sample(True)
    a, b = hf(), lean()
    same = bool(torch.equal(a.response_ids, b.response_ids))
    logprob_diff = float((a.logprobs - b.logprobs).abs().max())
    t_hf, t_lean = alternate(hf, lean, args.reps)
    return {
        "seconds_hf_forward": t_hf,
        "seconds_lean": t_lean,
        "identical_samples": same,
        "max_logprob_diff": logprob_diff,
    }


def main(argv: list[str] | None = None) -> int:
    p = add_common_args(argparse.ArgumentParser(description=__doc__))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--only", default="fused_gelu,lean_decode")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.run import build_model, quiet_libraries

    quiet_libraries()
    results: dict[str, Any] = {"threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args, Path(tmp) / "model")
        for name in args.only.split(","):
            results[name] = {"fused_gelu": fused_gelu, "lean_decode": lean_decode}[name](
                model_dir, args
            )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
