"""The session plan: what a session needs, made and validated once, not per message.

A plan is the merged settings of one rule env (config overlaid with the rule's variables),
where its messages go (the QMAILQUEUE program or the native queue writers) and its filter
stages with their keys loaded. `qmqpd serve` makes one plan per distinct rule env of the
rules cdb at start, on HUP and when the cdb changes, in the master before it forks, so the
workers share them; a worker looks its plan up by the rule env of each handoff. Every
problem found on the way is a ConfigError naming the setting, where it came from and why:
the same list `qmqpd check` prints, a refused start shows, and a refused reload logs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

from qmqpd.config import SETTINGS, Config, ConfigError, problem
from qmqpd.filters import pipeline
from qmqpd.injector import Route, Writer, check_config

if TYPE_CHECKING:
    from qmqpd.filters.base import Stage

RuleEnv = Mapping[str, "str | None"]
EnvKey = tuple[tuple[str, "str | None"], ...]


def env_key(env: RuleEnv) -> EnvKey:
    """What makes two rule envs plan alike: their settings (other variables only reach a
    QMAILQUEUE program's environment, per client)."""
    return tuple(sorted((name, value) for name, value in env.items() if name in SETTINGS))


class SessionPlan(NamedTuple):
    config: Config  # the merged settings: rule env over process env over file over default
    route: Route
    stages: tuple[Stage, ...]


class PlanError(ConfigError):
    """One or more problems; the message lists them all, the first names the setting."""

    def __init__(self, problems: list[ConfigError]) -> None:
        super().__init__("; ".join(str(p) for p in problems), problems[0].setting,
                         problems[0].source)
        self.problems = problems


def make_plan(config: Config, writer: Writer) -> tuple[SessionPlan | None, list[ConfigError]]:
    """The plan for these merged settings, or None and every reason it cannot work."""
    problems = check_config(config, writer)
    stages, stage_problems = pipeline.checked_stages(config)
    problems += stage_problems
    if problems:
        return None, problems
    return SessionPlan(config, Route.from_config(config), tuple(stages)), []


class PlanBook:
    """The plans of one configuration: the base plan and one per distinct rule env.

    A rule env not planned ahead (a cdb replaced after planning) gets its plan made on
    first use, validated the same way, and kept; so does the reason when it fails.
    """

    def __init__(self, config: Config, writer: Writer | None = None,
                 plans: Mapping[EnvKey, SessionPlan] | None = None) -> None:
        self.config = config
        self.writer = writer or Writer.current()
        self._plans: dict[EnvKey, SessionPlan] = dict(plans or {})
        self._failed: dict[EnvKey, PlanError] = {}
        self.warnings: list[str] = []  # what may fail later; serve logs, check prints

    def __len__(self) -> int:
        return len(self._plans)

    def for_env(self, env: RuleEnv) -> SessionPlan:
        """The plan of a client's rule env; raises PlanError when it cannot be made."""
        key = env_key(env)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if key in self._failed:
            raise self._failed[key]
        config = self.config.overlay(dict(key), "rule env") if key else self.config
        plan, problems = make_plan(config, self.writer)
        if plan is None:
            self._failed[key] = PlanError(problems)
            raise self._failed[key]
        self._plans[key] = plan
        return plan

    def settings(self, env: RuleEnv) -> Config:
        """A rule env's merged settings (what the master needs: MAXPERIP), without making
        a plan for an env it has not seen; raises ConfigError for a bad value."""
        key = env_key(env)
        plan = self._plans.get(key)
        if plan is not None:
            return plan.config
        return self.config.overlay(dict(key), "rule env") if key else self.config


def check_all(config: Config, rule_envs: Iterable[tuple[str, RuleEnv]], writer: Writer,
              rules: str = "") -> tuple[PlanBook, list[ConfigError]]:
    """Plan the base settings and every rule env; the book and every problem found
    (each once, in the order found). Beyond what a plan needs, each distinct setting is
    checked against what it would meet: MIN_FREE against the queue's filesystem, every
    key under a `%` path, clamd (a warning: the operator may start it later), kept in
    the book's `warnings`."""
    plans: dict[EnvKey, SessionPlan] = {}
    problems: dict[str, ConfigError] = {}
    warnings: dict[str, None] = {}
    todo: list[tuple[str, RuleEnv]] = [("", {})]
    todo += list(rule_envs)
    for rule_key, env in todo:
        key = env_key(env)
        if key in plans:
            continue
        try:
            merged = config.overlay(dict(key), f"rule {rule_key} in {rules}") if key else config
        except ConfigError as error:
            problems.setdefault(str(error), error)
            continue
        plan, found = make_plan(merged, writer)
        found += _min_free_problems(merged)
        if plan is not None:
            warnings.update(dict.fromkeys(_clamd_warnings(merged)))
        for error in found:
            problems.setdefault(str(error), error)
        if plan is not None and not found:
            plans[key] = plan
    book = PlanBook(config, writer, plans)
    book.warnings = list(warnings)
    return book, list(problems.values())


def _min_free_problems(config: Config) -> list[ConfigError]:
    """MIN_FREE above a queue filesystem's whole size: every message would get Z."""
    if not config.min_free or config.qmailqueue.strip():
        return []
    from qmqpd.injector import queue_paths

    found = []
    for path in queue_paths(config):
        try:
            info = os.statvfs(path)
        except OSError:
            continue  # a missing queue is reported by the queue check
        total = info.f_blocks * info.f_frsize
        if config.min_free > total:
            found.append(problem("MIN_FREE", config.source("MIN_FREE"),
                                 f"{config.min_free} bytes, but the filesystem of {path} "
                                 f"holds {total} bytes in all: every message would get Z"))
    return found


def _clamd_warnings(config: Config) -> list[str]:
    """QHPSI on and clamd not answering PING: every message gets Z until it answers."""
    if not config.qhpsi:
        return []
    from qmqpd.filters import virus  # the stage's own clamd client, only with QHPSI on

    target = config.clamd_tcp or config.clamd_socket
    reason = virus.scanner_for(config).ping(min(config.clamd_timeout, 3.0))
    if reason is None:
        return []
    return [f"QHPSI (qhpsi) from {config.source('QHPSI')}: clamd at {target} does not answer "
            f"({reason}); every message gets Z until it does"
            + ("" if not config.qhpsi_pass_on_error else
               " (QHPSI_PASS_ON_ERROR: queued unscanned instead)")]
