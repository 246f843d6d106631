"""Build one connection's stages from its merged settings and run them in a fixed order.

Order: virus, then DomainKeys, then DKIM — signatures last, over the final bytes. A stage
that raises is a temporary failure (Z) naming the stage: an unscanned or unsigned message is
never let through by accident.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from filters.base import Stage, Verdict
from qmqpd.config import Config
from qmqpd.message import Message, Reply

# Each entry: a factory that returns the stage when the settings switch it on, else None.
# Adding a stage is one module plus one line here.
StageFactory = Callable[[Config], Stage | None]


def _when_set(module: str, *switches: str) -> StageFactory:
    """A factory importing its stage module only when one of its switches is set, so that
    sessions without signing do not pay for loading the crypto libraries."""

    def factory(config: Config) -> Stage | None:
        if all(config[name] is None for name in switches):
            return None
        return importlib.import_module(module).from_config(config)

    return factory


def preload() -> None:
    """Import every stage module now. `qmqpd serve` calls this in the master before it
    forks, so workers share the loaded modules instead of each importing them later."""
    for module in _STAGE_MODULES:
        importlib.import_module(module)


_STAGE_MODULES = ("filters.virus", "filters.dk", "filters.dkim")


def _factories() -> list[StageFactory]:
    factories: list[StageFactory] = []
    factories.append(_when_set("filters.virus", "QHPSI"))
    factories.append(_when_set("filters.dk", "DKSIGN", "DKVERIFY"))
    factories.append(_when_set("filters.dkim", "DKIMSIGN", "DKIMSIGNEXTRA", "DKIMVERIFY"))
    return factories


@dataclass
class PipelineResult:
    reply: Reply | None = None  # an answer forced by a stage (Z or D)
    discard: bool = False  # accept towards the client but queue nothing
    facts: dict[str, object] = field(default_factory=dict)


def build_stages(config: Config) -> list[Stage]:
    stages = []
    for factory in _factories():
        stage = factory(config)
        if stage is not None:
            stages.append(stage)
    return stages


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
