"""Test doubles for the pure policy core: a fake monotonic clock, binomial bounds, and a fake
transport driver that answers the effects of :func:`meshlib.outbound.call.run_call` on that
clock."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import httpx

import meshlib
from meshlib.outbound.call import Buffer, Effect, Outcome, Race, RaceResult, Send, Sleep, run_call

#: Answers one attempt, as the network would.
Responder = Callable[[Send], Outcome]


class FakeClock:
    """A monotonic clock that only moves when a test advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    """Bounds on the number of successes in ``n`` trials of probability ``p`` (mean ± 5σ)."""
    mean = n * p
    spread = sigmas * math.sqrt(n * p * (1.0 - p))
    return mean - spread, mean + spread


# -- the call sequence's driver, on the fake clock ----------------------------------------------


def status(code: int, headers: dict[str, str] | None = None, elapsed: float = 0.01) -> Responder:
    def respond(send: Send) -> Outcome:
        return Outcome(httpx.Response(code, headers=headers, request=send.request), None, elapsed)

    return respond


def refused(send: Send) -> Outcome:
    return Outcome(None, httpx.ConnectError("x", request=send.request), 0.001)


def timed_out(send: Send) -> Outcome:
    """The attempt's own timeout (per try, or the remaining deadline) expires."""
    timeout = send.request.extensions["timeout"]["read"]
    return Outcome(None, httpx.ReadTimeout("t", request=send.request), timeout)


def script(*responders: Responder) -> Responder:
    """One responder per attempt; the last one repeats."""
    queue = list(responders)

    def respond(send: Send) -> Outcome:
        return (queue.pop(0) if len(queue) > 1 else queue[0])(send)

    return respond


class Driver:
    """Performs effects like the real transports do, but on the fake clock."""

    def __init__(self, clock: FakeClock, respond: Responder) -> None:
        self.clock = clock
        self.respond = respond
        self.effects: list[Any] = []
        self.sent_at: list[float] = []

    @property
    def sends(self) -> list[Send]:
        return [e for e in self.effects if isinstance(e, Send)]

    def sleeps(self) -> list[float]:
        return [e.seconds for e in self.effects if isinstance(e, Sleep)]

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.effects if isinstance(e, kind)]

    def perform(self, effect: Any) -> Any:
        self.effects.append(effect)
        if isinstance(effect, Send):
            self.sent_at.append(self.clock())
            outcome = self.respond(effect)
            self.clock.advance(outcome.elapsed)
            return outcome
        if isinstance(effect, Sleep):
            self.clock.advance(effect.seconds)
        elif isinstance(effect, Buffer):
            effect.request.read()
        elif isinstance(effect, Race):  # no hedge fires: the first attempt answers in time
            return RaceResult(effect.first, self.perform(effect.first))
        return None

    def run(self, call: Any) -> httpx.Response:
        value = None
        while True:
            try:
                effect = call.send(value)
            except StopIteration as stop:
                response: httpx.Response = stop.value
                return response
            value = self.perform(effect)


def start(
    mesh: meshlib.Mesh, method: str = "GET", url: str = "http://reviews/r/1", **kw: Any
) -> Generator[Effect, Any, httpx.Response]:
    request = httpx.Request(method, url, **kw)
    service = mesh.router.resolve(request.url.host, mesh.namespace)
    assert service is not None
    return run_call(mesh, mesh.router, service, request)
