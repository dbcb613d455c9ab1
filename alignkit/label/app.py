"""The labelling web app: server-rendered pages, one small script, no external resources.

Routes:

* ``GET /?token=...`` logs an annotator in (the token goes into the signed session cookie and
  the address bar is cleaned by a redirect); ``GET /`` shows their next item;
* ``POST /label``, ``/skip``, ``/flag``, ``/undo``: one answer each, committed at once;
* ``GET /progress``: progress and agreement (for annotators);
* ``GET /api/progress``: progress as JSON (counts only, for a pipeline to poll);
  ``GET /healthz``: liveness.

Every POST carries the session's CSRF token; every page is served with a content security
policy that allows only this app's own script and stylesheet. Data is shown as text
(templates autoescape), never interpreted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import (
    Flask,
    Response,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import HTTPException

from alignkit.label.db import (
    FLAG,
    FLAG_REASONS,
    LABEL,
    SKIP,
    AlreadyAnswered,
    Annotator,
    Label,
    LabelStore,
    display_order,
    hash_token,
    next_item_id,
    now_iso,
)
from alignkit.label.queue import Queue, QueueItem, read_queue
from alignkit.label.stats import compute_stats, progress

SECRET_ENV = "ALIGNKIT_LABEL_SECRET"
SECRET_FILE = ".secret_key"
MAX_CRITIQUE = 10_000
"""Characters per critique: a bound on what one form post can put into the database."""

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # The login link carries the token: never send the address on to another site.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# --------------------------------------------------------------------------------------------
# the secret key
# --------------------------------------------------------------------------------------------


def load_secret_key(queue_dir: Path) -> str:
    """``$ALIGNKIT_LABEL_SECRET``, else the queue's ``.secret_key`` (created 0600 if absent).

    The file is written under a temporary name and hard-linked into place, so two servers
    starting at once agree on one key and neither reads a half-written file.
    """
    from_env = os.environ.get(SECRET_ENV)
    if from_env:
        return from_env
    path = queue_dir / SECRET_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    fd, tmp = tempfile.mkstemp(prefix=f".{SECRET_FILE}.", dir=queue_dir)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # FileExistsError: another process won the race; its key is the one to use.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return path.read_text(encoding="utf-8").strip()


# --------------------------------------------------------------------------------------------
# the label form
# --------------------------------------------------------------------------------------------


def response_name(position: int, k: int) -> str:
    """How the response shown at ``position`` is called: A, B, ... (1, 2, ... past 26)."""
    return chr(ord("A") + position) if k <= 26 else str(position + 1)


@dataclass
class FormValues:
    """The raw values of a label form, by display position (kept to re-show on an error)."""

    ranks: list[str]
    ratings: list[str]
    critiques: list[str]

    @classmethod
    def empty(cls, k: int) -> FormValues:
        return cls([""] * k, [""] * k, [""] * k)

    @classmethod
    def read(cls, form: Mapping[str, str], k: int) -> FormValues:
        def field(name: str, p: int) -> str:
            return str(form.get(f"{name}-{p}", "")).strip()

        return cls(
            [field("rank", p) for p in range(k)],
            [field("rating", p) for p in range(k)],
            [str(form.get(f"critique-{p}", "")).strip() for p in range(k)],
        )


@dataclass
class ParsedLabel:
    """A valid label, indexed by the original response order."""

    ranks: list[int] | None
    ratings: list[int] | None
    critiques: list[str] | None


def _whole_number(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _dense(values: list[int]) -> list[int]:
    """Dense ranks from 0: ``[1, 3, 3]`` -> ``[0, 1, 1]`` (the gaps a tie leaves go)."""
    index = {v: n for n, v in enumerate(sorted(set(values)))}
    return [index[v] for v in values]


def _parse_ranks(values: FormValues, k: int, errors: list[str]) -> list[int]:
    ranks = []
    for p, text in enumerate(values.ranks):
        name = response_name(p, k)
        rank = _whole_number(text)
        if not text:
            errors.append(f"Response {name}: choose a rank (1 = best).")
        elif rank is None or not 1 <= rank <= k:
            errors.append(f"Response {name}: the rank must be a whole number from 1 to {k}.")
        ranks.append(rank or 0)
    return ranks


def _parse_ratings(values: FormValues, k: int, scale: int, errors: list[str]) -> list[int]:
    ratings = []
    for p, text in enumerate(values.ratings):
        name = response_name(p, k)
        rating = _whole_number(text)
        if not text:
            errors.append(f"Response {name}: choose a rating from 1 to {scale}.")
        elif rating is None:
            errors.append(f"Response {name}: the rating must be a whole number, got {text!r}.")
        elif not 1 <= rating <= scale:
            errors.append(f"Response {name}: rating {rating} is outside the scale 1..{scale}.")
        ratings.append(rating or 0)
    return ratings


def _check_critiques(values: FormValues, k: int, only_task: bool, errors: list[str]) -> None:
    for p, text in enumerate(values.critiques):
        if len(text) > MAX_CRITIQUE:
            errors.append(
                f"Response {response_name(p, k)}: the critique is longer than "
                f"{MAX_CRITIQUE} characters."
            )
    if only_task and not any(values.critiques):
        errors.append("Write a critique of at least one response.")


def parse_label(
    values: FormValues, order: list[int], tasks: tuple[str, ...], scale: int
) -> tuple[ParsedLabel | None, list[str]]:
    """A label in original response order, or None and every problem with the form."""
    k = len(order)
    errors: list[str] = []
    ranks = _parse_ranks(values, k, errors) if "rank" in tasks else None
    ratings = _parse_ratings(values, k, scale, errors) if "rate" in tasks else None
    if "critique" in tasks:
        _check_critiques(values, k, tasks == ("critique",), errors)
    if errors:
        return None, errors

    def original(shown: list[Any]) -> list[Any]:
        out: list[Any] = [None] * k
        for p, value in enumerate(shown):
            out[order[p]] = value
        return out

    return (
        ParsedLabel(
            _dense(original(ranks)) if ranks is not None else None,
            original(ratings) if ratings is not None else None,
            original(values.critiques) if "critique" in tasks else None,
        ),
        [],
    )


# --------------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------------


@dataclass
class LabelState:
    """What every request of one app needs: the queue and its label store."""

    queue: Queue
    store: LabelStore


def _state() -> LabelState:
    return current_app.extensions["alignkit_label"]


def _annotator() -> Annotator | None:
    """The logged-in annotator, if the session's token is still theirs."""
    if "annotator" not in g:
        annotator = None
        annotator_id = session.get("annotator")
        if isinstance(annotator_id, int):
            annotator = _state().store.annotator(annotator_id)
            # A new link for the annotator (a new token) ends the sessions of the old one.
            if annotator is not None and not hmac.compare_digest(
                annotator.token_hash, str(session.get("token_hash", ""))
            ):
                annotator = None
        g.annotator = annotator
    return g.annotator


def _require_annotator() -> Annotator:
    annotator = _annotator()
    if annotator is None:
        abort(403, "Open the labelling link you were given to log in.")
    return annotator


def _check_csrf() -> None:
    sent = request.form.get("csrf_token", "")
    expected = session.get("csrf", "")
    if not expected or not hmac.compare_digest(str(sent), str(expected)):
        abort(400, "This form has expired or did not come from this page; reload and try again.")


def _csrf_token() -> str:
    """The session's CSRF token, created on first use."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def _posted_item() -> QueueItem:
    item = _state().queue.item(request.form.get("item_id", ""))
    if item is None:
        abort(400, "Unknown item; reload the page.")
    return item


def _progress_summary(annotator: Annotator) -> dict[str, Any]:
    state = _state()
    overall = progress(state.queue, state.store.labels())
    mine = len(state.store.answered_by(annotator.id))
    return {
        "mine": mine,
        "total": overall["items"],
        "given": overall["labels_given"],
        "needed": overall["labels_needed"],
        "percent": round(100 * overall["labels_given"] / max(overall["labels_needed"], 1)),
    }


def _render_item(
    annotator: Annotator,
    item: QueueItem,
    values: FormValues | None = None,
    errors: list[str] | None = None,
    status: int = 200,
) -> tuple[str, int]:
    state = _state()
    k = len(item.responses)
    order = display_order(annotator.id, item.id, k)
    cards = [
        {"pos": p, "name": response_name(p, k), "text": item.responses[i]}
        for p, i in enumerate(order)
    ]
    page = render_template(
        "item.html",
        annotator=annotator,
        item=item,
        cards=cards,
        k=k,
        settings=state.queue.settings,
        values=values or FormValues.empty(k),
        errors=errors or [],
        progress=_progress_summary(annotator),
        can_undo=bool(state.store.answered_by(annotator.id)),
        csrf=_csrf_token(),
    )
    return page, status


def _record(annotator: Annotator, item: QueueItem, kind: str, **fields: Any) -> None:
    k = len(item.responses)
    label = Label(
        item_id=item.id,
        annotator_id=annotator.id,
        kind=kind,
        order=display_order(annotator.id, item.id, k),
        item_digest=item.digest,
        created=now_iso(),
        **fields,
    )
    try:
        _state().store.record(label)
    except AlreadyAnswered:
        flash("You had already answered that item; here is your next one.")


def _login(token: str) -> Response:
    annotator = _state().store.annotator_for_token(token)
    if annotator is None:
        abort(403, "This labelling link is not valid (it may have been replaced by a new one).")
    session.clear()
    session.permanent = True
    session.update(
        annotator=annotator.id,
        token_hash=hash_token(token),
        csrf=secrets.token_urlsafe(32),
    )
    # Redirect so the token leaves the address bar and the browser history.
    return redirect(url_for("index"), code=303)


def _index() -> Any:
    token = request.args.get("token")
    if token:
        return _login(token)
    annotator = _require_annotator()
    state = _state()
    item_ids = [item.id for item in state.queue.items]
    item_id = next_item_id(
        state.store, item_ids, state.queue.settings.labels_per_item, annotator.id
    )
    if item_id is None:
        return render_template(
            "done.html",
            annotator=annotator,
            progress=_progress_summary(annotator),
            can_undo=bool(state.store.answered_by(annotator.id)),
            csrf=_csrf_token(),
        )
    item = state.queue.item(item_id)
    assert item is not None
    return _render_item(annotator, item)


def _submit_label() -> Any:
    annotator = _require_annotator()
    _check_csrf()
    item = _posted_item()
    settings = _state().queue.settings
    k = len(item.responses)
    values = FormValues.read(request.form, k)
    order = display_order(annotator.id, item.id, k)
    parsed, errors = parse_label(values, order, settings.tasks, settings.rating_scale)
    if parsed is None:
        return _render_item(annotator, item, values, errors, status=400)
    _record(
        annotator,
        item,
        LABEL,
        ranks=parsed.ranks,
        ratings=parsed.ratings,
        critiques=parsed.critiques,
    )
    return redirect(url_for("index"), code=303)


def _skip() -> Any:
    annotator = _require_annotator()
    _check_csrf()
    _record(annotator, _posted_item(), SKIP)
    flash("Skipped.")
    return redirect(url_for("index"), code=303)


def _flag() -> Any:
    annotator = _require_annotator()
    _check_csrf()
    item = _posted_item()
    reason = request.form.get("reason", "")
    if reason not in FLAG_REASONS:
        abort(400, f"A flag needs a reason: one of {', '.join(FLAG_REASONS)}.")
    _record(annotator, item, FLAG, reason=reason)
    flash(f"Flagged as {reason}.")
    return redirect(url_for("index"), code=303)


def _undo() -> Any:
    annotator = _require_annotator()
    _check_csrf()
    undone = _state().store.undo_last(annotator.id)
    if undone is None:
        flash("Nothing to undo.")
    else:
        flash(f"Undid your last {undone.kind}; the item is back.")
    return redirect(url_for("index"), code=303)


def _progress_page() -> Any:
    annotator = _require_annotator()
    state = _state()
    return render_template(
        "progress.html",
        annotator=annotator,
        progress=_progress_summary(annotator),
        overall=progress(state.queue, state.store.labels()),
        stats=compute_stats(state.queue, state.store),
        queue=state.queue,
    )


def _api_progress() -> Any:
    state = _state()
    return jsonify(progress(state.queue, state.store.labels()))


def _healthz() -> Any:
    return jsonify({"status": "ok", "items": len(_state().queue.items)})


def _error_page(exc: HTTPException) -> Any:
    if exc.code is not None and exc.code < 400:
        return exc  # a routing redirect, not an error
    return render_template("error.html", error=exc, annotator=None), exc.code or 500


def _security_headers(response: Response) -> Response:
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


_ROUTES: tuple[tuple[str, str, Callable[[], Any], tuple[str, ...]], ...] = (
    ("/", "index", _index, ("GET",)),
    ("/label", "submit_label", _submit_label, ("POST",)),
    ("/skip", "skip", _skip, ("POST",)),
    ("/flag", "flag", _flag, ("POST",)),
    ("/undo", "undo", _undo, ("POST",)),
    ("/progress", "progress_page", _progress_page, ("GET",)),
    ("/api/progress", "api_progress", _api_progress, ("GET",)),
    ("/healthz", "healthz", _healthz, ("GET",)),
)


def create_app(queue_dir: Path, *, secret_key: str | None = None) -> Flask:
    """The labelling app of the queue folder ``queue_dir``.

    ``secret_key`` signs the session cookie; by default ``$ALIGNKIT_LABEL_SECRET``, else a
    key kept in the queue folder (``.secret_key``, mode 0600), so logins survive a restart.
    """
    queue_dir = Path(queue_dir)
    queue = read_queue(queue_dir)
    app = Flask(__name__)
    # One cookie per queue: browsers share cookies between ports of one host, so two queues
    # served side by side on localhost must not overwrite each other's session.
    cookie = "alignkit_label_" + hashlib.sha256(str(queue_dir.resolve()).encode()).hexdigest()[:8]
    app.config.update(
        SECRET_KEY=secret_key or load_secret_key(queue_dir),
        SESSION_COOKIE_NAME=cookie,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(days=30),
        MAX_CONTENT_LENGTH=2 * 1024 * 1024,
    )
    app.extensions["alignkit_label"] = LabelState(queue, LabelStore(queue_dir))
    for rule, endpoint, view, methods in _ROUTES:
        app.add_url_rule(rule, endpoint, view, methods=list(methods))
    app.register_error_handler(HTTPException, _error_page)
    app.after_request(_security_headers)
    return app


def close_app(app: Flask) -> None:
    """Release the app's database connections."""
    app.extensions["alignkit_label"].store.close()
