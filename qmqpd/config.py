"""One frozen Config built from one key table.

Every setting has one name: its environment variable (IndiMail's name where one exists) and,
in lower case, its key in the TOML file. Precedence: rule env > envdir (`--envdir`, read
like daemontools' envdir) > process env > config file > built-in default. A setting whose
name a login shell or sudo sets for its own purposes (USER, and GROUP beside it) is never
taken from the process environment. A bad value stops startup naming the key, where it
came from, and what is allowed. Called by cli, service and the plan; touches no sockets.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from qmqpd.errors import TemporaryError


class ConfigError(TemporaryError, ValueError):
    """A setting that cannot be used; the message names key, source and what is allowed.

    `setting` and `source` say which setting and where it came from, when one is known,
    so `qmqpd check` can list problems by setting."""

    def __init__(self, message: str, setting: str = "", source: str = "") -> None:
        super().__init__(message)
        self.setting = setting
        self.source = source


def problem(setting: str, source: str, reason: str) -> ConfigError:
    """The one shape of a validation problem: `NAME (key) from SOURCE: reason`."""
    key = SETTINGS[setting].key if setting in SETTINGS else setting.lower()
    return ConfigError(f"{setting} ({key}) from {source}: {reason}", setting, source)


# Variables a login shell, su or sudo set for their own purposes: a setting of the same
# name is never read from the process environment (a root shell's $USER must not become
# the service's user). GROUP goes with USER.
SHELL_VARIABLES = frozenset({
    "USER", "LOGNAME", "HOME", "PATH", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "MAIL",
    "PWD", "OLDPWD", "SHLVL", "HOSTNAME", "DISPLAY", "EDITOR", "VISUAL", "PAGER", "GROUP",
})
SHELL_PREFIXES = ("LC_", "SUDO_", "XDG_", "SSH_")


def from_shell(name: str) -> bool:
    """True for a name a setting must never take from the process environment."""
    return name in SHELL_VARIABLES or name.startswith(SHELL_PREFIXES)


def ignored_in_environment(environ: Mapping[str, str]) -> list[str]:
    """Setting names present in the process environment and ignored there."""
    return [name for name in SETTINGS if from_shell(name) and name in environ]


TRUE_WORDS = frozenset({"1", "yes", "true", "on"})
FALSE_WORDS = frozenset({"", "0", "no", "false", "off"})


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int):
        if raw in (0, 1):
            return bool(raw)
        raise ValueError
    word = str(raw).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError


def _int_parser(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool):
            raise ValueError
        value = raw if isinstance(raw, int) else int(str(raw).strip(), 10)
        if value < low or (high is not None and value > high):
            raise ValueError
        return value

    return parse


def _str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError
    return raw


def _choice(*words: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        word = str(raw).strip().lower()
        if word not in words:
            raise ValueError
        return word

    return parse


def _list_items(raw: Any) -> list[str]:
    """A TOML list, or text with items separated by commas or blanks; each item stripped."""
    items = raw if isinstance(raw, list) else str(raw).replace(",", " ").split()
    return [str(item).strip() for item in items]


def _address_list(raw: Any) -> tuple[str, ...]:
    """LOCALIP: one or more IP addresses, comma or space separated; `0` = all IPv4."""
    import ipaddress  # only when set: a session's start-up does not load it

    out = ["0.0.0.0" if item == "0" else item for item in _list_items(raw) if item]
    if not out:
        raise ValueError
    for item in out:
        ipaddress.ip_address(item)  # ValueError for 999.1.1.1 or a host name
    return tuple(out)


def _optional_str(raw: Any) -> str | None:
    """Unset (None) differs from set-but-empty: `DKIMVERIFY=""` verifies without rejecting."""
    if raw is None:
        return None
    return _str(raw)


def _letters(allowed: str) -> Callable[[Any], str | None]:
    def parse(raw: Any) -> str | None:
        value = _optional_str(raw)
        if value is not None and any(ch not in allowed for ch in value):
            raise ValueError
        return value

    return parse


def _optional_seconds(raw: Any) -> int | str | None:
    """DKIMEXPIRE: unset (None), empty (no x= tag) or seconds."""
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return raw if raw is None else ""
    return _int_parser(0)(raw)


def _scan_switch(raw: Any) -> bool | None:
    """QHPSI: IndiMail's value is a scanner command line; here any such value (or 1/yes/on)
    switches on the clamd scan. Off (empty, 0, no, off) is None, like unset, so the pipeline
    does not even load the virus stage for such a client."""
    if raw is None or raw is False or (isinstance(raw, int) and raw == 0):
        return None
    if isinstance(raw, int):
        return True
    return None if str(raw).strip().lower() in FALSE_WORDS else True


def _octal_mode(raw: Any) -> str:
    """File permissions as four octal digits (an int is taken as the number itself)."""
    text = format(raw, "04o") if isinstance(raw, int) and not isinstance(raw, bool) else str(raw)
    if not text.isdigit() or any(c not in "01234567" for c in text) or int(text, 8) > 0o777:
        raise ValueError(raw)
    return format(int(text, 8), "04o")


def _host_port(raw: Any) -> str:
    """CLAMD_TCP: empty, or host:port / [v6]:port."""
    from qmqpd.address import split_host_port  # only when set: start-up stays light

    text = _str(raw).strip()
    if text:
        split_host_port(text)
    return text


def _float_parser(low: float, high: float) -> Callable[[Any], float]:
    def parse(raw: Any) -> float:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
        if not low <= value <= high:
            raise ValueError
        return value

    return parse


def _servers(raw: Any) -> tuple[str, ...]:
    """DNS_SERVERS: addresses with an optional port, comma or space separated."""
    from qmqpd.address import split_host_port

    out = []
    for item in _list_items(raw):
        split_host_port(item, 53)
        out.append(item)
    return tuple(out)


def _networks(raw: Any) -> tuple[str, ...]:
    """PROXY_TRUSTED: IP addresses or CIDR prefixes, comma or space separated."""
    import ipaddress  # only when set: a session's start-up does not load it

    out = []
    for item in _list_items(raw):
        if item:
            out.append(str(ipaddress.ip_network(item, strict=False)))
    return tuple(out)


def _listen_address(raw: Any) -> str:
    """METRICS: empty (off), host:port or [v6]:port with a literal IP address."""
    import ipaddress

    from qmqpd.address import split_host_port

    text = _str(raw).strip()
    if not text:
        return ""
    host, _port = split_host_port(text)
    if ipaddress.ip_address(host).version != (6 if text.startswith("[") else 4):
        raise ValueError
    return text


class Setting(NamedTuple):
    name: str
    parse: Callable[[Any], Any]
    default: Any
    allowed: str
    doc: str
    group: str = "core"

    @property
    def key(self) -> str:
        return self.name.lower()


def _s(name: str, parse: Callable[[Any], Any], default: Any, allowed: str, doc: str,
       group: str = "core") -> Setting:
    return Setting(name, parse, default, allowed, doc, group)


# The one table: every setting, each stage's among them (group names them in the docs).
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        _s("LOCALIP", _address_list, ("127.0.0.1",),
           "IP addresses, comma separated; 0 = all IPv4, :: = all",
           "addresses `qmqpd serve` listens on", "master"),
        _s("PORT", _int_parser(0, 65535), 6280, "a port number 0-65535",
           "TCP port to listen on", "master"),
        _s("USER", _str, "", "a user name or uid",
           "drop to this user after binding; read from the config file or the envdir, "
           "never from the process environment (a login shell or sudo sets $USER)", "master"),
        _s("GROUP", _str, "", "a group name or gid, or a comma list of them",
           "drop to this group after binding; like USER, never from the process "
           "environment", "master"),
        _s("ALLOW_ROOT", _parse_bool, False, "1/0, yes/no, on/off; empty = off",
           "started as root with USER unset, `qmqpd serve` and `qmqpd check` refuse "
           "(exit 111) unless this is on: a server that stays root does so on purpose",
           "master"),
        _s("RULES", _str, "", "path of a tcprules cdb (`qmqpd rules compile` makes it)",
           "client access rules; unset = loopback only", "master"),
        _s("MAXDAEMONS", _int_parser(1, 100000), 75, "an integer 1-100000",
           "sessions served at once (tcpserver -c)", "master"),
        _s("MAXPERIP", _int_parser(0, 100000), 25, "an integer 0-100000 (0 = no limit)",
           "sessions at once from one client IP (tcpserver -C); rule MAXPERIP overrides", "master"),
        _s("PREFORK", _int_parser(0, 100000), 4, "an integer 0-100000",
           "idle workers kept ready", "master"),
        _s("MAX_REQUESTS", _int_parser(0), 1000, "an integer >= 0 (0 = never recycle)",
           "sessions a worker serves before it is replaced (with jitter)", "master"),
        _s("SOFT_MEM", _int_parser(0), 0, "bytes, 0 = no cap",
           "address-space cap of each worker (softlimit -m)", "master"),
        _s("SHUTDOWN_TIMEOUT", _int_parser(0, 86400), 30, "seconds 0-86400",
           "on TERM, the whole bound on the drain: sessions in progress may finish until "
           "then (each answer is written after the master has counted it); a worker still "
           "busy at the bound is killed and its client gets no answer, so it retries (no K "
           "was given, nothing is lost); a second TERM ends the drain at once", "master"),
        _s("FIRST_BYTE_TIMEOUT", _int_parser(1, 3600), 10, "seconds 1-3600",
           "how long `qmqpd serve` waits for a new connection's first bytes before it "
           "closes it; then it waits for the whole request, or its first 64 KiB, to be in "
           "the socket under the MIN_RATE rule (a slower sender gets that rule's Z); "
           "until then the connection holds a descriptor and a MAXPERIP slot but no "
           "worker (QMQP clients send at once; idle and slow sockets cost no worker)",
           "master"),
        _s("STATUS_FILE", _str, "/run/qmqpd/status.json", "a path; empty = none",
           "where the master keeps its status for `qmqpd status` (one per server)", "master"),
        _s("PROXY_PROTOCOL", _choice("off", "v1", "v2", "any"), "off", "off, v1, v2 or any",
           "connections start with a PROXY protocol header (HAProxy send-proxy / "
           "send-proxy-v2) naming the real client; a connection without one, or not from "
           "PROXY_TRUSTED, is closed", "master"),
        _s("PROXY_TRUSTED", _networks, (), "IP addresses or CIDR prefixes, comma separated",
           "the load balancers allowed to send a PROXY header; needed when PROXY_PROTOCOL "
           "is on", "master"),
        _s("PROXY_TRUSTED_UNSAFE", _parse_bool, False, "1/0, yes/no, on/off; empty = off",
           "accept a PROXY_TRUSTED that names loopback addresses (any local user can bind "
           "one and send a header naming any client) or prefixes wider than /8 (IPv4) or "
           "/16 (IPv6); without it such a PROXY_TRUSTED refuses the start, a reload and "
           "`qmqpd check`; with it each start and reload logs a warning per entry (a "
           "balancer on this host: PROXY_SOCKET)",
           "master"),
        _s("PROXY_TIMEOUT", _float_parser(3, 60), 3.0, "seconds 3-60",
           "how long the master waits for a whole PROXY header before closing (the "
           "protocol asks for at least 3 s, to cover a TCP retransmission)", "master"),
        # A listener for a local balancer that ordinary local users cannot reach.
        _s("PROXY_SOCKET", _str, "", "a path; empty = none",
           "a unix socket for a load balancer on this host (HAProxy `server ... "
           "unix@PATH send-proxy-v2`): every connection on it must start with a PROXY "
           "header naming the client (v1 or v2, within PROXY_TIMEOUT); who may connect is "
           "decided by the socket's owner, group and mode, not by an address another "
           "local user could borrow", "master"),
        _s("PROXY_SOCKET_USER", _str, "", "a user name or uid; empty = the starting user",
           "owner of PROXY_SOCKET", "master"),
        _s("PROXY_SOCKET_GROUP", _str, "",
           "a group name or gid; empty = PROXY_SOCKET_USER's primary group, or unchanged",
           "group of PROXY_SOCKET: the balancer's group", "master"),
        _s("PROXY_SOCKET_MODE", _octal_mode, "0660", "octal permissions 0000-0777",
           "permissions of PROXY_SOCKET (the owner and the balancer's group connect)",
           "master"),
        _s("METRICS", _listen_address, "", "empty (off), ip:port or [ipv6]:port",
           "serve Prometheus metrics (GET /metrics) on this address, e.g. 127.0.0.1:9628",
           "master"),
        _s("TIMEOUT", _int_parser(1, 86400), 60, "seconds 1-86400",
           "idle timeout of each read and write; under `qmqpd serve` its global value is "
           "also how long a connection whose request is in waits for a free worker "
           "before it is answered Zserver busy: no worker free, try again later (#4.3.0)"),
        _s("SESSION_TIMEOUT", _int_parser(1, 86400), 3600, "seconds 1-86400",
           "hard limit on one whole session; MIN_RATE ends slow transfers long before it"),
        _s("MIN_RATE", _int_parser(0, 1 << 30), 512, "bytes per second, 0 = no minimum",
           "slowest transfer accepted: after RATE_GRACE seconds the client must have sent "
           "MIN_RATE bytes for every further second, else it gets Z and is cut (by the "
           "master while it waits for the request's first 64 KiB, then by the worker, "
           "whose clock starts when it takes the connection), so a request "
           "of L bytes may take RATE_GRACE + L/MIN_RATE seconds, plus one more RATE_GRACE "
           "when it is over 64 KiB (at most SESSION_TIMEOUT); "
           "512 is below a 9600 bit/s GSM data call shared by two sessions, so a working "
           "relay link does not hit it, while a 1 byte/s sender loses its slot after "
           "RATE_GRACE"),
        _s("RATE_GRACE", _int_parser(0, 86400), 20, "seconds 0-86400",
           "time before MIN_RATE applies: covers connection setup, TCP slow start and the "
           "retransmission backoff of a lossy link (1+2+4+8 s after four losses in a row), "
           "and frees a slot held by a 1 byte/s sender after about this long"),
        _s("MAXRECIPIENTS", _int_parser(0), 100_000, "an integer >= 0 (0 = no limit)",
           "recipients in one message; more get D and the rest of the request is read and "
           "dropped; 100000 is far above an SMTP transaction (RFC 5321 asks for 100) and "
           "above the single envelope a list manager such as ezmlm writes for most lists, "
           "while it caps the addresses a worker holds at about 7 MB; raise it in the rule "
           "of a list host with bigger lists"),
        _s("DATABYTES", _int_parser(0), 20_000_000, "bytes, 0 = no limit",
           "largest message accepted"),
        _s("QUEUEDIR", _str, "", "path of one qmail queue",
           "the queue; if unset QUEUE_BASE/queueN are used"),
        _s("QUEUE_BASE", _str, "", "path holding queueN directories",
           "base of the queues qmail-multi style"),
        _s("QUEUE_COUNT", _int_parser(1, 1000), 1, "an integer 1-1000",
           "number of queues under QUEUE_BASE"),
        _s("QUEUE_START", _int_parser(0, 100000), 1, "an integer 0-100000",
           "number of the first queue under QUEUE_BASE"),
        _s("TODO_LAYOUT", _choice("flat", "split"), "flat", "flat or split",
           "todo/ and intd/ flat (qmail) or split like mess/ (IndiMail bigtodo)"),
        _s("SPLIT", _int_parser(1, 10000), 23, "an integer 1-10000", "conf-split of the queue"),
        _s("USE_FSYNC", _parse_bool, True, "1/0, yes/no, on/off; empty = off",
           "fdatasync message and envelope before the commit"),
        _s("USE_SYNCDIR", _parse_bool, True, "1/0, yes/no, on/off; empty = off",
           "also fsync the mess/ and todo/ directories after the links, so K means durable"),
        _s("COMMIT_MODE", _choice("each", "syncfs"), "each", "each or syncfs",
           "how the syncs of USE_FSYNC/USE_SYNCDIR are made; either way K comes only after "
           "mess/N, intd/N and todo/N with their names are on stable storage, and todo/N "
           "is linked only once the files are. each: every message makes its own "
           "fdatasync of both files and fsync of mess/N's directory, then of todo/ "
           "(qmail-queue's order, any POSIX system); concurrent messages share a cache "
           "flush only where the kernel merges them (a journal commit, a flush already "
           "queued). syncfs: concurrent sessions share them — one session at a time runs "
           "syncfs of the queue's filesystem and an fsync of the queue directory for "
           "every session waiting, twice per message (files, then todo/N), so the cache "
           "flushes per message fall as sessions rise; it writes back whatever else is "
           "dirty on that filesystem too, so use it where the queue has a filesystem of "
           "its own; needs Linux 5.8 or later (syncfs reports write-back errors) and every "
           "writer of the queue on this machine"),
        _s("MIN_FREE", _int_parser(0), 0, "bytes, 0 = no check",
           "refuse with Z when the queue filesystem has less free space"),
        _s("QMAILQUEUE", _str, "", "path of a qmail-queue style program, optionally with args",
           "hand messages to this program instead of writing the queue"),
        _s("QUEUE_SCAN_INTERVAL", _float_parser(0, 3600), 5.0, "seconds 0-3600, 0 = off",
           "how old a queue's backlog summary (todo/ and mess/ counts and oldest ages, "
           "kept in lock/qmqpd-backlog) may get before one process rescans the queue; "
           "a scan is also never repeated sooner than 10 times its own duration; 0 = the "
           "server never scans: no backlog limits, no backlog gauges, QUEUE_CHOICE is "
           "random (`qmqpd status` and `qmqpd queue stat` still count when run)",
           "backlog"),
        _s("QUEUE_CHOICE", _choice("least-loaded", "random"), "least-loaded",
           "least-loaded or random",
           "with several queues (QUEUE_COUNT > 1): least-loaded = the queue with the "
           "fewest todo/ entries (near-equal counts are ties, chosen at random), skipping "
           "queues over a QUEUE_MAX_* limit or stuck (QUEUE_STUCK_AGE) while another has "
           "room; random = any queue under the limits (qmail-multi)", "backlog"),
        _s("QUEUE_STUCK_AGE", _int_parser(0, 86400 * 7), 120, "seconds 0-604800, 0 = never avoid",
           "a queue whose oldest todo/ entry is older looks stuck (qmail-send is not taking "
           "its mail): new mail goes to another queue while one has room", "backlog"),
        _s("QUEUE_MAX_TODO", _int_parser(0), 0, "an integer >= 0 (0 = no limit)",
           "answer Zqueue backlog too large, try another server (#4.3.1) while the chosen "
           "queue has more todo/ entries than this (qmail-send is behind); e.g. what its "
           "qmail-send takes in a few minutes", "backlog"),
        _s("QUEUE_MAX_TODO_AGE", _int_parser(0, 86400 * 7), 1800,
           "seconds 0-604800, 0 = no limit",
           "answer Z (as QUEUE_MAX_TODO) while the chosen queue's oldest todo/ entry is "
           "older than this: qmail-send is stopped or stuck", "backlog"),
        _s("QUEUE_MAX_MESSAGES", _int_parser(0), 0, "an integer >= 0 (0 = no limit)",
           "answer Z (as QUEUE_MAX_TODO) while the chosen queue holds more messages "
           "(mess/) than this, e.g. when remote deliveries are slow", "backlog"),
        _s("QUEUE_SOFT_TODO", _int_parser(0), 0, "an integer >= 0 (0 = never delay)",
           "above this many todo/ entries each message waits QUEUE_FLOW_DELAY before it "
           "is read and queued (Postfix's in_flow_delay): fewer messages per worker "
           "while qmail-send catches up", "backlog"),
        _s("QUEUE_FLOW_DELAY", _float_parser(0, 60), 1.0, "seconds 0-60",
           "the wait of each message above QUEUE_SOFT_TODO", "backlog"),
        _s("QHPSI", _scan_switch, None,
           "1/yes/on or a scanner command line = scan; unset, empty, 0, no, off = do not scan",
           "scan each message with clamd; a rule's QHPSI=\"\" turns it off",
           "virus"),
        _s("QHPSIMINSIZE", _int_parser(0), 0, "bytes, 0 = no lower limit",
           "smaller messages are not scanned (logged, X-QHPSI: not scanned)", "virus"),
        _s("QHPSIMAXSIZE", _int_parser(0), 0, "bytes, 0 = no upper limit",
           "larger messages are not scanned (logged, X-QHPSI: not scanned); keep it at or "
           "below clamd's StreamMaxLength, else such messages get Z when streamed (over "
           "CLAMD_TCP, or above 1 MiB)", "virus"),
        _s("REJECTVIRUS", _int_parser(0), 1, "0, 1 or 2 (above 2 = 1)",
           "infected: 1 = reject with D, 0 = queue with X-QHPSI: Virus found, "
           "2 = answer K and discard", "virus"),
        _s("VIRUSFORWARD", _str, "", "an address; empty = none",
           "infected mail goes to this address only (before REJECTVIRUS), the original "
           "recipients listed in X-Quarantine-ID", "virus"),
        _s("CLAMD_SOCKET", _str, "/run/clamav/clamd.ctl", "path of clamd's LocalSocket",
           "clamd's unix socket (used when CLAMD_TCP is empty)", "virus"),
        _s("CLAMD_TCP", _host_port, "", "host:port or [v6]:port; empty = use CLAMD_SOCKET",
           "clamd's TCPSocket", "virus"),
        _s("CLAMD_TIMEOUT", _float_parser(0.1, 3600), 30.0, "seconds 0.1-3600",
           "limit on one whole scan (connect, stream, answer); past it the answer is Z",
           "virus"),
        _s("QHPSI_PASS_ON_ERROR", _parse_bool, False, "1/0, yes/no, on/off; empty = off",
           "when clamd is down, hung or errs, queue the message unscanned with a warning "
           "(X-QHPSI: not scanned) instead of answering Z; for sites that prefer mail "
           "flow to scanning", "virus"),
        _s("CONTROLDIR", _str, "/etc/qmqpd", "a directory",
           "base of relative key paths and of the dkimkeys file", "signing"),
        _s("DKIMSIGN", _optional_str, None, "unset, empty (= DKIMKEY) or a key path; % = domain",
           "sign with DKIM using this private key; selector = file name", "signing"),
        _s("DKIMKEY", _str, "domainkeys/%/default", "a key path; % = domain",
           "key path used when DKIMSIGN is set but empty", "signing"),
        _s("DKIMKEYS", _str, "dkimkeys", "a path (relative = under CONTROLDIR); empty = none",
           "file of domain:keypath lines overriding DKIMSIGN per domain", "signing"),
        _s("DKIMSIGNOPTIONS", _str, "", "-c r|s|t|u -l -q -t -i identity -x secs|- -z 1|2|3|4",
           "DKIM signing options as qmail-dkim takes them; q= and t= are always written, "
           "so -q and -t change nothing", "signing"),
        _s("DKIMSIGNEXTRA", _optional_str, None, "unset or a key path; % = domain",
           "a second DKIM signature with this key (e.g. Ed25519 beside RSA)", "signing"),
        _s("DKIMSIGNOPTIONSEXTRA", _str, "", "as DKIMSIGNOPTIONS",
           "signing options of the second signature", "signing"),
        _s("DKIMEXPIRE", _optional_seconds, None, "unset, empty (no x=) or seconds",
           "x= = signing time + this; unset = -x of DKIMSIGNOPTIONS or 604800", "signing"),
        _s("EXCLUDE_DKIMSIGN", _str, "", "header names, colon separated (prefix match)",
           "headers left out of DKIM signatures", "signing"),
        _s("DKIMVERIFY", _letters("ABCDEFGHIJKLMNOPQRSTUVWXYabcdefghijklmnopqrstuvwxy"), None,
           "unset, or result letters A-Y (upper = D, lower = Z)",
           "verify DKIM signatures, add Authentication-Results, reject listed results",
           "signing"),
        _s("DKSIGN", _optional_str, None, "unset, empty (= DKKEY) or a key path; % = domain",
           "sign with DomainKeys (RFC 4870) using this RSA key", "signing"),
        _s("DKKEY", _str, "domainkeys/%/default", "a key path; % = domain",
           "key path used when DKSIGN is set but empty", "signing"),
        _s("DKSIGNOPTIONS", _str, "", "-c nofws|simple -h -b N -s keyfile",
           "DomainKeys signing options as qmail-dk takes them; -b is accepted and "
           "changes nothing", "signing"),
        _s("DKVERIFY", _letters("ABCDEFGHIJKLMabcdefghijklm"), None,
           "unset, or result letters A-M (upper = D, lower = Z)",
           "verify DomainKey signatures, add Authentication-Results, reject listed results",
           "signing"),
        _s("DNS_SERVERS", _servers, (), "addresses[:port], comma separated; empty = resolv.conf",
           "name servers asked for DKIM/DomainKeys public keys", "signing"),
        _s("DNS_TIMEOUT", _float_parser(0.1, 60), 3.0, "seconds 0.1-60",
           "limit on one public key lookup; a timeout is a temporary result", "signing"),
        _s("DKIMVERIFY_MAX_SIGNATURES", _int_parser(1, 1000), 5, "a count, 1-1000",
           "DKIMVERIFY checks at most this many DKIM-Signature fields (the topmost); the "
           "others are not looked at (logged as dkim_unchecked)", "signing"),
        _s("DKIMVERIFY_TIMEOUT", _float_parser(0.1, 600), 6.0, "seconds 0.1-600",
           "limit on all public key lookups of one message together; a signature whose "
           "lookup has no time left is a temporary result (P)", "signing"),
    )
}


class Config:
    """Frozen settings: attribute per key (lower case), plus where each value came from."""

    __slots__ = ("__dict__", "_sources", "_values")

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_sources", dict(sources))
        # Each setting also as a plain attribute under its lower-case name, so reading one
        # (the master does per connection) is a dict lookup, not a call of __getattr__.
        # Names the class itself uses (methods) are left to __getattr__, as before.
        self.__dict__.update((name.lower(), value) for name, value in self._values.items()
                             if not hasattr(Config, name.lower()))

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key.upper()]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("Config is frozen")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def source(self, name: str) -> str:
        return self._sources.get(name, "default")

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def overlay(self, env: Mapping[str, str | None], source: str) -> Config:
        """Settings overridden by env (a rule's env): known names only, None = unset."""
        values = dict(self._values)
        sources = dict(self._sources)
        for name, raw in env.items():
            setting = SETTINGS.get(name)
            if setting is None:
                continue
            if raw is None:
                values[name] = setting.default
                sources[name] = "default"
            else:
                values[name] = _parse(setting, raw, source)
                sources[name] = source
        return Config(values, sources)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._values == other._values

    __hash__ = None  # type: ignore[assignment]


def _parse(setting: Setting, raw: Any, source: str) -> Any:
    try:
        return setting.parse(raw)
    except (ValueError, TypeError):
        raise problem(setting.name, source,
                      f"bad value {raw!r}; allowed: {setting.allowed}") from None


def read_file(path: str) -> dict[str, Any]:
    """A TOML config file: flat keys in lower case, each a known setting."""
    import tomllib  # only with --config: `qmqpd session` from an envdir never pays for it

    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.upper()
        if name not in SETTINGS or key != key.lower():
            raise ConfigError(
                f"config file {path}: unknown key {key!r}; allowed keys: "
                + ", ".join(s.key for s in SETTINGS.values())
            )
        out[name] = value
    return out


# One envdir entry: the value (None = the file is empty: unset) and its source label.
EnvdirEntry = tuple["str | None", str]


def read_envdir(path: str) -> dict[str, EnvdirEntry]:
    """A directory read as daemontools' envdir reads it: each file's name is a variable,
    its first line the value (NULs become newlines, trailing blanks and tabs dropped);
    an empty file unsets the variable; names starting with a dot are skipped. Only names
    of settings are kept; each carries `envdir DIR/NAME` as its source."""
    where = os.path.abspath(path)
    try:
        names = sorted(os.listdir(where))
    except OSError as exc:
        raise ConfigError(f"envdir {where}: cannot read: {exc.strerror}") from None
    out: dict[str, EnvdirEntry] = {}
    for name in names:
        if name.startswith(".") or name not in SETTINGS:
            continue
        file = os.path.join(where, name)
        try:
            with open(file, "rb") as handle:
                data = handle.read(1 << 16)
        except IsADirectoryError:
            continue
        except OSError as exc:
            raise problem(name, f"envdir {file}", f"cannot read: {exc.strerror}") from None
        if not data:
            out[name] = (None, f"envdir {file}")
            continue
        line = data.split(b"\n", 1)[0].replace(b"\0", b"\n").rstrip(b" \t")
        out[name] = (line.decode("utf-8", "surrogateescape"), f"envdir {file}")
    return out


def load(config_file: str | None = None, environ: Mapping[str, str] | None = None,
         defaults: Mapping[str, Any] | None = None,
         envdir: str | Mapping[str, EnvdirEntry] | None = None) -> Config:
    """Built-in defaults, then `defaults` (an embedded profile), the file, the process
    environment (never for USER/GROUP: see SHELL_VARIABLES), then the envdir (a path, or
    entries as read_envdir returns them): an empty envdir file unsets the variable."""
    values: dict[str, Any] = {name: s.default for name, s in SETTINGS.items()}
    sources: dict[str, str] = {}
    entries = read_envdir(envdir) if isinstance(envdir, str) else dict(envdir or {})
    process = {k: v for k, v in (environ or {}).items()
               if k in SETTINGS and not from_shell(k)
               and not (k in entries and entries[k][0] is None)}
    layers: list[tuple[Mapping[str, Any], str | None]] = []
    if defaults:
        layers.append((defaults, "embedded defaults"))
    if config_file:
        layers.append((read_file(config_file), f"config file {config_file}"))
    layers.append((process, "environment"))
    layers.append(({k: v for k, (v, _src) in entries.items() if v is not None}, None))
    for layer, label in layers:
        for name, raw in layer.items():
            source = label or entries[name][1]
            values[name] = _parse(SETTINGS[name], raw, source)
            sources[name] = source
    return Config(values, sources)


def _toml_value(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):  # a float as TOML writes it (3.0), not as a string
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def sample_toml() -> str:
    """A commented config file listing every setting with its default (conf/qmqpd.toml)."""
    lines = [
        "# qmqpd configuration (TOML). Every key is a setting name in lower case; the same",
        "# setting can come from an envdir (--envdir) or the environment under its upper-case",
        "# name (USER and GROUP: never from the process environment). Precedence: rule env >",
        "# envdir > process env > this file > built-in default. Uncomment to change.",
    ]
    for group, settings in _by_group():
        lines += ["", f"# --- {group} ---"]
        for setting in settings:
            lines.append(f"# {setting.doc} ({setting.allowed})")
            lines.append(f"#{setting.key} = {_toml_value(setting.default)}")
    return "\n".join(lines) + "\n"


def settings_markdown() -> str:
    """docs/settings.md: every setting once, from the key table (a test keeps them equal)."""
    lines = [
        "# Settings",
        "",
        "Generated by `qmqpd config --markdown` from the one key table in `qmqpd/config.py`;",
        "a test fails when this file and the table disagree. Environment variable = the name;",
        "TOML key (`--config`) = the name in lower case. A tcprules rule sets MAXPERIP and the",
        "session settings (all but the master group) for one client",
        "(`10.1.2.:allow,NAME=\"value\"`). Precedence: rule env > envdir (`--envdir DIR`, one",
        "file per setting, read like daemontools' envdir at start and on every HUP) >",
        "process env > config file > default. USER and GROUP are never read from the process",
        "environment (a login shell or sudo sets `$USER`): put them in the config file or the",
        "envdir; `qmqpd config` and `qmqpd check` say when the environment has them.",
    ]
    for group, settings in _by_group():
        lines += ["", f"## {group}", "", "| name | default | allowed | what it does |",
                  "| --- | --- | --- | --- |"]
        for setting in settings:
            default = _toml_value(setting.default)
            cells = [f"`{setting.name}`", f"`{default}`", setting.allowed, setting.doc]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _by_group() -> Iterator[tuple[str, Iterator[Setting]]]:
    """The key table's settings in table order, a run per group (both generated docs)."""
    import itertools

    return itertools.groupby(SETTINGS.values(), key=lambda setting: setting.group)
