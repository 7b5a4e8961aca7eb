"""Address policy for outgoing fetches: only public addresses may be reached (SSRF defence)."""

from __future__ import annotations

import ipaddress
import re
import socket

from gralora.errors import DatasetRefused, DatasetUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges that Python's own flags (is_private, is_global...) let through on some versions but that
# never lead to the public internet, or that answer for the cloud host itself.
_REFUSED_V4_NETWORKS = tuple(ipaddress.IPv4Network(net) for net in (
    "0.0.0.0/8",  # "this network"
    "100.64.0.0/10",  # carrier-grade NAT; also Alibaba's metadata 100.100.100.200
    "192.0.0.0/24",  # IETF protocol assignments (Oracle metadata 192.0.0.192)
    "224.0.0.0/4",  # multicast: is_global is True for it on Python 3.11
    "240.0.0.0/4",  # reserved, and 255.255.255.255
))
_METADATA_ADDRESSES = frozenset(ipaddress.ip_address(addr) for addr in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack instance metadata
    "168.63.129.16",  # Azure WireServer: a public-looking address that serves the host
    "fd00:ec2::254",  # AWS metadata over IPv6
))
_NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")

# One label of a numeric IPv4 spelling as inet_aton reads it: decimal, 0x-hex or 0-octal.
_NUMERIC_LABEL = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


def is_public_address(ip: str | IPAddress) -> bool:
    """True when `ip` is a globally reachable unicast address that is not a cloud metadata host."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return False  # a zone only makes sense for link-local addresses
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            # An address that tunnels to an IPv4 one is as reachable as the IPv4 one(s).
            return all(_is_public_v4(v4) for v4 in embedded)
        return _is_public_v6(addr)
    return _is_public_v4(addr)


def _is_public_v4(addr: ipaddress.IPv4Address) -> bool:
    """The IPv4 half of `is_public_address`."""
    if addr in _METADATA_ADDRESSES or any(addr in net for net in _REFUSED_V4_NETWORKS):
        return False
    return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                or addr.is_reserved or addr.is_unspecified or not addr.is_global)


def _is_public_v6(addr: ipaddress.IPv6Address) -> bool:
    """The IPv6 half of `is_public_address`, for addresses that embed no IPv4 address."""
    if addr in _METADATA_ADDRESSES or addr in _NAT64_LOCAL:
        return False
    return not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_site_local
                or addr.is_multicast or addr.is_reserved or addr.is_unspecified
                or not addr.is_global)


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 one carries (mapped, compatible, 6to4, Teredo, NAT64), if any."""
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    if addr.sixtofour is not None:
        return [addr.sixtofour]
    if addr.teredo is not None:
        server, client = addr.teredo
        return [server, client]
    if addr in _V4_COMPATIBLE or addr in _NAT64_WELL_KNOWN:
        # Both keep the IPv4 address in the low 32 bits (:: and ::1 become 0.0.0.0 and 0.0.0.1).
        return [ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)]
    return None


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a literal host spells (any inet_aton IPv4 form, bracketed IPv6), else None.

    Raises DatasetRefused for a host that looks numeric but is no valid address ("1.2.3.999"),
    because resolvers disagree on what such a name means.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            raise DatasetRefused(f"{host!r} is not a valid IPv6 address") from None
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            raise DatasetRefused(f"{host!r} is not a valid host") from None
    return _parse_ipv4_loose(text, host)


def _parse_ipv4_loose(text: str, host: str) -> ipaddress.IPv4Address | None:
    """Read IPv4 the way inet_aton and URL parsers do: "127.1", "0x7f000001", "0177.0.0.1"."""
    if text.endswith("."):
        text = text[:-1]  # a fully qualified "127.0.0.1." is the same address
    labels = text.split(".")
    # As in the WHATWG URL parser: a host whose last label is numeric must be an IPv4 address.
    if not labels or not _NUMERIC_LABEL.match(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMERIC_LABEL.match(label) for label in labels):
        raise DatasetRefused(f"{host!r} is neither a host name nor a valid IPv4 address")
    values = [_numeric_label_value(label, host) for label in labels]
    # The leading labels are one byte each; the last fills the bytes that remain.
    last_bits = 8 * (5 - len(values))
    if any(v > 0xFF for v in values[:-1]) or values[-1] >= 1 << last_bits:
        raise DatasetRefused(f"{host!r} is out of range for an IPv4 address")
    number = values[-1]
    for index, value in enumerate(values[:-1]):
        number |= value << (24 - 8 * index)
    return ipaddress.IPv4Address(number)


def _numeric_label_value(label: str, host: str) -> int:
    """The integer one IPv4 label spells in decimal, hex (0x) or octal (leading 0)."""
    if label[:2].lower() == "0x":
        return int(label[2:] or "0", 16)
    if len(label) > 1 and label.startswith("0"):
        try:
            return int(label, 8)
        except ValueError:
            raise DatasetRefused(f"{host!r} has an invalid octal part {label!r}") from None
    return int(label)


def resolve_public(host: str, port: int) -> list[str]:
    """Every address `host` resolves to; DatasetRefused if any of them is not public."""
    if not host.strip():
        raise DatasetRefused("the URL has no host")
    literal = parse_ip_literal(host)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        addresses = _resolve_name(host, port)
    for addr in addresses:
        if not is_public_address(addr):
            if literal is None:
                shown = f"{host} resolves to {addr}, which"
            else:
                shown = host if host.strip("[]") == str(addr) else f"{host} ({addr})"
            raise DatasetRefused(
                f"{shown} is not a public address; datasets may only come from the internet",
                details={"host": host, "address": str(addr)})
    return [str(addr) for addr in addresses]


def _resolve_name(host: str, port: int) -> list[IPAddress]:
    """Ask the system resolver for `host`; DatasetUnavailable when the name does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DatasetUnavailable(f"cannot resolve host {host!r}: {exc}") from None
    addresses: list[IPAddress] = []
    for info in infos:
        # sockaddr is (host, port) for IPv4 and (host, port, flowinfo, scope_id) for IPv6.
        text = str(info[4][0])
        scope_id = info[4][3] if len(info[4]) > 3 else 0
        addr = ipaddress.ip_address(f"{text.split('%')[0]}%{scope_id}" if scope_id else text)
        if addr not in addresses:
            addresses.append(addr)
    if not addresses:
        raise DatasetUnavailable(f"host {host!r} has no address")
    return addresses
