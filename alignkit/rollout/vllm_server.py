"""A vLLM engine in its own process, serving alignkit's ``rollout.mode=server``.

    ALIGNKIT_VLLM_AUTHKEY=<secret> python -m alignkit.rollout.vllm_server --port 51000 \
        --engine '{"model": "<policy folder>", "tensor_parallel_size": 2, ...}'

``--engine`` is a JSON object of ``vllm.LLM`` arguments (what
:func:`alignkit.rollout.vllm_engine.engine_kwargs` builds; alignkit passes it when it starts
the server itself). The server listens on ``--host`` (default 127.0.0.1), authenticated
with the shared secret in ``$ALIGNKIT_VLLM_AUTHKEY`` (or the variable
``$ALIGNKIT_VLLM_AUTHKEY_ENV`` names). Messages are JSON; weights arrive as one safetensors
blob: nothing received is unpickled or executed. Every rank of a trainer may connect;
requests run one at a time.

Requests: ``ping``; ``generate`` (``prompts``: token-id lists, ``seeds``, sampling fields);
``load_weights`` (``bytes``, then the blob); ``shutdown``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from alignkit.rollout.vllm_engine import ColocatedVLLM, recv_json, send_json

SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_k",
    "top_p",
    "max_tokens",
    "stop_token_ids",
    "logprobs",
    "detokenize",
    "skip_special_tokens",
)


class Server:
    """One engine, any number of connections (every rank of an FSDP trainer connects), one
    request at a time: the engine is not thread-safe, so a lock serialises them."""

    def __init__(
        self, engine: ColocatedVLLM, info: dict[str, Any], address: Any, authkey: bytes
    ) -> None:
        self.engine, self.info = engine, info
        self.address, self.authkey = address, authkey
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def serve(self, conn: Connection) -> None:
        """Answer one connection's requests until it closes (or asks to shut down)."""
        with conn:
            while not self.stop.is_set():
                try:
                    request = recv_json(conn)
                except (EOFError, OSError):
                    return  # the trainer went away
                if self._answer(conn, request):
                    self.stop.set()
                    # Wake the accept loop, which then sees the stop.
                    with Client(self.address, authkey=self.authkey):
                        pass
                    return

    def _answer(self, conn: Connection, request: dict[str, Any]) -> bool:
        """Handle one request; True for ``shutdown``."""
        op = request.get("op")
        try:
            if op == "ping":
                send_json(conn, self.info)
            elif op == "generate":
                params = {k: request[k] for k in SAMPLING_FIELDS if k in request}
                with self.lock:
                    outputs = self.engine.generate(request["prompts"], request["seeds"], params)
                send_json(conn, {"outputs": outputs})
            elif op == "load_weights":
                blob = conn.recv_bytes()
                if len(blob) != int(request["bytes"]):
                    raise ValueError(f"expected {request['bytes']} bytes, got {len(blob)}")
                with self.lock:
                    self.engine.load_blob(blob)
                send_json(conn, {"ok": True})
            elif op == "shutdown":
                send_json(conn, {"ok": True})
                return True
            else:
                send_json(conn, {"error": f"unknown op {op!r}"})
        except Exception as exc:  # reported to the trainer, which raises it
            send_json(conn, {"error": f"{type(exc).__name__}: {exc}"})
        return False


def _exit_with(pid: int, every_s: float = 2.0) -> None:
    """End this process once ``pid`` (the trainer that started it) is gone: a crashed run
    must not leave an engine holding its port and its share of a GPU."""
    while True:
        time.sleep(every_s)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # alive, another user's
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--engine", required=True, help="JSON object of vllm.LLM arguments")
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process is gone"
    )
    args = parser.parse_args(argv)
    env_name = os.environ.get("ALIGNKIT_VLLM_AUTHKEY_ENV", "ALIGNKIT_VLLM_AUTHKEY")
    key = os.environ.get(env_name)
    if not key:
        print(f"vllm_server: set the shared secret in ${env_name}", file=sys.stderr)
        return 2
    kwargs = json.loads(args.engine)
    # Bind first, so a trainer waiting for the port connects as soon as the engine is up.
    with Listener((args.host, args.port), authkey=key.encode()) as listener:
        info = {"model": kwargs.get("model"), "pid": os.getpid()}
        local = ("127.0.0.1" if args.host in ("0.0.0.0", "") else args.host, args.port)
        server = Server(ColocatedVLLM(kwargs, per_trainer_rank=False), info, local, key.encode())
        if args.parent_pid is not None:
            threading.Thread(target=_exit_with, args=(args.parent_pid,), daemon=True).start()
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError, AuthenticationError):  # a failed handshake: keep serving
                continue
            if server.stop.is_set():
                conn.close()
                break
            threading.Thread(target=server.serve, args=(conn,), daemon=True).start()
    return 0


if __name__ == "__main__":
    sys.exit(main())
