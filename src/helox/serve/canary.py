"""Canary routing between the served version (`prod`) and a candidate.

- **Split**: a request goes to the candidate when its user's bucket is below the canary
  percentage. The bucket is the sha256 of the user key (the request's `user` field, else the
  `X-User-Id` header) modulo 10,000, so one user always sees one version while the share holds
  and a raised share only adds users. A request without a user key is bucketed at random.
- **Counters** per version: requests, server errors, latency (per request and per generated
  token, over the last `window_requests`), tokens; exported at `/metrics` and `/admin/canary`.
- **Automatic rollback** once the candidate has served `min_requests` requests (and prod too,
  for the comparisons): the split drops to 0 when the candidate's error rate exceeds prod's by
  more than `max_error_rate_increase`, or its p95 seconds per generated token exceed prod's
  times `max_latency_ratio`. A candidate whose registered evaluation failed is never routed
  (the same decision at start). The registry's aliases are not touched: the decision is
  logged, kept in `/admin/canary`, and handed to `on_rollback` (which publishes the event).
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from pydantic import Field

from helox.configbase import StrictModel
from helox.errors import HeloxError
from helox.serve.deploy import Deployment

BUCKETS = 10_000


class CanaryConfig(StrictModel):
    percent: float = Field(default=0.0, ge=0, le=100)
    """Share of users routed to the candidate."""
    min_requests: int = Field(default=20, ge=1)
    """Requests each version serves before the candidate is judged."""
    max_error_rate_increase: float = Field(default=0.05, ge=0, le=1)
    """Rollback when the candidate's error rate exceeds prod's by more than this."""
    max_latency_ratio: float = Field(default=2.0, gt=0)
    """Rollback when the candidate's p95 seconds per generated token exceed prod's times this."""
    window_requests: int = Field(default=500, ge=10)
    """Latencies and errors are judged over each version's last this many requests."""


@dataclass
class VersionStats:
    window: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    recent: deque = field(init=False)
    """(ok, seconds, seconds per token) of the last `window` requests."""

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.window)

    def record(self, ok: bool, seconds: float, tokens: int) -> None:
        self.requests += 1
        self.errors += not ok
        self.tokens += tokens
        self.recent.append((ok, seconds, seconds / max(tokens, 1)))

    def error_rate(self) -> float:
        return sum(not ok for ok, _, _ in self.recent) / max(len(self.recent), 1)

    def latency(self, q: float, per_token: bool = False) -> float | None:
        values = [s_tok if per_token else s for ok, s, s_tok in self.recent if ok]
        return float(np.quantile(values, q)) if values else None

    def snapshot(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "tokens": self.tokens,
                "error_rate": self.error_rate(),
                **{f"p{int(q * 100)}_s": self.latency(q) for q in (0.5, 0.95, 0.99)},
                "p95_s_per_token": self.latency(0.95, per_token=True)}


@dataclass(frozen=True)
class Decision:
    """The canary was rolled back: why, and the figures it was judged on."""

    reason: str
    candidate: dict
    prod: dict


class Router:
    """Picks the deployment of each request and judges the candidate as requests finish."""

    def __init__(self, prod: Deployment, candidate: Deployment | None, config: CanaryConfig,
                 on_rollback: Callable[[Decision], None] = lambda decision: None):
        self.prod, self.candidate, self.config = prod, candidate, config
        self.percent = config.percent if candidate is not None else 0.0
        self.stats = {"prod": VersionStats(config.window_requests),
                      "candidate": VersionStats(config.window_requests)}
        self.decision: Decision | None = None
        self._on_rollback = on_rollback
        self._lock = threading.Lock()
        if candidate is not None and candidate.eval_gate == "failed":
            self._on_rollback(self._roll_back(f"the candidate's registered evaluation "
                                              f"failed ({candidate.describe()})"))

    def deployments(self) -> list[tuple[str, Deployment]]:
        return [("prod", self.prod)] + ([("candidate", self.candidate)]
                                        if self.candidate is not None else [])

    def route(self, model: str, user: str | None) -> tuple[str, Deployment]:
        """(role, deployment) for a request naming `model`, from `user`'s bucket."""
        able = [(role, d) for role, d in self.deployments() if d.serves(model)]
        if not able:
            names = sorted({n for _, d in self.deployments() for n in (d.name,
                                                                       *d.engine.model_names())})
            raise UnknownModel(model, names)
        if len(able) == 1:
            return able[0]
        return able[1] if bucket(user) < self.percent * BUCKETS / 100 else able[0]

    def record(self, role: str, ok: bool, seconds: float, tokens: int) -> Decision | None:
        """Count a finished request; returns the rollback decision if this one triggered it."""
        with self._lock:
            self.stats[role].record(ok, seconds, tokens)
            if role != "candidate" or self.percent == 0:
                return None
            reason = self._judge()
            decision = self._roll_back(reason) if reason else None
        if decision is not None:
            self._on_rollback(decision)
        return decision

    def set_percent(self, percent: float) -> None:
        """An operator's new split (a previous rollback is cleared: the operator decided)."""
        if self.candidate is None and percent > 0:
            raise HeloxError("no candidate is served, so there is nothing to route to",
                             hint="start helox serve with --canary MODEL")
        with self._lock:
            self.percent, self.decision = percent, None
            self.stats["candidate"] = VersionStats(self.config.window_requests)

    def snapshot(self) -> dict:
        with self._lock:
            return {"percent": self.percent,
                    "prod": {"version": self.prod.describe(), **self.stats["prod"].snapshot()},
                    "candidate": None if self.candidate is None else {
                        "version": self.candidate.describe(), "eval_gate":
                            self.candidate.eval_gate, **self.stats["candidate"].snapshot()},
                    "rolled_back": None if self.decision is None else self.decision.reason}

    def _judge(self) -> str | None:
        cand, prod, cfg = self.stats["candidate"], self.stats["prod"], self.config
        if len(cand.recent) < cfg.min_requests or len(prod.recent) < cfg.min_requests:
            return None
        if cand.error_rate() > prod.error_rate() + cfg.max_error_rate_increase:
            return (f"candidate error rate {cand.error_rate():.1%} exceeds prod's "
                    f"{prod.error_rate():.1%} by more than {cfg.max_error_rate_increase:.1%}")
        slow, fast = cand.latency(0.95, True), prod.latency(0.95, True)
        if slow is not None and fast is not None and slow > fast * cfg.max_latency_ratio:
            return (f"candidate p95 latency {slow * 1e3:.1f} ms/token is over "
                    f"{cfg.max_latency_ratio:g}× prod's {fast * 1e3:.1f} ms/token")
        return None

    def _roll_back(self, reason: str) -> Decision:
        """Split to 0 (with the lock held, or before any request); the caller reports it."""
        self.percent = 0.0
        self.decision = Decision(reason, self.stats["candidate"].snapshot(),
                                 self.stats["prod"].snapshot())
        return self.decision


class UnknownModel(HeloxError):
    def __init__(self, model: str, known: list[str]):
        super().__init__(f"The model {model!r} does not exist", hint=f"use one of {known}")
        self.model, self.known = model, known


def bucket(user: str | None) -> int:
    if user is None:
        return random.randrange(BUCKETS)
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") % BUCKETS
