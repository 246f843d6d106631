"""Admission applies each rule's MAXPERIP, MIN_RATE and RATE_GRACE, remembered per rule
env: a real rules cdb, real plans and a real ledger; the limits follow a replaced rules
file and replaced plans, and an unusable rule env falls back to the global settings on
every connection."""

from __future__ import annotations

import os
from pathlib import Path

from qmqpd import config, rules
from qmqpd.admission import Admission, Admit, Refuse
from qmqpd.config import Config
from qmqpd.limits import Ledger
from qmqpd.plan import PlanBook

LOCAL = ("127.0.0.1", 628)


def compile_rules(tmp: Path, text: str) -> str:
    """Compile text into tmp/tcp.qmqp.cdb by rename, as tcprules replaces it."""
    source = tmp / "new.qmqp"
    source.write_text(text)
    rules.compile_rules(str(source), str(tmp / "new.cdb"))
    os.rename(tmp / "new.cdb", tmp / "tcp.qmqp.cdb")
    return str(tmp / "tcp.qmqp.cdb")


def make_admission(tmp: Path, text: str, **extra: str) -> tuple[Admission, Config]:
    env = {"MAXPERIP": "2", "MIN_RATE": "100", "RATE_GRACE": "5",
           "RULES": compile_rules(tmp, text), **extra}
    cfg = config.load(None, environ=env)
    gate = Admission(cfg, PlanBook(cfg), Ledger(50), "host.example")
    return gate, cfg


def admit(gate: Admission, ip: str) -> Admit | Refuse:
    decision = gate.decide((ip, 4000), LOCAL)
    assert isinstance(decision, Admit | Refuse), decision
    return decision


def admitted_until_refused(gate: Admission, ip: str) -> int:
    for count in range(10):
        if isinstance(admit(gate, ip), Refuse):
            return count
    raise AssertionError("never refused")


def test_each_rule_env_gets_its_own_limits(tmp_path):
    gate, _ = make_admission(tmp_path, '127.0.0.3:allow,MAXPERIP="1",MIN_RATE="7"\n'
                             '127.0.0.4:allow,RATE_GRACE="3"\n:allow\n')
    first = admit(gate, "127.0.0.3")
    assert isinstance(first, Admit)
    assert (first.min_rate, first.grace) == (7, 5.0)
    assert first.client.rule_env == {"MAXPERIP": "1", "MIN_RATE": "7"}
    assert isinstance(admit(gate, "127.0.0.3"), Refuse)
    other = admit(gate, "127.0.0.4")
    assert isinstance(other, Admit)
    assert (other.min_rate, other.grace) == (100, 3.0)
    assert admitted_until_refused(gate, "127.0.0.4") == 1  # the global MAXPERIP 2
    assert admitted_until_refused(gate, "127.0.0.5") == 2


def test_limits_follow_a_replaced_rules_file_and_new_plans(tmp_path):
    gate, cfg = make_admission(tmp_path, '127.0.0.3:allow,MAXPERIP="1"\n:allow\n')
    assert admitted_until_refused(gate, "127.0.0.3") == 1
    assert admitted_until_refused(gate, "127.0.0.6") == 2
    compile_rules(tmp_path, '127.0.0.3:allow,MAXPERIP="3"\n:allow\n')
    tighter = config.load(None, environ={"MAXPERIP": "1", "MIN_RATE": "9",
                                         "RULES": cfg.rules})
    gate.rules.new_turn()  # the master's next loop turn looks at the file again
    gate.replan_if_changed(1e12, lambda _cfg: PlanBook(tighter))
    assert admitted_until_refused(gate, "127.0.0.3") == 2  # 3, one already held
    # the empty rule env again (as for 127.0.0.6), under the new plans' global settings
    decision = admit(gate, "127.0.0.7")
    assert isinstance(decision, Admit) and decision.min_rate == 9
    assert isinstance(admit(gate, "127.0.0.7"), Refuse)


def test_an_unusable_rule_env_uses_the_global_limits_each_time(tmp_path, events):
    gate, _ = make_admission(tmp_path, '127.0.0.3:allow,MAXPERIP="lots"\n:allow\n')
    for _ in range(2):
        decision = admit(gate, "127.0.0.3")
        assert isinstance(decision, Admit)
        assert (decision.min_rate, decision.grace) == (100, 5.0)
    assert isinstance(admit(gate, "127.0.0.3"), Refuse)
    assert events.getvalue().count("rule settings unusable") == 1  # once per rule
