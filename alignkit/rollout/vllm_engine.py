"""``rollout=vllm``: vLLM samples the rollouts; its weights follow the policy.

Two deployments, as on GPUs:

* ``rollout.mode=colocate``: the engine lives in this process, on the trainer's device
  (``gpu_memory_utilization`` leaves the rest of a GPU to training). Under FSDP every rank
  runs its own engine for its share of the prompts (vLLM's ``external_launcher`` executor).
  Weights go straight from the policy to the engine, one tensor at a time
  (``collective_rpc("reload_weights")``).
* ``rollout.mode=server``: the engine is a separate process, ``python -m
  alignkit.rollout.vllm_server`` (started here as a child, or already running at
  ``rollout.url``, e.g. on other GPUs with ``--tensor-parallel-size``). Requests and token
  ids travel as JSON over an authenticated socket, weights as one safetensors blob: nothing
  received is unpickled.

The engine starts from the policy's config and tokenizer with placeholder weights
(``load_format=dummy``), and the policy's weights are loaded before its first rollout and
after every update (the policy changed when ``ctx.step`` did): a resumed run's engine samples
from the resumed weights.

Sampling: token ids in, token ids out (never re-tokenised text), the run's stop ids, the
step's temperature and, per row, a seed derived from (``seed``, step, the row's place in the
global batch), so samples do not depend on the number of ranks. The engine's log-probs are
taken after temperature (``logprobs_mode=processed_logprobs``), the distribution the tokens
were drawn from; the trainer's own are then computed by the rollout and the mismatch is
corrected (:mod:`alignkit.rollout.mismatch`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Client, Connection
from typing import Any

import torch
from torch import Tensor

from alignkit.context import RunContext
from alignkit.errors import ConfigError
from alignkit.models.generation import GenerationOutput
from alignkit.rollout.engines import SamplingOptions
from alignkit.rollout.weights import policy_weights, weights_blob

__all__ = [
    "ColocatedVLLM",
    "ServerClient",
    "VLLMEngine",
    "WeightSyncExtension",
    "engine_kwargs",
    "row_seed",
    "sampling_kwargs",
]

CPU_KV_CACHE_MB = 64
"""KV-cache size on the CPU when ``rollout.kv_cache_memory_mb`` is null: without a set size
vLLM reserves most of the machine's memory."""


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of global row ``row`` at ``step``: a stable 31-bit hash."""
    digest = hashlib.blake2b(f"{seed}:{step}:{row}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def engine_kwargs(
    node: Any, model_dir: str, device: torch.device, max_model_len: int, seed: int
) -> dict[str, Any]:
    """``vllm.LLM`` arguments for ``rollout.*`` on ``device``."""
    cpu = device.type == "cpu"
    dtype = str(node.get("dtype", "auto"))
    if dtype == "auto" and cpu:
        dtype = "float32"
    eager = node.get("enforce_eager")
    kwargs: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": model_dir,
        "dtype": dtype,
        "seed": int(seed),
        "max_model_len": int(max_model_len),
        "enforce_eager": cpu if eager is None else bool(eager),
        "load_format": "dummy",  # the policy's weights are loaded before the first rollout
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": "alignkit.rollout.vllm_engine.WeightSyncExtension",
        "tensor_parallel_size": int(node.get("tensor_parallel_size", 1)),
    }
    kv_mb = node.get("kv_cache_memory_mb")
    if kv_mb is not None or cpu:
        kwargs["kv_cache_memory_bytes"] = int(kv_mb or CPU_KV_CACHE_MB) << 20
    if not cpu:
        kwargs["gpu_memory_utilization"] = float(node.get("gpu_memory_utilization", 0.3))
    return kwargs


def sampling_kwargs(options: SamplingOptions, stop_ids: Sequence[int]) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments of every row (the seed is added per row).

    Greedy decoding is vLLM's temperature 0; its log-probs are then not at the run's
    temperature, which the trainer's recomputed log-probs make up for (the engine does not
    report the trainer's log-probs).
    """
    return {
        "n": 1,
        "temperature": 0.0 if options.greedy else options.temperature,
        "top_k": options.top_k,
        "top_p": options.top_p,
        "max_tokens": options.max_new_tokens,
        "stop_token_ids": [int(t) for t in stop_ids],
        "logprobs": 0,  # the sampled token's own log-prob
        "detokenize": False,
        "skip_special_tokens": False,
    }


# ---------------------------------------------------------------------------------------------
# the engine process side
# ---------------------------------------------------------------------------------------------


class WeightSyncExtension:
    """Methods vLLM adds to each of its workers (``worker_extension_cls``)."""

    def alignkit_load_blob(self, blob: bytes) -> None:
        """Load a safetensors blob of full weights (Hugging Face names) in place."""
        from safetensors.torch import load

        self.reload_weights(weights_iterator=list(load(blob).items()))  # type: ignore[attr-defined]


class ColocatedVLLM:
    """A ``vllm.LLM`` in this process: sampling and in-place weight loads.

    Every call runs with autocast off: the trainer's step runs under the backend's autocast,
    which would otherwise turn the engine's own float32 matmuls into bf16 ones.
    """

    def __init__(self, kwargs: dict[str, Any], per_trainer_rank: bool = True) -> None:
        # In-process engine core (no extra process per engine) and no compilation on a CPU.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if kwargs.get("enforce_eager"):
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
        if per_trainer_rank and under_torchrun:
            # Colocated under torchrun (FSDP): one engine per trainer rank, in its process.
            kwargs = {**kwargs, "distributed_executor_backend": "external_launcher"}
        from vllm import LLM

        with _no_autocast():
            self.llm = LLM(**kwargs)

    def load_weights(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        """Load full weights in place, one tensor at a time."""
        with _no_autocast():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": ((k, v.detach().clone()) for k, v in weights)},
            )
        self._forget_cached_prompts()

    def load_blob(self, blob: bytes) -> None:
        with _no_autocast():
            self.llm.collective_rpc("alignkit_load_blob", args=(blob,))
        self._forget_cached_prompts()

    def _forget_cached_prompts(self) -> None:
        # Prefix caching keeps prompts' key/value blocks across requests; computed with the
        # old weights, they must not serve the new ones (a reload does not clear them).
        self.llm.reset_prefix_cache()

    def generate(
        self, prompts: list[list[int]], seeds: list[int], params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Per prompt ``{"tokens": [...], "logprobs": [...], "finished": bool}``."""
        from vllm import SamplingParams

        sampling = [SamplingParams(**params, seed=s) for s in seeds]
        requests = [{"prompt_token_ids": p} for p in prompts]
        with _no_autocast():
            outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        return [_completion(o.outputs[0]) for o in outputs]


def _no_autocast() -> Any:
    """A block with autocast off on every device that has it on."""
    import contextlib

    stack = contextlib.ExitStack()
    for device in ("cuda", "cpu"):
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def _completion(out: Any) -> dict[str, Any]:
    tokens = [int(t) for t in out.token_ids]
    logprobs = [float(step[tok].logprob) for step, tok in zip(out.logprobs, tokens, strict=True)]
    return {"tokens": tokens, "logprobs": logprobs, "finished": out.finish_reason == "stop"}


# ---------------------------------------------------------------------------------------------
# the trainer side of a separate engine process
# ---------------------------------------------------------------------------------------------


def send_json(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message).encode())


def recv_json(conn: Connection) -> dict[str, Any]:
    reply = json.loads(conn.recv_bytes().decode())
    if not isinstance(reply, dict):
        raise ConnectionError(f"the vLLM server sent {type(reply).__name__}, expected an object")
    if "error" in reply:
        raise RuntimeError(f"vLLM server: {reply['error']}")
    return reply


class ServerClient:
    """The trainer's connection to ``python -m alignkit.rollout.vllm_server``."""

    def __init__(
        self,
        address: tuple[str, int],
        authkey: bytes,
        timeout_s: float = 300.0,
        process: subprocess.Popen[bytes] | None = None,
    ):
        """Connect, retrying while the server starts; ``process``: the server this trainer
        started, whose early exit ends the wait at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.conn = Client(address, authkey=authkey)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if process is not None and process.poll() is not None:
                    raise ConnectionError(
                        f"the vLLM server exited with code {process.returncode} before "
                        "accepting connections (its error is above)"
                    ) from None
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"no vLLM server at {address[0]}:{address[1]} after {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.5)
        send_json(self.conn, {"op": "ping"})
        self.info = recv_json(self.conn)

    def load_weights(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        blob = weights_blob(weights)
        send_json(self.conn, {"op": "load_weights", "bytes": len(blob)})
        self.conn.send_bytes(blob)
        recv_json(self.conn)

    def generate(
        self, prompts: list[list[int]], seeds: list[int], params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        send_json(self.conn, {"op": "generate", "prompts": prompts, "seeds": seeds, **params})
        return list(recv_json(self.conn)["outputs"])

    def close(self, shutdown: bool = False) -> None:
        try:
            if shutdown:
                send_json(self.conn, {"op": "shutdown"})
            self.conn.close()
        except OSError:
            pass


TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _server_env() -> dict[str, str]:
    """This process's environment without torchrun's: the server is not a trainer rank, and
    must not join (or bind) the trainer's rendezvous."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parse_url(url: str) -> tuple[str, int]:
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"rollout.url={url!r}: expected host:port")
    return host, int(port)


# ---------------------------------------------------------------------------------------------
# the engine alignkit's rollout uses
# ---------------------------------------------------------------------------------------------


class VLLMEngine:
    """The ``rollout_engine`` ``vllm`` (see the module docstring)."""

    trainer_logprobs = False

    def __init__(self, ctx: RunContext) -> None:
        self.node = ctx.cfg.rollout
        mode = str(self.node.get("mode", "colocate"))
        if mode not in ("colocate", "server"):
            raise ConfigError(f"rollout.mode={mode!r}: expected colocate or server")
        self.mode = mode
        self.client: Any = None
        self.process: subprocess.Popen[bytes] | None = None
        self.synced_step: int | None = None
        self.calls: tuple[int, int] = (-1, 0)
        """``(step, calls so far)``: the rollout calls of the current step, so that a second
        call (a greedy baseline, a refill) draws with other seeds than the first."""
        self.model_dir: tempfile.TemporaryDirectory[str] | None = None
        self.seconds = {"start": 0.0, "sync": 0.0}

    # -- start-up ---------------------------------------------------------------------------

    def _model_dir(self, ctx: RunContext) -> str:
        """The policy's config and tokenizer (no weights: the engine starts with placeholders)."""
        if self.model_dir is None:
            assert ctx.policy is not None and ctx.tokenizer is not None
            self.model_dir = tempfile.TemporaryDirectory(prefix="alignkit-vllm-")
            policy = ctx.policy
            base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
            base.config.save_pretrained(self.model_dir.name)
            generation = getattr(base, "generation_config", None)
            if generation is not None:
                generation.save_pretrained(self.model_dir.name)
            ctx.tokenizer.save_pretrained(self.model_dir.name)
        return self.model_dir.name

    def _kwargs(self, ctx: RunContext) -> dict[str, Any]:
        rl, task = ctx.cfg.rl, ctx.cfg.task
        max_len = int(task.max_prompt_tokens) + int(rl.max_new_tokens) + 8
        seed = int(ctx.cfg.seed)
        return engine_kwargs(self.node, self._model_dir(ctx), ctx.device, max_len, seed)

    def _start(self, ctx: RunContext) -> Any:
        start = time.perf_counter()
        if self.mode == "colocate":
            self.client = ColocatedVLLM(self._kwargs(ctx))
        else:
            self.client = self._connect(ctx)
        self.seconds["start"] = time.perf_counter() - start
        return self.client

    def _connect(self, ctx: RunContext) -> ServerClient:
        env_name = str(self.node.get("authkey_env", "ALIGNKIT_VLLM_AUTHKEY"))
        url = self.node.get("url")
        if url:
            key = os.environ.get(env_name)
            if not key:
                raise ConfigError(
                    f"rollout.url={url}: set the server's shared secret in ${env_name}"
                )
            return ServerClient(_parse_url(str(url)), key.encode())
        # One server for the whole trainer: rank 0 starts it on its node and tells the others
        # where it is and its secret (ranks on other nodes reach it by rank 0's host name).
        backend = ctx.backend
        address: tuple[str, int, str] | None = None
        if backend.rank == 0:
            key, port = secrets.token_hex(16), _free_port()
            spec = json.dumps(self._kwargs(ctx))
            python = str(self.node.get("python") or sys.executable)
            cmd = [python, "-m", "alignkit.rollout.vllm_server", "--port", str(port)]
            cmd += ["--engine", spec, "--parent-pid", str(os.getpid())]
            if backend.distributed:
                cmd += ["--host", "0.0.0.0"]
            env = {**_server_env(), env_name: key, "ALIGNKIT_VLLM_AUTHKEY_ENV": env_name}
            self.process = subprocess.Popen(cmd, env=env)
            address = (socket.gethostname() if backend.distributed else "127.0.0.1", port, key)
        if backend.distributed:
            address = backend.broadcast_object(address, src=0)
        assert address is not None
        host, port, key = address
        return ServerClient((host, port), key.encode(), process=self.process)

    # -- the protocol -------------------------------------------------------------------------

    def sync(self, ctx: RunContext) -> None:
        """Load the policy's current weights into the engine.

        A server shared by the ranks of an FSDP trainer is loaded by rank 0 alone; every rank
        still walks the weights (gathering a sharded tensor is a collective), and all wait
        until the load is done before sampling from it.
        """
        assert ctx.policy is not None
        start = time.perf_counter()
        weights = policy_weights(ctx.policy)
        shared = self.mode == "server" and ctx.backend.distributed
        if shared and ctx.backend.rank != 0:
            for _ in weights:
                pass
        else:
            self.client.load_weights(weights)
        if shared:
            ctx.backend.barrier()
        self.synced_step = int(ctx.step)
        self.seconds["sync"] = time.perf_counter() - start

    def generate(
        self,
        ctx: RunContext,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        stop_ids: Sequence[int],
        rows: tuple[int, int],
        options: SamplingOptions | None = None,
    ) -> GenerationOutput:
        if self.client is None:
            self._start(ctx)
        if self.synced_step != int(ctx.step):
            self.sync(ctx)
        prompts = [ids[m != 0].tolist() for ids, m in zip(prompt_ids, prompt_mask, strict=True)]
        seed, step = int(ctx.cfg.seed), int(ctx.step)
        call = self.calls[1] if self.calls[0] == step else 0
        self.calls = (step, call + 1)
        # Global row ids of call k start after k whole calls' rows: the first call's are 0..
        first = rows[0] + call * rows[1]
        seeds = [row_seed(seed, step, first + i) for i in range(len(prompts))]
        params = sampling_kwargs(options or SamplingOptions.from_config(ctx.cfg.rl), stop_ids)
        outputs = self.client.generate(prompts, seeds, params)
        pad = int(ctx.tokenizer.pad_token_id) if ctx.tokenizer is not None else 0
        return to_generation_output(outputs, pad, prompt_ids.device)

    def close(self) -> None:
        """Stop a server this engine started; drop the engine."""
        if isinstance(self.client, ServerClient):
            self.client.close(shutdown=self.process is not None)
        if self.process is not None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None
        self.client = None
        self.synced_step = None
        if self.model_dir is not None:
            self.model_dir.cleanup()
            self.model_dir = None


def to_generation_output(
    outputs: Sequence[dict[str, Any]], pad_token_id: int, device: torch.device
) -> GenerationOutput:
    """Per-row engine completions -> right-padded (B, R) tensors (R >= 1)."""
    width = max([len(o["tokens"]) for o in outputs] + [1])
    ids = torch.full((len(outputs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(outputs), width), dtype=torch.long)
    logprobs = torch.zeros((len(outputs), width), dtype=torch.float32)
    for i, out in enumerate(outputs):
        n = len(out["tokens"])
        ids[i, :n] = torch.tensor(out["tokens"], dtype=torch.long)
        mask[i, :n] = 1
        logprobs[i, :n] = torch.tensor(out["logprobs"], dtype=torch.float32)
    finished = torch.tensor([bool(o["finished"]) for o in outputs], dtype=torch.bool)
    return GenerationOutput(
        response_ids=ids.to(device),
        response_mask=mask.to(device),
        logprobs=logprobs.to(device),
        finished=finished.to(device),
    )
