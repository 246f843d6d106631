"""Build one connection's stages from its merged settings and run them in a fixed order.

Order: virus, then DomainKeys, then DKIM — signatures last, over the final bytes. A stage
that raises is a temporary failure (Z) naming the stage: an unscanned or unsigned message is
never let through by accident.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from typing import NamedTuple

from qmqpd.config import Config, ConfigError, problem
from qmqpd.filters.base import Stage, Verdict
from qmqpd.message import Message, Record, Reply

# The stages in the order they run: (module, the settings that switch it on). Adding a stage
# is one module (its `from_config(config)` returns a `base.Stage` or None), one line here,
# and its settings' rows in the key table of qmqpd/config.py.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qmqpd.filters.virus", ("QHPSI",)),
    ("qmqpd.filters.dk", ("DKSIGN", "DKVERIFY")),
    ("qmqpd.filters.dkim", ("DKIMSIGN", "DKIMSIGNEXTRA", "DKIMVERIFY")),
)


def preload() -> None:
    """Import every stage module now. `qmqpd serve` calls this in the master before it
    forks, so workers share the loaded modules instead of each importing them later."""
    for module, _switches in STAGES:
        importlib.import_module(module)


class StageVerdict(NamedTuple):
    """What one stage decided, in the order the stages ran: for the master's counters."""

    stage: str
    action: str  # accept, tempfail, reject or discard


class PipelineResult(Record):
    __slots__ = ("discard", "facts", "reply", "verdicts")

    def __init__(self, reply: Reply | None = None, discard: bool = False,
                 facts: dict[str, object] | None = None,
                 verdicts: list[StageVerdict] | None = None) -> None:
        self.reply = reply  # an answer forced by a stage (Z or D)
        self.discard = discard  # accept towards the client but queue nothing
        self.facts: dict[str, object] = {} if facts is None else facts
        self.verdicts: list[StageVerdict] = [] if verdicts is None else verdicts


def build_stages(config: Config) -> list[Stage]:
    """The stages these settings switch on; a stage's module is imported only then, so
    sessions without signing do not pay for loading the crypto libraries."""
    stages = []
    for module, switches in STAGES:
        if all(config[name] is None for name in switches):
            continue
        stage = importlib.import_module(module).from_config(config)
        if stage is not None:
            stages.append(stage)
    return stages


def checked_stages(config: Config) -> tuple[list[Stage], list[ConfigError]]:
    """The stages, built once, and every reason they could not work: bad options, and
    what each stage's check() finds (key files named without `%` that are missing,
    unreadable or unparsable)."""
    try:
        stages = build_stages(config)
    except ConfigError as error:
        return [], [error]
    found = [problem(setting, config.source(setting), reason)
             for stage in stages for setting, reason in stage.check()]
    return stages, found


def run(stages: Sequence[Stage], message: Message) -> PipelineResult:
    result = PipelineResult()
    for stage in stages:
        started = time.monotonic()
        try:
            verdict = stage.process(message)
        except Exception as error:  # a stage that could not run must not pass the message
            verdict = Verdict.tempfail(
                Reply.named("filter_failed", stage=stage.name).text,
                error=f"{type(error).__name__}: {error}",
            )
        result.facts[f"{stage.name}_ms"] = round((time.monotonic() - started) * 1000, 1)
        result.facts.update({f"{stage.name}_{k}": v for k, v in verdict.facts.items()})
        result.facts[stage.name] = verdict.action
        result.verdicts.append(StageVerdict(stage.name, verdict.action))
        forced = verdict.reply()
        if forced is not None:
            result.reply = forced
            return result
        if verdict.action == "discard":
            result.discard = True
            return result
        for header in reversed(verdict.headers):
            message.prepend_header(header)
    return result
