"""Reading addresses: a client's IP in one form, and `host:port` / `[v6]:port` settings.

Owns the two parsers every address goes through: `parse_ip` (scope dropped, v4-mapped
IPv6 as the IPv4 it is, so a dual-stack socket's `::ffff:a.b.c.d` counts, matches rules
and is trusted as a.b.c.d) and `split_host_port` (the one syntax of CLAMD_TCP, METRICS,
DNS_SERVERS and qmqpservers lines; the metrics endpoint splits its checked METRICS
itself, taking port 0 too, which tests use). Called by rules, limits, proxy, config,
preflight, qmqpc and the filter stages. Stdlib only, importing nothing of the project
(config, a shared leaf, uses it); it never resolves a name or opens a socket.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """The address in text (a `%scope` dropped), v4-mapped IPv6 as IPv4; None if not an IP."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, and with a default port also `host`, `[v6]` and a bare
    IPv6 address -> (host without brackets, port). ValueError for anything else: an empty
    host, brackets or several colons around something that is not IPv6, a port that is not
    1-65535 in ASCII digits, or no port and no default."""
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not _is_ipv6(host) or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}: [...] must hold an IPv6 address")
        if rest:
            port_text = rest[1:]
    elif text.count(":") > 1:
        if not _is_ipv6(text):
            raise ValueError(f"bad IPv6 address {text!r}")
        host = text
    else:
        host, colon, after = text.partition(":")
        if colon:
            port_text = after
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"bad address {text!r}: no port")
        return host, default_port
    if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)
