"""tests/mta-guard.sh, the check that keeps tests/install-and-run.sh from installing postfix
over a host's mail system, fed with dpkg-query and `apt-get install -s` output as Debian 12
prints it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

GUARD = Path(__file__).resolve().parents[1] / "mta-guard.sh"

# dpkg-query -W -f='${Package}\t${Status}\t${Provides}\n'
DPKG_CLEAN = """\
bash\tinstall ok installed\t
clamav-daemon\tinstall ok installed\t
libc6\tinstall ok installed\t
mutt\tinstall ok installed\t
ucspi-tcp\tinstall ok installed\t
"""
DPKG_POSTFIX = DPKG_CLEAN + "postfix\tinstall ok installed\tmail-transport-agent\n"
DPKG_REMOVED_EXIM = DPKG_CLEAN + (
    "exim4-daemon-light\tdeinstall ok config-files\tmail-transport-agent\n"
    "nullmailer\tunknown ok not-installed\tmail-transport-agent\n")
# apt-get install -s --no-install-recommends exim4-daemon-light, with postfix installed
APT_REMOVING = """\
NOTE: This is only a simulation!
      apt-get needs root privileges for real execution.
Reading package lists...
The following packages will be REMOVED:
  postfix
The following NEW packages will be installed:
  exim4-base exim4-config exim4-daemon-light libidn12
0 upgraded, 4 newly installed, 1 to remove and 144 not upgraded.
Remv postfix [3.7.11-0+deb12u1]
Inst exim4-config (4.96-15+deb12u11 Debian-Security:12/oldstable-security [all])
Inst exim4-base (4.96-15+deb12u11 Debian-Security:12/oldstable-security [amd64])
Inst libidn12 (1.41-1 Debian:12.15/oldstable [amd64])
Inst exim4-daemon-light (4.96-15+deb12u11 Debian-Security:12/oldstable-security [amd64])
Conf exim4-config (4.96-15+deb12u11 Debian-Security:12/oldstable-security [all])
Conf exim4-base (4.96-15+deb12u11 Debian-Security:12/oldstable-security [amd64])
Conf libidn12 (1.41-1 Debian:12.15/oldstable [amd64])
Conf exim4-daemon-light (4.96-15+deb12u11 Debian-Security:12/oldstable-security [amd64])
"""
APT_ADDING = """\
Reading package lists...
The following NEW packages will be installed:
  mandoc
0 upgraded, 1 newly installed, 0 to remove and 144 not upgraded.
Inst mandoc (1.14.6-1 Debian:12.15/oldstable [amd64])
Conf mandoc (1.14.6-1 Debian:12.15/oldstable [amd64])
"""


def guard(mode: str, given: str) -> tuple[int, list[str]]:
    done = subprocess.run(["bash", str(GUARD), mode], input=given, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.stderr == ""
    return done.returncode, done.stdout.split()


@pytest.mark.parametrize(("package", "status", "provides"), [
    ("exim4-daemon-light", "install ok installed", "mail-transport-agent"),
    ("exim4-daemon-heavy", "install ok installed", "mail-transport-agent, default-mta"),
    ("notqmail", "install ok installed", "mail-transport-agent (= 1.09)"),
    ("indimail", "hold ok installed", "default-mta, mail-transport-agent"),
    ("opensmtpd", "install ok installed", "mail-transport-agent, smtpd"),
    ("nullmailer", "install ok installed", "mail-transport-agent"),
    ("msmtp-mta", "install ok installed", "mail-transport-agent"),
    ("dma", "install ok installed", "mail-transport-agent"),
])
def test_an_installed_mta_is_named_and_refuses_postfix(package: str, status: str,
                                                       provides: str) -> None:
    assert guard("other-mta", DPKG_CLEAN + f"{package}\t{status}\t{provides}\n") == \
        (1, [package])


@pytest.mark.parametrize("given", [DPKG_CLEAN, DPKG_POSTFIX, DPKG_REMOVED_EXIM,
                                   DPKG_CLEAN + "x\tinstall ok installed\t"
                                   "mail-transport-agent-extra, not-a-mail-transport-agent\n"])
def test_no_other_installed_mta_lets_postfix_in(given: str) -> None:
    assert guard("other-mta", given) == (0, [])


def test_a_plan_that_removes_a_package_is_refused_with_its_name() -> None:
    assert guard("removals", APT_REMOVING) == (1, ["postfix"])
    assert guard("removals", APT_ADDING) == (0, [])


def test_a_bad_mode_is_an_error() -> None:
    done = subprocess.run(["bash", str(GUARD), "both"], input="", capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2 and "usage" in done.stderr
