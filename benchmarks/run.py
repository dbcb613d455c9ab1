"""The benchmark suite: ``python -m benchmarks`` prints a table and writes JSON (and PNG).

For each workload (generation, a GRPO step, a PPO step, a reward-model step) it measures,
each run in a fresh process so peak memory is the workload's own::

    seconds per step by phase   generation, reward, ref / old / value forwards, update
    throughput                  samples/s (completions or preference pairs), tokens/s
    peak RSS                    resident memory of the process, MiB
    GFLOP/s                     analytic FLOPs (alignkit.models.flops) over measured seconds, for
                                the update phase and the whole step
    utilisation                 GFLOP/s over this machine's fp32 matmul rate at the model's
                                own shapes, measured in the same run

With TRL installed (``pip install -e .[bench]``) every workload TRL has also runs through TRL
on the same model folder, prompts, batch and lengths, alternating with alignkit's run, and
the table gives the throughput ratio alignkit / TRL. The PPO workload runs TRL 1.12's
``PPOTrainer`` (TRL 1.16 has none) from its own folder, ``--trl-ppo-dir`` (``make bench``
installs it; benchmarks/trl_ppo.py). ``--scaling`` (on by default) adds GRPO
step time against batch size, response length and model size, plotted to ``scaling.png``.

The model is the task's tiny GPT-2 (``--arch gpt2``). ``--arch llama`` (or any architecture
of ``alignkit.models.tiny``) builds that architecture at the same depth, width and heads
(``head_dim = width / heads``, half as many key/value heads) on the same tokenizer, with the
MLP width that matches the GPT-2 model's parameter count. Several, ``--arch gpt2,llama``, run
every workload on each model (alternating) and add the cost per generated (reward model:
trained) token of each against the first.

    python -m benchmarks                       # the reference workload, 2 threads
    python -m benchmarks --threads 1 --workloads grpo,ppo --no-scaling
    python -m benchmarks --quick               # a tiny model, seconds: a smoke test
    python -m benchmarks --arch gpt2,llama     # both models, and Llama's cost against GPT-2's
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alignkit.models.flops import DecoderShape
from benchmarks.common import (
    WORKLOADS,
    MatmulShape,
    add_common_args,
    matmul_ceiling,
    model_matmuls,
    peak_rss_mib,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
TRL_PPO_DIR = REPO / ".bench" / "trl-1.12"
"""TRL 1.12, for the PPO workload's TRL side (``make bench`` installs it; ignored by git)."""

QUICK = {
    "layers": 2,
    "heads": 2,
    "width": 64,
    "vocab": 512,
    "prompts": 2,
    "samples": 2,
    "new_tokens": 4,
    "micro": 2,
    "pairs": 4,
    "steps": 1,
    "rm_steps": 1,
    "warmup": 0,
    "rounds": 1,
}
"""Overrides of ``--quick``: every code path at a size that runs in seconds."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    p.add_argument(
        "--arch",
        default="gpt2",
        help="model architecture, one of alignkit.models.tiny.ARCHITECTURES (llama, qwen2, "
        "mistral, gemma, gpt_neox, gpt2); several, comma-separated (gpt2,llama), run every "
        "workload on each and compare their cost per token against the first",
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated subset of {','.join(WORKLOADS)}",
    )
    p.add_argument("--rounds", type=int, default=2, help="alternating alignkit/TRL rounds")
    p.add_argument("--trl", dest="trl", action="store_true", default=None, help="require TRL")
    p.add_argument("--no-trl", dest="trl", action="store_false", help="skip TRL")
    p.add_argument(
        "--trl-ppo-dir",
        type=Path,
        default=TRL_PPO_DIR,
        help="folder holding TRL 1.12 (pip install --no-deps --target DIR trl==1.12.0) for "
        "the PPO workload's TRL side (default: .bench/trl-1.12)",
    )
    p.add_argument("--scaling", dest="scaling", action="store_true", default=True)
    p.add_argument("--no-scaling", dest="scaling", action="store_false")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument(
        "--patch",
        default="",
        help="also run alignkit with these candidate changes (benchmarks/patches.py), "
        "e.g. fused_gelu",
    )
    p.add_argument(
        "--inline", action="store_true", help="run workloads in this process (shared peak RSS)"
    )
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks"), help="output folder")
    # Internal: one workload in a child process.
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.patch_list = [w.strip() for w in args.patch.split(",") if w.strip()]
    unknown = sorted(set(args.workload_list) - set(WORKLOADS))
    if unknown:
        p.error(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
    args.arch_list = [a.strip() for a in args.arch.split(",") if a.strip()]
    if args.worker is None:  # workers get a built model; they skip importing the list
        from alignkit.models.tiny import ARCHITECTURES

        unknown = [a for a in args.arch_list if a not in ARCHITECTURES]
        if unknown or not args.arch_list or len(set(args.arch_list)) < len(args.arch_list):
            p.error(f"--arch: {args.arch!r}; choose distinct names from {list(ARCHITECTURES)}")
    return args


def child_argv(args: argparse.Namespace, **changes: Any) -> list[str]:
    """The common options of ``args`` (with ``changes``) as command-line flags."""
    values = {**vars(args), **changes}
    keys = ("threads", "layers", "heads", "width", "vocab", "prompts", "samples", "new_tokens")
    keys += ("micro", "pairs", "steps", "rm_steps", "warmup", "seed")
    return [f"--{k.replace('_', '-')}={values[k]}" for k in keys]


# --------------------------------------------------------------------------------------------
# one workload (child process or inline)
# --------------------------------------------------------------------------------------------


def quiet_libraries() -> None:
    """No progress bars or info logs in the measured processes."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run_worker(args: argparse.Namespace, side: str, workload: str, model_dir: Path) -> dict:
    """Run one side's workload here; adds peak RSS and the library baseline."""
    quiet_libraries()
    torch.set_num_threads(args.threads)
    baseline = peak_rss_mib()
    if side.startswith("alignkit"):
        from benchmarks.patches import apply_patches
        from benchmarks.workloads import run_alignkit

        with apply_patches(side.split("+")[1:]):
            result = run_alignkit(args, workload, model_dir)
    elif workload == "ppo":
        from benchmarks.trl_ppo import run_trl_ppo  # TRL 1.12, first on sys.path

        result = run_trl_ppo(args, model_dir)
    else:
        from benchmarks.trl_side import TRL_RUNNERS

        result = TRL_RUNNERS[workload](args, model_dir)
    result["peak_rss_mib"] = peak_rss_mib()
    result["import_rss_mib"] = baseline
    return result


def spawn(args: argparse.Namespace, side: str, workload: str, model_dir: Path, **kw: Any) -> dict:
    """One workload in a fresh interpreter (its own peak RSS), result read back as JSON.

    ``--inline`` runs it here instead, except PPO's TRL side: TRL 1.12 cannot share a process
    with the TRL 1.16 the other TRL runners import.
    """
    if args.inline and (side, workload) != ("trl", "ppo"):
        ns = argparse.Namespace(**{**vars(args), **kw})
        return run_worker(ns, side, workload, model_dir)
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks", *child_argv(args, **kw)]
        cmd += [f"--worker={side}:{workload}", f"--model-dir={model_dir}", f"--result={result}"]
        cmd += [f"--trl-ppo-dir={args.trl_ppo_dir}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(kw.get("threads", args.threads))}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"{side} {workload} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result.read_text())


def build_model(args: argparse.Namespace, folder: Path, arch: str = "gpt2", **changes: Any) -> Path:
    """The task's tiny ``arch`` model and tokenizer, saved once and shared by both sides.

    GPT-2 is alignkit's ``build_tiny_model`` at ``--layers/--heads/--width``. Another
    architecture is ``alignkit.models.tiny.build_tiny_causal_lm`` (:func:`arch_spec`) on the
    same corpus and vocabulary bound, so both models have the same tokenizer.
    """
    from alignkit.models import TinyModelSpec, build_tiny_model
    from alignkit.tasks import AssistTask

    values = {**vars(args), **changes}
    if arch != "gpt2":
        from alignkit.models.tiny import build_tiny_causal_lm

        return build_tiny_causal_lm(folder, AssistTask().corpus(), arch_spec(values, arch))
    spec = TinyModelSpec(
        vocab_size=values["vocab"],
        n_layer=values["layers"],
        n_head=values["heads"],
        n_embd=values["width"],
        n_positions=max_positions(values),
        seed=values["seed"],
    )
    return build_tiny_model(folder, AssistTask().corpus(), spec)


def max_positions(values: dict[str, Any]) -> int:
    """Position table (GPT-2) or RoPE length: 128, more for long responses."""
    return 128 if values["new_tokens"] <= 96 else 32 + values["new_tokens"]


def meta_model(config: Any) -> nn.Module:
    """The model of ``config`` without memory (meta tensors): for its shapes and counts."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """All parameters (tied ones once) and those outside the token and position embeddings
    and an untied LM head: the per-token matmul weights, norms and biases."""
    total = sum(p.numel() for p in model.parameters())
    tables = {
        id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)
    }
    head = model.get_output_embeddings()
    if head is not None:
        tables[id(head.weight)] = head.weight.numel()
    return {"parameters": total, "non_embedding_parameters": total - sum(tables.values())}


def gpt2_reference(values: dict[str, Any]) -> tuple[Any, dict[str, int]]:
    """The task tokenizer and the parameter counts of ``build_model``'s GPT-2 at ``values``."""
    from transformers import GPT2Config

    from alignkit.models import train_tokenizer
    from alignkit.tasks import AssistTask

    positions = max_positions(values)
    tok = train_tokenizer(AssistTask().corpus(), values["vocab"], model_max_length=positions)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=positions,
        n_embd=values["width"],
        n_layer=values["layers"],
        n_head=values["heads"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return tok, parameter_counts(meta_model(config))


def arch_spec(values: dict[str, Any], arch: str) -> Any:
    """``TinyArchSpec`` of ``arch`` at the GPT-2 model's depth, width and heads.

    ``head_dim = width / heads`` (64 at the defaults, 32 with ``--quick``), half as many
    key/value heads (grouped-query attention where the architecture has it), no chat
    markers (the GPT-2 tokenizer has none), and the MLP width, a multiple of 8, whose total
    and non-embedding parameter counts are both nearest the GPT-2 model's: the largest
    relative difference of the two is smallest. (GPT-2 also learns a position table; the
    RoPE models have none, so the two counts cannot both match exactly.)
    """
    from alignkit.models.tiny import TinyArchSpec, tiny_config

    spec = TinyArchSpec(
        arch=arch,
        vocab_size=values["vocab"],
        hidden=values["width"],
        layers=values["layers"],
        heads=values["heads"],
        kv_heads=max(1, values["heads"] // 2),
        intermediate=8,
        max_positions=max_positions(values),
        chat=False,
        seed=values["seed"],
    )
    tok, target = gpt2_reference(values)

    def counts(width: int) -> dict[str, int]:
        return parameter_counts(
            meta_model(tiny_config(dataclasses.replace(spec, intermediate=width), tok))
        )

    low, high = counts(8), counts(16)
    slope = (high["parameters"] - low["parameters"]) / 8  # parameters per unit of MLP width
    keys = ("parameters", "non_embedding_parameters")
    exact = [8 + (target[k] - low[k]) / slope for k in keys]
    candidates = range(max(8, 8 * int(min(exact) // 8) - 8), 8 * int(max(exact) // 8) + 17, 8)

    def worst(width: int) -> float:
        return max(abs(low[k] + slope * (width - 8) - target[k]) / target[k] for k in keys)

    return dataclasses.replace(spec, intermediate=min(candidates, key=worst))


def model_info(model_dir: Path) -> tuple[dict[str, Any], DecoderShape, list[MatmulShape]]:
    """Architecture, shape, parameter counts and matmul shapes of a saved model."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    model = meta_model(config)
    shape = DecoderShape.from_config(config)
    width, heads = int(config.hidden_size), int(config.num_attention_heads)
    info = {
        "arch": config.model_type,
        **parameter_counts(model),
        "layers": int(config.num_hidden_layers),
        "width": width,
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or width // heads),
        "mlp_width": int(
            getattr(config, "intermediate_size", None)
            or getattr(config, "n_inner", None)
            or 4 * width
        ),
        "vocab_size": int(config.vocab_size),
        "max_positions": int(config.max_position_embeddings),
        "flops_shape": dataclasses.asdict(shape),
    }
    return info, shape, model_matmuls(model)


# --------------------------------------------------------------------------------------------
# derived figures
# --------------------------------------------------------------------------------------------


def derive(result: dict[str, Any], ceiling: float) -> dict[str, Any]:
    """Throughput, GFLOP/s and utilisation of one run."""
    sec, flops = result["seconds_per_step"], result["flops_per_step"]
    total = sec["total"]
    gen = sec.get("generation", 0.0)
    out = {
        "samples_per_s": result["samples_per_step"] / total,
        "tokens_per_s": result["tokens_per_step"] / (gen if gen > 0 else total),
        "gflops_step": flops["total"] / total / 1e9,
    }
    if sec.get("update"):
        out["gflops_update"] = flops.get("update", 0.0) / sec["update"] / 1e9
        out["util_update"] = out["gflops_update"] / ceiling
    if gen > 0:
        out["gflops_generation"] = flops.get("generation", 0.0) / gen / 1e9
    out["util_step"] = out["gflops_step"] / ceiling
    return out


def mean_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-phase mean over rounds of seconds, FLOPs and the other numbers."""
    out: dict[str, Any] = {}
    for key in ("seconds_per_step", "flops_per_step"):
        phases = runs[0][key].keys()
        out[key] = {k: statistics.fmean(r[key].get(k, 0.0) for r in runs) for k in phases}
    for key in ("samples_per_step", "tokens_per_step", "peak_rss_mib", "import_rss_mib"):
        out[key] = statistics.fmean(float(r.get(key, 0.0)) for r in runs)
    if "trained_tokens_per_step" in runs[0]:
        out["trained_tokens_per_step"] = statistics.fmean(
            float(r["trained_tokens_per_step"]) for r in runs
        )
    out["rounds"] = runs
    return out


def measure_workloads(
    args: argparse.Namespace, models: dict[str, Path], trl_workloads: set[str], log: Any
) -> dict[str, dict[str, Any]]:
    """Every workload on every model, alternating alignkit and TRL (where it has a side) and
    the architectures, ``--rounds`` times: ``{arch: {"workload/side": mean result}}``."""
    runs: dict[tuple[str, str, str], list[dict]] = {}
    many = len(models) > 1

    def name(arch: str, workload: str, side: str) -> str:
        return f"{arch}/{workload}/{side}" if many else f"{workload}/{side}"

    for r in range(args.rounds):
        for workload in args.workload_list:
            sides = ["alignkit"] + (
                ["alignkit+" + "+".join(args.patch_list)] if args.patch_list else []
            )
            sides += ["trl"] if workload in trl_workloads else []
            order = [(arch, side) for arch in models for side in sides]
            if r % 2:
                order.reverse()  # alternate who goes first, so drift hits both sides
            for arch, side in order:
                start = time.perf_counter()
                result = spawn(args, side, workload, models[arch])
                runs.setdefault((arch, workload, side), []).append(result)
                # Kept up to date, so an interrupted run still leaves what it measured.
                partial = {name(*key): v for key, v in runs.items()}
                write_json(args.out / "partial.json", json.dumps(partial, indent=2) + "\n")
                log(
                    f"round {r + 1}/{args.rounds} {workload:>12} {side:>20}"
                    + (f" {arch:>8}" if many else "")
                    + f": {result['seconds_per_step']['total']:.3f} s/step "
                    f"({time.perf_counter() - start:.0f} s wall)"
                )
    out: dict[str, dict[str, Any]] = {arch: {} for arch in models}
    for (arch, workload, side), values in runs.items():
        out[arch][f"{workload}/{side}"] = mean_runs(values)
    return out


def best_step(result: dict[str, Any]) -> float | None:
    """The fastest measured step over all rounds, when the runs recorded each step."""
    steps = [t for r in result["rounds"] for t in r.get("step_seconds", [])]
    return min(steps) if steps else None


def without(seconds: dict[str, float], phases: list[str]) -> float:
    """Seconds per step less ``phases``."""
    return seconds["total"] - sum(seconds.get(p, 0.0) for p in phases)


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """alignkit / TRL per workload: throughput (mean of per-round ratios) and peak memory."""
    out = {}
    for key, ours in results.items():
        workload, side = key.split("/")
        theirs = results.get(f"{workload}/trl")
        if not side.startswith("alignkit") or theirs is None:
            continue
        pairs = list(zip(ours["rounds"], theirs["rounds"], strict=False))
        per_round = [
            t["seconds_per_step"]["total"] / a["seconds_per_step"]["total"] for a, t in pairs
        ]
        name = workload if side == "alignkit" else f"{workload} ({side})"
        out[name] = {
            "throughput": statistics.fmean(per_round),
            "throughput_per_round": per_round,
            "peak_rss": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
            # Without the ~400 MiB that importing torch and transformers costs both sides.
            "rss_above_imports": (ours["peak_rss_mib"] - ours["import_rss_mib"])
            / max(theirs["peak_rss_mib"] - theirs["import_rss_mib"], 1e-9),
        }
        # Phases TRL pays that alignkit's workload does not (PPO: the reward model's forward):
        # the ratio of both steps without them.
        extra = theirs["rounds"][0].get("extra_phases", [])
        if extra:
            per_round = [
                without(t["seconds_per_step"], extra) / without(a["seconds_per_step"], extra)
                for a, t in pairs
            ]
            out[name]["without"] = {
                "phases": extra,
                "throughput": statistics.fmean(per_round),
                "throughput_per_round": per_round,
            }
        fastest = [best_step(ours), best_step(theirs)]
        if None not in fastest:
            # The fastest step of each side: the least disturbed by other load on the machine.
            out[name]["throughput_best_step"] = fastest[1] / fastest[0]
    return out


TOKEN_KIND = {"reward_model": "trained"}
"""What the cost per token of a workload divides by: generated tokens, except these."""


def step_tokens(workload: str, result: dict[str, Any]) -> float:
    """Tokens of one step: generated (generation, RL) or trained on (reward model)."""
    kind = TOKEN_KIND.get(workload, "generated")
    return float(
        result.get("trained_tokens_per_step" if kind == "trained" else "tokens_per_step", 0.0)
    )


def per_token(workload: str, result: dict[str, Any]) -> float | None:
    """Seconds of the whole step per token of ``step_tokens``."""
    tokens = step_tokens(workload, result)
    return result["seconds_per_step"]["total"] / tokens if tokens > 0 else None


def compare_archs(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each architecture's cost per token against the first's, per workload and side.

    ``ratio`` is the mean over rounds of that round's seconds-per-token ratio (the models
    run next to each other in every round); ``step_ratio`` the same for seconds per step
    (different models sample responses of different lengths, so the two differ).
    """
    archs = list(results)
    reference = archs[0]
    out: dict[str, Any] = {}
    for key, ref in results[reference].items():
        if not all(key in results[a] for a in archs):
            continue
        workload = key.split("/")[0]
        row: dict[str, Any] = {
            "per": f"{TOKEN_KIND.get(workload, 'generated')} token",
            "seconds_per_token": {},
            "tokens_per_step": {},
            "seconds_per_step": {},
        }
        for arch in archs:
            res = results[arch][key]
            tokens = step_tokens(workload, res)
            row["tokens_per_step"][arch] = tokens
            row["seconds_per_step"][arch] = res["seconds_per_step"]["total"]
            row["seconds_per_token"][arch] = per_token(workload, res)
        for arch in archs[1:]:
            pairs = list(zip(results[arch][key]["rounds"], ref["rounds"], strict=False))
            costs = [(per_token(workload, a), per_token(workload, b)) for a, b in pairs]
            per_round = [a / b for a, b in costs if a is not None and b]
            steps = [
                a["seconds_per_step"]["total"] / b["seconds_per_step"]["total"] for a, b in pairs
            ]
            row.setdefault("ratio", {})[arch] = statistics.fmean(per_round) if per_round else None
            row.setdefault("ratio_per_round", {})[arch] = per_round
            row.setdefault("step_ratio", {})[arch] = statistics.fmean(steps)
        out[key] = row
    return {"reference": reference, "archs": archs, "workloads": out}


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------

COLUMNS = ("generation", "reward", "ref", "old", "value", "update", "total")


def describe(model: dict[str, Any]) -> str:
    """One line: architecture, parameters and shape of a report's model."""
    heads = f"{model['heads']} heads of {model['head_dim']}"
    if model["kv_heads"] != model["heads"]:
        heads += f" ({model['kv_heads']} key/value)"
    gated = "gated " if model["flops_shape"].get("gated_mlp") else ""
    text = (
        f"{model['arch']}, {model['parameters'] / 1e6:.2f}M parameters "
        f"({model['non_embedding_parameters'] / 1e6:.2f}M non-embedding): "
        f"{model['layers']} layers, width {model['width']}, {heads}, {gated}MLP "
        f"{model['mlp_width']}, vocab {model['vocab_size']}"
    )
    ref = model.get("matched_to")
    if ref:
        text += (
            f"; matched to {ref['arch']}: {ref['parameters'] / 1e6:.2f}M "
            f"({ref['non_embedding_parameters'] / 1e6:.2f}M non-embedding)"
        )
    return text


def format_model(part: dict[str, Any]) -> list[str]:
    """Ceiling, phase table and alignkit / TRL ratios of one model (``part``)."""
    lines = []
    ceil = part["matmul_ceiling"]
    lines.append(
        f"fp32 matmul ceiling at the model's shapes: {ceil['train']['gflops']:.1f} GFLOP/s "
        f"({ceil['train']['rows']} rows, training), {ceil['decode']['gflops']:.1f} GFLOP/s "
        f"({ceil['decode']['rows']} rows, decoding)"
    )
    width = max([22, *(len(k) + 2 for k in part["results"])])
    head = f"{'workload':<{width}}" + "".join(f"{c:>11}" for c in COLUMNS)
    head += f"{'samples/s':>11}{'tokens/s':>10}{'GFLOP/s':>9}{'upd GF/s':>9}"
    head += f"{'util upd':>9}{'util step':>10}{'RSS MiB':>9}"
    lines += ["", "seconds per step by phase", head, "-" * len(head)]
    for key, res in part["results"].items():
        sec, d = res["seconds_per_step"], res["derived"]
        row = f"{key:<{width}}" + "".join(
            f"{sec[c]:>11.3f}" if c in sec else f"{'-':>11}" for c in COLUMNS
        )
        row += f"{d['samples_per_s']:>11.1f}{d['tokens_per_s']:>10.0f}{d['gflops_step']:>9.1f}"
        upd = d.get("gflops_update")
        row += f"{upd:>9.1f}" if upd is not None else f"{'-':>9}"
        util = d.get("util_update")
        row += f"{util:>9.0%}" if util is not None else f"{'-':>9}"
        row += f"{d['util_step']:>10.0%}{res['peak_rss_mib']:>9.0f}"
        lines.append(row)
    if part["ratios"]:
        lines += ["", "alignkit / TRL (same run, alternating)"]
        for workload, r in part["ratios"].items():
            per = ", ".join(f"{x:.2f}" for x in r["throughput_per_round"])
            best = r.get("throughput_best_step")
            best_text = f"; fastest steps {best:.2f}x" if best is not None else ""
            lines.append(
                f"  {workload:<30} throughput {r['throughput']:.2f}x (rounds: {per}{best_text}); "
                f"peak RSS {r['peak_rss']:.2f}x ({r['rss_above_imports']:.2f}x above imports)"
            )
            if r.get("without"):
                w = r["without"]
                per = ", ".join(f"{x:.2f}" for x in w["throughput_per_round"])
                lines.append(
                    f"  {'':<30} without the {'/'.join(w['phases'])} phase (both sides): "
                    f"throughput {w['throughput']:.2f}x (rounds: {per})"
                )
    return lines


def format_comparison(comparison: dict[str, Any]) -> list[str]:
    """Milliseconds per token of each architecture and the ratio to the first."""
    archs, ref = comparison["archs"], comparison["reference"]
    others = archs[1:]
    lines = [
        "",
        f"cost per token by architecture (whole step, ms per token; ratio to {ref}, "
        "mean of rounds; step: ratio of seconds per step)",
    ]
    head = f"  {'workload/side':<28}{'per':>11}" + "".join(f"{a:>10}" for a in archs)
    head += "".join(f"  {a + '/' + ref:>16}{'step':>7}  rounds" for a in others)
    lines += [head, "  " + "-" * (len(head) - 2)]
    for key, row in comparison["workloads"].items():
        line = f"  {key:<28}{row['per'].split()[0]:>11}"
        for arch in archs:
            cost = row["seconds_per_token"][arch]
            line += f"{cost * 1e3:>10.4f}" if cost is not None else f"{'-':>10}"
        for arch in others:
            ratio = row["ratio"][arch]
            line += f"  {ratio:>15.2f}x" if ratio is not None else f"  {'-':>16}"
            line += f"{row['step_ratio'][arch]:>6.2f}x  "
            line += ", ".join(f"{x:.2f}" for x in row["ratio_per_round"][arch])
        lines.append(line.rstrip())
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The human-readable summary of a report (one model, or several under ``archs``)."""
    setting = (
        f"threads {report['threads']}; torch {report['torch']}; "
        f"trl {report['trl'] or 'not installed'}"
        + (f" (ppo: trl {report['trl_ppo']})" if report.get("trl_ppo") else "")
    )
    if "archs" in report:
        lines = [setting]
        for arch, part in report["archs"].items():
            lines += ["", f"=== {arch} ===", f"model: {describe(part['model'])}"]
            lines += format_model(part)
        lines += format_comparison(report["arch_comparison"])
    else:
        lines = [f"model: {describe(report['model'])}; {setting}"]
        lines += format_model(report)
    if report.get("trl_missing"):
        lines.append(f"\nno TRL side for: {', '.join(report['trl_missing'])}")
    if report.get("trl_ppo_problem"):
        lines.append(report["trl_ppo_problem"])
    if report.get("scaling"):
        arch = report["scaling"].get("arch", "gpt2")
        lines += ["", f"scaling (GRPO step, alignkit, {arch}): seconds per step"]
        for axis, points in report["scaling"]["curves"].items():
            pts = ", ".join(f"{p['x']}: {p['total']:.2f}" for p in points)
            lines.append(f"  {axis:<14} {pts}")
        lines.append(f"  plot: {report['scaling']['png']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        side, workload = args.worker.split(":")
        result = run_worker(args, side, workload, args.model_dir)
        write_json(args.result, json.dumps(result))
        return 0
    return run_suite(args)


def run_suite(args: argparse.Namespace) -> int:
    from benchmarks.scaling import run_scaling
    from benchmarks.trl_ppo import installed_version, problem
    from benchmarks.trl_side import TRL_RUNNERS, trl_version

    started = time.perf_counter()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    version = trl_version()
    if args.trl and version is None:
        raise SystemExit("--trl: TRL is not installed; pip install -e .[bench]")
    use_trl = version is not None and args.trl is not False
    trl_workloads = set(TRL_RUNNERS) if use_trl else set()
    # PPO's TRL side is TRL 1.12 in its own folder, checked here without importing it.
    ppo_problem = problem(args.trl_ppo_dir) if args.trl is not False else None
    if "ppo" in args.workload_list and args.trl is not False:
        if ppo_problem is None:
            trl_workloads.add("ppo")
        elif args.trl:
            raise SystemExit(f"--trl: {ppo_problem}")
        else:
            print(ppo_problem, flush=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    parts: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-model-") as tmp:
        models = {arch: build_model(args, Path(tmp) / arch, arch) for arch in args.arch_list}
        seconds = 0.02 if args.quick else 0.3
        train_rows = args.micro * (32 + args.new_tokens)
        decode_rows = args.prompts * args.samples
        first = {}
        for arch, model_dir in models.items():
            info, _, matmuls = model_info(model_dir)
            if arch != "gpt2":
                info["matched_to"] = {"arch": "gpt2", **gpt2_reference(vars(args))[1]}
            parts[arch] = {"model": info}
            first[arch] = (matmuls, matmul_ceiling(matmuls, train_rows, seconds))
            log(
                f"{arch}: {info['parameters'] / 1e6:.2f}M parameters; matmul ceiling "
                f"{first[arch][1]['gflops']:.1f} GFLOP/s"
            )
        log(f"running {args.workload_list}")
        results = measure_workloads(args, models, trl_workloads, log)
        for arch, (matmuls, before) in first.items():
            # Measured again after the workloads: the higher of the two is the ceiling (the
            # machine is shared, a busy moment only lowers a measurement).
            after = matmul_ceiling(matmuls, train_rows, seconds)
            ceiling = {
                "train": max(before, after, key=lambda c: c["gflops"]),
                "decode": matmul_ceiling(matmuls, decode_rows, seconds),
                "train_measurements": [before["gflops"], after["gflops"]],
            }
            for key, res in results[arch].items():
                rate = ceiling["decode" if key.startswith("generation") else "train"]["gflops"]
                res["derived"] = derive(res, rate)
            parts[arch].update(
                matmul_ceiling=ceiling, results=results[arch], ratios=ratios(results[arch])
            )
    common: dict[str, Any] = {
        "batch": {
            "prompts": args.prompts,
            "samples": args.samples,
            "new_tokens": args.new_tokens,
            "micro_batch": args.micro,
            "pairs": args.pairs,
        },
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "trl": version if use_trl else None,
        "trl_ppo": installed_version(args.trl_ppo_dir) if "ppo" in trl_workloads else None,
        "trl_ppo_problem": ppo_problem if "ppo" in args.workload_list else None,
    }
    missing = [
        w
        for w in args.workload_list
        if args.trl is not False and (use_trl or w == "ppo") and w not in trl_workloads
    ]
    if len(parts) == 1:
        (part,) = parts.values()
        report: dict[str, Any] = {"model": part.pop("model"), **common, **part}
    else:
        comparison = compare_archs({arch: part["results"] for arch, part in parts.items()})
        report = {**common, "archs": parts, "arch_comparison": comparison}
    report["trl_missing"] = missing
    if args.scaling:
        report["scaling"] = run_scaling(args, log, args.arch_list[0])
    report["wall_seconds"] = time.perf_counter() - started
    text = json.dumps(report, indent=2)
    write_json(args.out / "results.json", text + "\n")
    table = format_table(report)
    (args.out / "results.txt").write_text(table + "\n")
    print(table)
    print(f"\nwall time {report['wall_seconds']:.0f} s; JSON: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
