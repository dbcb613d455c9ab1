"""The labels of a queue: an SQLite database (``labels.sqlite``) in the queue folder.

Tables:

* ``annotators``: a name and the SHA-256 of the annotator's login token (never the token);
* ``labels``: one answer of one annotator to one item: a label (ranks, ratings, critiques), a
  skip or a flag (with its reason). At most one per (item, annotator);
* ``leases``: which item an annotator was last shown and when, so two annotators working at
  once are not both handed the one item that needs a single more label.

Every answer is committed in its own transaction the moment it is given, in WAL mode with
``synchronous=FULL``: a crash of the server (or the machine) loses no answer that was
acknowledged.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Engine,
    ForeignKey,
    String,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

DB_FILE = "labels.sqlite"
LABEL, SKIP, FLAG = "label", "skip", "flag"
KINDS: tuple[str, ...] = (LABEL, SKIP, FLAG)
FLAG_REASONS: tuple[str, ...] = ("unsafe", "unclear")
ANSWERS: tuple[str, ...] = (LABEL, FLAG)
"""Kinds that count towards an item's ``labels_per_item``: a skip passes the item to someone
else, a flag is a judgement of the item (unsafe, unclear) and settles it like a label."""
LEASE_SECONDS = 15 * 60
"""How long an item shown to one annotator counts as being worked on for the others."""


class Base(DeclarativeBase):
    """Declarative base of the label tables."""


class Annotator(Base):
    """A person who labels; logs in with a token whose SHA-256 is ``token_hash``."""

    __tablename__ = "annotators"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[str] = mapped_column(String(40))

    @property
    def public_id(self) -> str:
        """The opaque id exports use (never the name or the token)."""
        return f"a{self.id}"


class Label(Base):
    """One answer of one annotator to one item (a label, a skip or a flag).

    ``order`` is the display order (original response indices, top first); ``ranks``,
    ``ratings`` and ``critiques`` are indexed by the original responses, so the shuffle the
    annotator saw is already undone.
    """

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[str] = mapped_column(String(500), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    reason: Mapped[str | None] = mapped_column(String(20))
    order: Mapped[list[int]] = mapped_column(JSON)
    ranks: Mapped[list[int] | None] = mapped_column(JSON)
    ratings: Mapped[list[int] | None] = mapped_column(JSON)
    critiques: Mapped[list[str] | None] = mapped_column(JSON)
    item_digest: Mapped[str] = mapped_column(String(64))
    created: Mapped[str] = mapped_column(String(40))


class Lease(Base):
    """The item an annotator was shown at ``shown_at`` (seconds since the epoch)."""

    __tablename__ = "leases"
    item_id: Mapped[str] = mapped_column(String(500), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"), primary_key=True)
    shown_at: Mapped[float]


class AlreadyAnswered(Exception):
    """The annotator has already labelled, skipped or flagged this item."""


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a login token: what the database keeps."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def display_order(annotator_id: int, item_id: str, k: int) -> list[int]:
    """The order annotator ``annotator_id`` sees the K responses of ``item_id`` in.

    A shuffle seeded by both ids: stable across reloads and processes (unlike ``hash()``),
    different between annotators, so a preference for the first position averages out.
    """
    digest = hashlib.sha256(f"{annotator_id}\0{item_id}".encode()).digest()
    order = list(range(k))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def _set_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the progress endpoint read while an answer is being written; FULL syncs the WAL
    # on every commit, so an acknowledged answer survives a power cut, not just a crash.
    cursor = dbapi_connection.cursor()
    for pragma in (
        "journal_mode=WAL",
        "synchronous=FULL",
        "foreign_keys=ON",
        "busy_timeout=10000",
    ):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def make_engine(path: Path) -> Engine:
    """An engine on the SQLite file ``path`` with the pragmas above, tables created."""
    # The threaded server hands a pooled connection to one request thread at a time.
    engine = create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _set_pragmas)
    Base.metadata.create_all(engine)
    return engine


class LabelStore:
    """The label database of one queue folder; each method is one short transaction."""

    def __init__(self, queue_dir: str | Path) -> None:
        self.path = Path(queue_dir) / DB_FILE
        self.engine = make_engine(self.path)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        """Release the pooled connections."""
        self.engine.dispose()

    # ---- annotators --------------------------------------------------------------------------

    def add_annotator(self, name: str) -> tuple[Annotator, str]:
        """Create ``name`` with a fresh token (or give an existing ``name`` a new one).

        Returns the annotator and the token; only its hash is stored, so the token cannot be
        shown again, and a new one invalidates the old link.
        """
        name = name.strip()
        if not name:
            raise ValueError("an annotator needs a non-empty name")
        token = secrets.token_urlsafe(24)
        with self.session() as s:
            annotator = s.scalar(select(Annotator).where(Annotator.name == name))
            if annotator is None:
                annotator = Annotator(name=name, token_hash=hash_token(token), created=now_iso())
                s.add(annotator)
            else:
                annotator.token_hash = hash_token(token)
            s.flush()
        return annotator, token

    def annotator_for_token(self, token: str) -> Annotator | None:
        """The annotator this login token belongs to, or None."""
        with self.session() as s:
            return s.scalar(select(Annotator).where(Annotator.token_hash == hash_token(token)))

    def annotator(self, annotator_id: int) -> Annotator | None:
        with self.session() as s:
            return s.get(Annotator, annotator_id)

    def annotators(self) -> list[Annotator]:
        with self.session() as s:
            return list(s.scalars(select(Annotator).order_by(Annotator.id)))

    # ---- answers -----------------------------------------------------------------------------

    def record(self, label: Label) -> Label:
        """Commit one answer now; AlreadyAnswered when the annotator gave one for the item."""
        try:
            with self.session() as s:
                s.add(label)
                s.execute(
                    delete(Lease).where(
                        Lease.item_id == label.item_id, Lease.annotator_id == label.annotator_id
                    )
                )
        except IntegrityError:
            raise AlreadyAnswered(label.item_id) from None
        return label

    def undo_last(self, annotator_id: int) -> Label | None:
        """Delete the annotator's latest answer and hand its item back to them first."""
        with self.session() as s:
            last = s.scalar(
                select(Label)
                .where(Label.annotator_id == annotator_id)
                .order_by(Label.id.desc())
                .limit(1)
            )
            if last is None:
                return None
            s.delete(last)
            _upsert_lease(s, last.item_id, annotator_id, time.time())
        return last

    def labels(self, annotator_id: int | None = None) -> list[Label]:
        """Every answer (or one annotator's), oldest first."""
        query = select(Label).order_by(Label.id)
        if annotator_id is not None:
            query = query.where(Label.annotator_id == annotator_id)
        with self.session() as s:
            return list(s.scalars(query))

    def answer_counts(self) -> dict[str, int]:
        """Item id -> answers counting towards ``labels_per_item`` (labels and flags)."""
        query = (
            select(Label.item_id, func.count())
            .where(Label.kind.in_(ANSWERS))
            .group_by(Label.item_id)
        )
        with self.session() as s:
            return {item_id: n for item_id, n in s.execute(query)}

    def answered_by(self, annotator_id: int) -> set[str]:
        """Items the annotator labelled, skipped or flagged."""
        query = select(Label.item_id).where(Label.annotator_id == annotator_id)
        with self.session() as s:
            return set(s.scalars(query))

    # ---- leases ------------------------------------------------------------------------------

    def lease(self, item_id: str, annotator_id: int) -> None:
        """Note that the annotator is being shown ``item_id`` now."""
        with self.session() as s:
            _upsert_lease(s, item_id, annotator_id, time.time())

    def leases(self) -> list[Lease]:
        with self.session() as s:
            return list(s.scalars(select(Lease).order_by(Lease.shown_at.desc())))


def _upsert_lease(session: Session, item_id: str, annotator_id: int, when: float) -> None:
    lease = session.get(Lease, (item_id, annotator_id))
    if lease is None:
        session.add(Lease(item_id=item_id, annotator_id=annotator_id, shown_at=when))
    else:
        lease.shown_at = when


# --------------------------------------------------------------------------------------------
# assignment
# --------------------------------------------------------------------------------------------


def pick_next(
    item_ids: Sequence[str],
    labels_per_item: int,
    counts: dict[str, int],
    done_by_me: set[str],
    others_working: dict[str, int],
    my_recent: Sequence[str] = (),
) -> str | None:
    """The item to show an annotator next, or None when nothing is left for them.

    Eligible: items they have not answered or skipped that still need answers. The item they
    were last shown (``my_recent``, most recent first) comes back first, so a reload or an undo
    shows the same item; otherwise the least-labelled item, counting items others are working
    on as labelled, ties broken by queue order.
    """
    eligible = {i for i in item_ids if i not in done_by_me and counts.get(i, 0) < labels_per_item}
    for item_id in my_recent:
        if item_id in eligible:
            return item_id
    position = {item_id: n for n, item_id in enumerate(item_ids)}
    if not eligible:
        return None

    def load(item_id: str) -> tuple[int, int]:
        return counts.get(item_id, 0) + others_working.get(item_id, 0), position[item_id]

    return min(eligible, key=load)


def next_item_id(
    store: LabelStore, item_ids: Sequence[str], labels_per_item: int, annotator_id: int
) -> str | None:
    """:func:`pick_next` on the database's state; leases the item it picks."""
    counts = store.answer_counts()
    done = store.answered_by(annotator_id)
    fresh_after = time.time() - LEASE_SECONDS
    others: dict[str, int] = {}
    mine: list[str] = []
    for lease in store.leases():  # most recent first
        if lease.annotator_id == annotator_id:
            mine.append(lease.item_id)
        elif lease.shown_at >= fresh_after:
            others[lease.item_id] = others.get(lease.item_id, 0) + 1
    item_id = pick_next(item_ids, labels_per_item, counts, done, others, mine)
    if item_id is not None:
        store.lease(item_id, annotator_id)
    return item_id
