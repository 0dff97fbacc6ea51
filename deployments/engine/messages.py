"""What the replica and its engine process say to each other: a fixed set of typed messages.

The replica's proxy (deployments.engine.process.EngineProcess) and the child
(deployments.engine.child) exchange pickled instances of these classes over one socket, and
nothing else; each side dispatches on the message's type to one explicit engine method.

    start-up   replica → child   Start(spec, entry, role, options)
               child → replica   Ready(facts) | StartFailed(error)
    requests   replica → child   Generate | Stream | GenerateBatch     (run on the child's event loop)
                                 KvReport | LoadReport | MemoryReport | LastProgress
                                                                      (a `Report`: cheap, answered at once
                                                                       by the child's reader thread)
                                 Cancel(call_id)                      (withdraw a call; never answered)
    answers    child → replica   a list per turn of the child's loop of
                                 Result(value) | Failure(error)        (a call's end; a stream's failure too)
                                 Opened | Item(delta) | End            (a stream: checked, each delta, done)

Every request carries a call id the replica chose; every answer names the call it answers. A
request the child does not know is answered with a Failure (a TypeError naming it), not dropped.
This module imports neither torch nor transformers (the replica does not load them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deployments.engine.generation import GenerationInput, GenerationOutput, ModelFacts, StreamDelta
from deployments.engine.host import EngineOptions
from placement.config import ModelSpec
from placement.plan import PlanEntry

# ---- start-up ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The replica's first message: what to load, as which role, built with which of the app's switches
    (the child reads them here, never from its environment)."""

    spec: ModelSpec
    entry: PlanEntry
    role: str
    options: EngineOptions = EngineOptions()


@dataclass(frozen=True)
class Ready:
    """The child built its engine and serves."""

    facts: ModelFacts


@dataclass(frozen=True)
class StartFailed:
    """The child could not build its engine (ModelLoadError, PlacementMismatch, ...)."""

    error: BaseException


# ---- requests: replica → child ---------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """Any request; the child answers a kind it does not know with a Failure."""

    call_id: int


@dataclass(frozen=True)
class Generate(Request):
    """`generate_async`: one whole answer (a Result)."""

    inp: GenerationInput


@dataclass(frozen=True)
class Stream(Request):
    """`open_stream`: Opened once checked, an Item per delta, then End (or a Failure at any point)."""

    inp: GenerationInput


@dataclass(frozen=True)
class GenerateBatch(Request):
    """`generate_batch`: whole answers in input order (a Result), on a thread of the child."""

    inputs: tuple[GenerationInput, ...]


@dataclass(frozen=True)
class Cancel(Request):
    """The caller of `call_id` went away: the child cancels that call and sends nothing more for it."""


@dataclass(frozen=True)
class Report(Request):
    """A cheap engine fact, read by the child's reader thread without waiting for its event loop."""


@dataclass(frozen=True)
class KvReport(Report):
    """`kv_report()`."""


@dataclass(frozen=True)
class LoadReport(Report):
    """`load_report()`."""


@dataclass(frozen=True)
class MemoryReport(Report):
    """`memory_report()`."""


@dataclass(frozen=True)
class LastProgress(Report):
    """The `last_progress` property."""


# ---- answers: child → replica ----------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """A call's value: a GenerationOutput, a list of them, or a report."""

    call_id: int
    value: GenerationOutput | list[GenerationOutput] | dict[str, Any] | float


@dataclass(frozen=True)
class Failure:
    """A call's (or an open stream's) error, as the replica can unpickle it (deployments.engine.child)."""

    call_id: int
    error: BaseException


@dataclass(frozen=True)
class Opened:
    """A stream's request passed its checks; its deltas follow."""

    call_id: int


@dataclass(frozen=True)
class Item:
    """One delta of a stream."""

    call_id: int
    delta: StreamDelta


@dataclass(frozen=True)
class End:
    """A stream finished: nothing more follows for it."""

    call_id: int


Answer = Result | Failure | Opened | Item | End
