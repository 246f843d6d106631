"""The decision for a new connection: PROXY policy, rules, MAXPERIP.

Owns: the PROXY policy (which peers may send a header), the one watcher of the rules
file (the cdb is stat-ed at most once per loop turn however many clients arrive, and the
master replans from the same watcher), each rule's merged settings, and the decision:
`Deny` (close, nothing sent), `Refuse` (Z over MAXPERIP) or `Admit` with the client's
facts and a `Lease` from the ledger.
Called by: the master, once per accepted connection (and again once its PROXY header
names the real client), and once per turn (`rules.new_turn`, `replan_if_changed`).
Never touches: a socket (the master passes the addresses), workers or the lobby. Each
decision is logged here, where it is made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from qmqpd import log, proxy
from qmqpd.config import Config, ConfigError
from qmqpd.limits import Lease, Ledger, fold_ip
from qmqpd.message import Client, Reply
from qmqpd.rules import Rule, RuleTable

# How often the rules file is looked at when no client arrives (for the planner).
RULES_CHECK_INTERVAL = 1.0
# Rule envs whose limits are remembered at once (a bound against a huge rules file).
RULE_LIMITS_CACHE = 4096
# A rule's MAXPERIP, MIN_RATE and RATE_GRACE, as the master applies them.
RuleLimits = tuple[int, int, float]


class Plans(Protocol):
    """The validated session plans of one configuration (qmqpd.plan.PlanBook)."""

    def settings(self, env: Mapping[str, str | None]) -> Config: ...


@dataclass(frozen=True)
class ProxyReject:
    ip: str
    reason: str
    result = "proxy_rejected"  # the status.CONNECTIONS counter of a turned-away client


@dataclass(frozen=True)
class AwaitHeader:
    reader: proxy.HeaderReader
    timeout: float


@dataclass(frozen=True)
class Deny:
    ip: str
    rule: str | None
    reason: str
    result = "denied"


@dataclass(frozen=True)
class Refuse:
    ip: str
    answer: str
    result = "refused_perip"


@dataclass(frozen=True)
class Admit:
    lease: Lease
    client: Client
    min_rate: int
    grace: float


Decision = ProxyReject | AwaitHeader | Deny | Refuse | Admit


class RulesWatcher:
    """The rules cdb, stat-ed at most once per loop turn (and about once a second when no
    client comes), so lookups and the planner see one and the same file."""

    def __init__(self, path: str | None,
                 report: Callable[[str], None] | None = None) -> None:
        self.table = RuleTable(path, report=report)
        self.checked = True  # just opened
        self.next_check = 0.0
        self.replaced = False

    def new_turn(self) -> None:
        self.checked = False

    def _check(self) -> None:
        if not self.checked:
            self.checked = True
            self.replaced |= self.table.refresh()

    def lookup(self, ip: str) -> Rule:
        self._check()
        try:
            return self.table.lookup(ip, refresh=False)
        except Exception as error:  # an unreadable cdb drops the client, as tcpserver does
            return Rule(False, {}, None, f"rules lookup failed: {error}")

    def changed(self, now: float) -> bool:
        """True once after the file was replaced (for replanning)."""
        if now >= self.next_check:
            self.next_check = now + RULES_CHECK_INTERVAL
            self._check()
        replaced, self.replaced = self.replaced, False
        return replaced

    def close(self) -> None:
        self.table.close()


def open_rules(cfg: Config) -> RulesWatcher:
    if not cfg.rules:
        log.warning("RULES is not set: every client but loopback is denied", setting="RULES")
        return RulesWatcher(None)
    return RulesWatcher(cfg.rules, report=lambda reason: log.error(
        "rules unusable; denying clients", rules=cfg.rules, reason=reason))


def proxy_policy(config: Config) -> proxy.Policy:
    """The PROXY policy, its risks logged: at each start (before binding, so every start
    warning is out once the server listens) and each reload, loud every time.
    ValueError: refuse the start or the reload."""
    policy = proxy.Policy.from_config(config)
    for warning in policy.warnings():
        log.warning(warning, setting="PROXY_TRUSTED_UNSAFE")
    return policy


class Admission:
    def __init__(self, config: Config, plans: Plans, ledger: Ledger, hostname: str,
                 policy: proxy.Policy | None = None) -> None:
        """config's decisions: its PROXY policy (made and logged here unless the caller
        made it earlier, as a start does before it binds; ValueError when unusable), its
        rules file opened, plans' settings per rule; leases from ledger."""
        self.config = config
        self.plans = plans
        self.policy = proxy_policy(config) if policy is None else policy
        self.rules = open_rules(config)
        self.ledger = ledger
        self.hostname = hostname
        self.unusable_rules: set[str | None] = set()
        # (MAXPERIP, MIN_RATE, RATE_GRACE) per rule env, read from its plan once rather
        # than through Config attributes on every connection; dropped with the plans.
        self._limits: dict[tuple[tuple[str, str | None], ...], RuleLimits] = {}

    def replan_if_changed(self, now: float, planner: Callable[[Config], Plans]) -> None:
        """A replaced rules cdb is planned again: every rule env checked (a bad one is one
        log line, and the running plans stay), the plans kept for workers forked from now
        on. Running workers plan a rule env new to them on its first client."""
        if not self.rules.changed(now):
            return
        try:
            plans = planner(self.config)
        except Exception as error:
            log.error("rules changed: the new allow/deny rules are in force; clients of a "
                      "rule whose settings cannot be used get Z, the others keep their "
                      "running settings", rules=self.config.rules, error=str(error))
            return
        self.plans = plans
        self.unusable_rules.clear()
        self._limits.clear()
        log.event("replan", reason="rules changed", rules=self.config.rules)

    def decide(self, peer: tuple, local: tuple | None, balancer: bool = False) -> Decision:
        """peer: the client (from the socket, or from its PROXY header); local: the
        address it connected to, None for a fresh connection (its header may come first);
        balancer: it came through PROXY_SOCKET, whose permissions are the trust, and must
        start with a header whatever PROXY_PROTOCOL says."""
        if local is None and balancer:
            reader = (self.policy.reader() if self.policy.enabled
                      else proxy.HeaderReader("any"))
            return AwaitHeader(reader, self.policy.timeout)
        if local is None and self.policy.enabled:
            try:
                self.policy.check_source(str(peer[0]))
            except proxy.ProxyError as error:
                log.event("proxy_reject", ip=str(peer[0]), reason=str(error))
                return ProxyReject(str(peer[0]), str(error))
            return AwaitHeader(self.policy.reader(), self.policy.timeout)
        ip = fold_ip(str(peer[0]))
        rule = self.rules.lookup(ip)
        if not rule.allow:
            log.event("deny", ip=ip, rule=rule.key, reason=rule.reason or None)
            return Deny(ip, rule.key, rule.reason)
        limit, min_rate, grace = self._rule_limits(rule)
        lease = self.ledger.admit(ip, limit)
        if lease is None:
            answer = Reply.named("too_many_per_ip").line
            log.event("perip_limit", ip=ip, count=self.ledger.per_ip.count(ip), maxperip=limit,
                      answer=answer)
            return Refuse(ip, answer)
        local = local or ("", 0)
        client = Client(remote_ip=ip, remote_port=str(peer[1]),
                        local_ip=fold_ip(str(local[0])), local_port=str(local[1]),
                        local_host=self.hostname, proto="TCP6" if ":" in ip else "TCP",
                        rule_env=dict(rule.env))
        return Admit(lease, client, min_rate, grace)

    def client_of(self, header: proxy.ProxyHeader, peer: tuple[str, int]) -> tuple[str, int]:
        return self.policy.client_of(header, peer)

    def _rule_limits(self, rule: Rule) -> RuleLimits:
        """MAXPERIP, MIN_RATE and RATE_GRACE of the rule's settings, remembered per env."""
        env = tuple(rule.env.items())
        limits = self._limits.get(env)
        if limits is None:
            settings, usable = self._rule_settings(rule)
            limits = (int(settings.maxperip), int(settings.min_rate),
                      float(settings.rate_grace))
            if usable:  # an unusable env goes back to the plans (and its warning) each time
                if len(self._limits) >= RULE_LIMITS_CACHE:
                    self._limits.clear()
                self._limits[env] = limits
        return limits

    def _rule_settings(self, rule: Rule) -> tuple[Config, bool]:
        """The rule's validated settings (rule env over the global), as its worker applies
        them: MAXPERIP here, MIN_RATE and RATE_GRACE in the lobby."""
        try:
            return self.plans.settings(rule.env), True
        except ConfigError as error:  # only a rule added after the last planning
            if rule.key not in self.unusable_rules:  # once per rule, not per connection
                self.unusable_rules.add(rule.key)
                log.warning("rule settings unusable; using the global ones",
                            rule=rule.key, error=str(error))
            return self.config, False
