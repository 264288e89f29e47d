"""The feedback store: every answer the gateway gives (id, version, A/B arm, prompt, completion) and
the ratings users send back for it (`POST /v1/feedback`).

SQLAlchemy Core over any database URL: SQLite (WAL) on one host, PostgreSQL where several gateway
replicas on several nodes write (`feedback.url: postgresql+psycopg2://...`). Written by the gateway,
read by `privlm model compare` (A/B statistics) and `privlm data feedback` (the data loop). A rating
is stored as a score in [0, 1] (thumbs up 1, down 0; a 1-5 rating r as (r-1)/4); a response rated
twice counts with its latest rating.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

_META = sa.MetaData()
RESPONSES = sa.Table(
    "responses", _META,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(200), nullable=False, index=True),      # registered name, e.g. privlm-tiny
    sa.Column("version", sa.String(200), nullable=False, index=True),    # e.g. privlm-tiny/v3
    sa.Column("arm", sa.String(200), nullable=False),                    # champion, challenger or an adapter
    sa.Column("endpoint", sa.String(20), nullable=False),
    sa.Column("caller", sa.String(200), nullable=False),
    sa.Column("created", sa.Float, nullable=False, index=True),
    sa.Column("prompt", sa.Text),
    sa.Column("completion", sa.Text),
)
FEEDBACK = sa.Table(
    "feedback", _META,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("response_id", sa.String(64), sa.ForeignKey("responses.id"), nullable=False, index=True),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("correction", sa.Text),
    sa.Column("caller", sa.String(200), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)


def default_url() -> str:
    """The serving settings' default store (runs/serving/feedback.db), for the CLIs."""
    from serving.settings import Feedback

    return Feedback().url


class FeedbackError(ValueError):
    """A store that cannot be opened, or feedback for an answer it does not hold."""


@dataclass(frozen=True)
class Rated:
    """One rated answer (its latest rating)."""

    id: str
    version: str
    arm: str
    score: float
    prompt: str | None
    completion: str | None
    correction: str | None
    created: float


def score_of(rating: int | None = None, thumbs: str | None = None, score: float | None = None) -> float:
    """The one scale every comparison uses: [0, 1]."""
    if score is not None:
        return float(score)
    if thumbs is not None:
        return 1.0 if thumbs == "up" else 0.0
    if rating is not None:
        return (rating - 1) / 4
    raise FeedbackError("feedback needs one of rating (1-5), thumbs (up/down) or score (0-1)")


class FeedbackStore:
    """Responses and their ratings in one database."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = sa.create_engine(url, future=True)
        except (sa.exc.ArgumentError, ModuleNotFoundError) as exc:
            raise FeedbackError(f"feedback.url={url!r} is not a database URL SQLAlchemy can open ({exc}); use e.g. "
                                "sqlite:////srv/privlm/feedback.db or postgresql+psycopg2://user@host/db") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        _META.create_all(self.engine)

    def record(self, *, id: str, model: str, version: str, arm: str, endpoint: str, caller: str,
               prompt: str | None, completion: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(RESPONSES.insert().values(id=id, model=model, version=version, arm=arm, endpoint=endpoint,
                                                   caller=caller, created=time.time(), prompt=prompt,
                                                   completion=completion))

    def response(self, id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(RESPONSES).where(RESPONSES.c.id == id)).mappings().first()
        return dict(row) if row else None

    def add(self, response_id: str, score: float, caller: str, correction: str | None = None) -> dict[str, Any]:
        """Store a rating of a recorded answer; returns that answer's record."""
        answer = self.response(response_id)
        if answer is None:
            raise FeedbackError(f"id={response_id!r}: no answer with this id is on record (feedback refers to the "
                                "`id` of a completion this endpoint returned)")
        self.rate(response_id, score, caller, correction)
        return answer

    def rate(self, response_id: str, score: float, caller: str, correction: str | None = None) -> None:
        """Store a rating of an answer the caller has already looked up (`response`)."""
        with self.engine.begin() as conn:
            conn.execute(FEEDBACK.insert().values(response_id=response_id, score=score, correction=correction,
                                                  caller=caller, created=time.time()))

    def rated(self, model: str | None = None, versions: list[str] | None = None,
              since: float | None = None) -> list[Rated]:
        """Rated answers, each with its latest rating, oldest first."""
        latest = (sa.select(FEEDBACK.c.response_id, sa.func.max(FEEDBACK.c.seq).label("seq"))
                  .group_by(FEEDBACK.c.response_id).subquery())
        q = (sa.select(RESPONSES, FEEDBACK.c.score, FEEDBACK.c.correction)
             .join(latest, latest.c.response_id == RESPONSES.c.id)
             .join(FEEDBACK, FEEDBACK.c.seq == latest.c.seq)
             .order_by(RESPONSES.c.created))
        if model is not None:
            q = q.where(RESPONSES.c.model == model)
        if versions is not None:
            q = q.where(RESPONSES.c.version.in_(versions))
        if since is not None:
            q = q.where(RESPONSES.c.created >= since)
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [Rated(r["id"], r["version"], r["arm"], r["score"], r["prompt"], r["completion"], r["correction"],
                      r["created"]) for r in rows]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL: gateway replicas on one host write concurrently while the CLI reads."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
