"""``alignkit label QUEUE_DIR``: serve a labelling queue, add annotators, export, report.

Usage::

    alignkit label QUEUE_DIR [--host 127.0.0.1] [--port 8765]   # serve the app
    alignkit label QUEUE_DIR --add-annotator NAME                 # print NAME's login link
    alignkit label QUEUE_DIR --export OUT_DIR                     # feedback files
    alignkit label QUEUE_DIR --stats                              # counts and agreement
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
_TOKEN = re.compile(r"(token=)[^&\s'\"]+")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_EXTRA_MODULES = {"flask", "sqlalchemy", "werkzeug", "jinja2"}
"""What the ``label`` extra installs: missing, they get an install hint, not a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignkit label",
        description="Human labelling of model responses: serve a queue folder in a browser.",
    )
    parser.add_argument("queue", type=Path, help="the queue folder (items.jsonl, queue.json)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on / print")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8765)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--add-annotator", metavar="NAME", help="create NAME (or renew its link), print the URL"
    )
    action.add_argument("--export", metavar="OUT_DIR", type=Path, help="write feedback files")
    action.add_argument("--stats", action="store_true", help="print counts and agreement")
    return parser


def login_url(host: str, port: int, token: str) -> str:
    """The link an annotator opens (an IPv6 address in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def redact(message: str) -> str:
    """``message`` with every ``token=...`` value replaced: request logs never hold a token."""
    return _TOKEN.sub(r"\1[redacted]", message)


def _request_handler() -> type:
    from werkzeug.serving import WSGIRequestHandler

    class RedactingHandler(WSGIRequestHandler):
        """Werkzeug's request log, with login tokens taken out of logged URLs."""

        def log(self, type: str, message: str, *args: Any) -> None:
            super().log(type, "%s", redact(message % args if args else message))

    return RedactingHandler


def make_label_server(app: Any, host: str, port: int) -> Any:
    """A threaded WSGI server for ``app`` (one slow browser does not block the others) whose
    request log leaves tokens out; port 0 picks a free port (``server.server_port``)."""
    from werkzeug.serving import make_server

    return make_server(host, port, app, threaded=True, request_handler=_request_handler())


def serve(queue_dir: Path, host: str, port: int) -> int:
    """Serve the queue's app until interrupted."""
    from alignkit.label import create_app, read_queue

    queue = read_queue(queue_dir)
    app = create_app(queue_dir)
    server = make_label_server(app, host, port)
    if host not in _LOOPBACK:
        print(
            f"warning: listening on {host}: anyone who can reach it can try logging in, and "
            "the traffic is not encrypted",
            file=sys.stderr,
        )
    print(
        f"Serving {len(queue.items)} items of {queue_dir} on "
        f"http://{host}:{server.server_port}/ (Ctrl+C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _add_annotator(args: argparse.Namespace) -> int:
    from alignkit.label import add_annotator

    token = add_annotator(args.queue, args.add_annotator)
    print(f"Login link for {args.add_annotator.strip()} (keep it private; it is shown once):")
    print(login_url(args.host, args.port, token))
    return 0


def _export(args: argparse.Namespace) -> int:
    from alignkit.label.export import export_queue

    paths, exported = export_queue(args.queue, args.export)
    for name, path in paths.items():
        print(f"{path}: {len(exported.records[name])} records")
    if exported.stale:
        print(f"left out {exported.stale} answers for items that changed or left the queue")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from alignkit.label.stats import format_stats, label_stats, queue_progress

    progress = queue_progress(args.queue)
    print(
        f"{progress['items_done']} of {progress['items']} items done, "
        f"{progress['labels_given']} of {progress['labels_needed']} labels given"
        + (" (complete)" if progress["complete"] else "")
    )
    print(format_stats(label_stats(args.queue)), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``alignkit label``; returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.add_annotator is not None:
            return _add_annotator(args)
        if args.export is not None:
            return _export(args)
        if args.stats:
            return _stats(args)
        return serve(args.queue, args.host, args.port)
    except ModuleNotFoundError as exc:
        if exc.name not in _EXTRA_MODULES:
            raise
        print(
            f"error: alignkit label needs {exc.name}: pip install 'alignkit[label]'",
            file=sys.stderr,
        )
        return 2
    except (AlignkitError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
