"""Build one connection's stages from its merged settings and run them in a fixed order.

Order: virus, then DomainKeys, then DKIM — signatures last, over the final bytes. A stage
that raises is a temporary failure (Z) naming the stage: an unscanned or unsigned message is
never let through by accident.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from qmqpd.config import SETTINGS, Config, ConfigError, problem
from qmqpd.filters.base import Stage, Verdict
from qmqpd.message import Message, Record, Reply

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


_STAGE_MODULES = ("qmqpd.filters.virus", "qmqpd.filters.dk", "qmqpd.filters.dkim")


def _factories() -> list[StageFactory]:
    factories: list[StageFactory] = []
    factories.append(_when_set("qmqpd.filters.virus", "QHPSI"))
    factories.append(_when_set("qmqpd.filters.dk", "DKSIGN", "DKVERIFY"))
    factories.append(_when_set("qmqpd.filters.dkim", "DKIMSIGN", "DKIMSIGNEXTRA", "DKIMVERIFY"))
    return factories


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
    stages = []
    for factory in _factories():
        stage = factory(config)
        if stage is not None:
            stages.append(stage)
    return stages


def checked_stages(config: Config) -> tuple[list[Stage], list[ConfigError]]:
    """The stages, built once, and every reason they could not sign or verify: bad
    options, and key files named without `%` that are missing, unreadable or unparsable.
    Loading the keys here also leaves them parsed in this process (keys' cache)."""
    try:
        stages = build_stages(config)
    except ConfigError as error:
        return [], [_named(config, error)]
    found: list[ConfigError] = []
    for stage in stages:
        for setting, pattern, rsa_only in _key_patterns(stage, config):
            reason = _key_problem(pattern, config.controldir, rsa_only)
            if reason is not None:
                found.append(problem(setting, config.source(setting), reason))
    return stages, found


def _named(config: Config, error: ConfigError) -> ConfigError:
    """A stage's option error (`DKIMSIGNOPTIONS: ...`) with the setting's source added."""
    if error.setting:
        return error
    name, colon, reason = str(error).partition(":")
    if colon and name in SETTINGS:
        return problem(name, config.source(name), reason.strip())
    return error


def _key_patterns(stage: Stage, config: Config) -> list[tuple[str, str, bool]]:
    """(setting, key path pattern, RSA only) for each key a signing stage will use."""
    if stage.name == "dkim":
        first = "DKIMSIGN" if config.dkimsign else "DKIMKEY"
        return [(first if spec.use_domain_table else "DKIMSIGNEXTRA", spec.pattern, False)
                for spec in getattr(stage, "signs", [])]
    if stage.name == "dk" and getattr(stage, "pattern", None) is not None:
        setting = "DKSIGN" if config.dksign else "DKKEY"
        if "-s" in config.dksignoptions.split():
            setting = "DKSIGNOPTIONS"
        return [(setting, stage.pattern, True)]  # type: ignore[attr-defined]
    return []


def _key_problem(pattern: str, controldir: str, rsa_only: bool) -> str | None:
    """Why the key at pattern cannot sign, or None. A `%` pattern depends on the sender's
    domain (and a missing file then means "do not sign"), so it is checked per message."""
    if "%" in pattern:
        return None
    from qmqpd.filters import keys  # loaded only when a stage signs

    try:
        found = keys.resolve_key(pattern, "", controldir)
        assert found is not None  # without % a missing file raises KeyMissing
        key = keys.load_private_key(found.path)
    except keys.KeyMissing as error:
        return f"key file {error} does not exist"
    except (keys.KeyUnreadable, keys.KeyUnparsable) as error:
        return f"key file {error}"
    if rsa_only and keys.key_kind(key) != "rsa":
        return f"key file {found.path}: DomainKeys needs an RSA key"
    return None


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
