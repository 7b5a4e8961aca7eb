"""Address policy: every spelling of an internal address is refused, public ones pass."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from gralora.errors import DatasetRefused, DatasetUnavailable
from gralora.netguard import is_public_address, parse_ip_literal, resolve_public

# (host as it appears in a URL, the address it means)
REFUSED_SPELLINGS = [
    ("127.0.0.1", "127.0.0.1"),
    ("127.0.0.1.", "127.0.0.1"),  # fully qualified
    ("2130706433", "127.0.0.1"),  # one decimal number
    ("0x7f000001", "127.0.0.1"),  # one hex number
    ("0X7F000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),  # one octal number
    ("0177.0.0.1", "127.0.0.1"),  # octal first byte
    ("0x7f.0.0.1", "127.0.0.1"),  # hex first byte
    ("0x7f.0x0.0x0.0x1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),  # short forms: the last part fills the rest
    ("127.0.1", "127.0.0.1"),
    ("127.000.000.001", "127.0.0.1"),  # zero-padded parts read as octal
    ("0", "0.0.0.0"),
    ("0.0.0.0", "0.0.0.0"),
    ("10.0.0.1", "10.0.0.1"),
    ("012.0.0.1", "10.0.0.1"),  # octal 012 is 10
    ("172.16.5.4", "172.16.5.4"),
    ("192.168.1.1", "192.168.1.1"),
    ("3232235777", "192.168.1.1"),
    ("169.254.169.254", "169.254.169.254"),  # cloud metadata
    ("0xa9fea9fe", "169.254.169.254"),
    ("169.254.43518", "169.254.169.254"),
    ("100.64.0.1", "100.64.0.1"),  # carrier-grade NAT
    ("100.100.100.200", "100.100.100.200"),  # Alibaba metadata, inside CGNAT
    ("224.0.0.1", "224.0.0.1"),  # multicast
    ("255.255.255.255", "255.255.255.255"),
    ("240.0.0.1", "240.0.0.1"),  # reserved
    ("192.0.0.192", "192.0.0.192"),  # Oracle metadata
    ("198.18.0.1", "198.18.0.1"),  # benchmarking
    ("168.63.129.16", "168.63.129.16"),  # Azure WireServer
    ("[::1]", "::1"),
    ("[::]", "::"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),  # IPv4-mapped
    ("[::ffff:7f00:1]", "::ffff:127.0.0.1"),
    ("[::ffff:169.254.169.254]", "::ffff:169.254.169.254"),
    ("[::127.0.0.1]", "::127.0.0.1"),  # IPv4-compatible
    ("[::10.0.0.1]", "::10.0.0.1"),
    ("[2002:7f00:1::]", "2002:7f00:1::"),  # 6to4 around 127.0.0.1
    ("[2002:a9fe:a9fe::1]", "2002:a9fe:a9fe::1"),  # 6to4 around the metadata address
    ("[2001:0:4136:e378:8000:63bf:80ff:fffe]", "2001:0:4136:e378:8000:63bf:80ff:fffe"),  # Teredo
    ("[64:ff9b::7f00:1]", "64:ff9b::7f00:1"),  # NAT64 around 127.0.0.1
    ("[fe80::1]", "fe80::1"),  # link-local
    ("[fe80::1%25eth0]", "fe80::1%25eth0"),  # with a zone
    ("[fc00::1]", "fc00::1"),  # unique local
    ("[fd00:ec2::254]", "fd00:ec2::254"),  # AWS metadata over IPv6
    ("[fec0::1]", "fec0::1"),  # site-local
    ("[ff02::1]", "ff02::1"),  # multicast
    ("[2001:db8::1]", "2001:db8::1"),  # documentation
    ("[100::1]", "100::1"),  # discard prefix
]

PUBLIC_SPELLINGS = [
    ("8.8.8.8", "8.8.8.8"),
    ("134744072", "8.8.8.8"),
    ("0x08080808", "8.8.8.8"),
    ("010.010.010.010", "8.8.8.8"),
    ("8.8.2056", "8.8.8.8"),
    ("1.1.1.1", "1.1.1.1"),
    ("[2606:4700:4700::1111]", "2606:4700:4700::1111"),
    ("[2001:4860:4860::8888]", "2001:4860:4860::8888"),
    ("[::ffff:8.8.8.8]", "::ffff:8.8.8.8"),  # mapped public IPv4 is as public as the IPv4
    ("[2002:808:808::1]", "2002:808:808::1"),  # 6to4 around 8.8.8.8
    ("[64:ff9b::808:808]", "64:ff9b::808:808"),  # NAT64 around 8.8.8.8
]

MALFORMED_NUMERIC = ["1.2.3.256", "1.2.3.4.5", "08.0.0.1", "0x100.0.0.1", "1.16777216",
                     "4294967296", "1..2.3", "[::1", "[not-an-ip]", "1:2:3"]


@pytest.mark.parametrize(("host", "address"), REFUSED_SPELLINGS)
def test_internal_spellings_are_refused(host: str, address: str) -> None:
    """Each spelling is read as the address it means, and that address is refused."""
    literal = parse_ip_literal(host)
    assert literal == ipaddress.ip_address(address)
    with pytest.raises(DatasetRefused) as caught:
        resolve_public(host, 80)
    assert caught.value.code == "dataset_refused"
    assert "not a public address" in caught.value.message


@pytest.mark.parametrize(("host", "address"), PUBLIC_SPELLINGS)
def test_public_spellings_pass(host: str, address: str) -> None:
    """Public addresses, however spelled, resolve to themselves without a DNS lookup."""
    assert resolve_public(host, 443) == [str(ipaddress.ip_address(address))]


@pytest.mark.parametrize("host", MALFORMED_NUMERIC)
def test_malformed_numeric_hosts_are_refused(host: str) -> None:
    """A host that looks like an address but is not one never reaches the resolver."""
    with pytest.raises(DatasetRefused):
        resolve_public(host, 80)


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("93.184.216.34", True), ("2a00:1450:4001::200e", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("169.254.169.254", False),
    ("100.127.255.255", False), ("100.128.0.0", True), ("239.255.255.250", False),
    ("::ffff:10.0.0.1", False), ("::ffff:1.1.1.1", True), ("fd00:ec2::254", False),
])
def test_is_public_address_table(address: str, public: bool) -> None:
    """is_public_address takes strings and ipaddress objects alike."""
    assert is_public_address(address) is public
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_localhost_name_is_resolved_and_refused() -> None:
    """A name is resolved with the system resolver, and its loopback answer refused."""
    with pytest.raises(DatasetRefused, match="localhost resolves to"):
        resolve_public("localhost", 80)


def _fake_getaddrinfo(answers: list[str]) -> Any:
    """A getaddrinfo that answers `answers` for any name (DNS is not reachable offline)."""
    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        out: list[Any] = []
        for answer in answers:
            if ":" in answer:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (answer, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port)))
        return out
    return getaddrinfo


def test_any_refused_answer_refuses_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """One internal address among public ones is enough to refuse (rebinding via round robin)."""
    monkeypatch.setattr(socket, "getaddrinfo",
                        _fake_getaddrinfo(["8.8.8.8", "2606:4700::1", "10.0.0.7"]))
    with pytest.raises(DatasetRefused, match="10.0.0.7"):
        resolve_public("mixed.example", 443)


def test_all_public_answers_are_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every distinct public answer is returned, in resolver order, for pinning."""
    monkeypatch.setattr(socket, "getaddrinfo",
                        _fake_getaddrinfo(["8.8.8.8", "8.8.8.8", "2606:4700::1"]))
    assert resolve_public("public.example", 443) == ["8.8.8.8", "2606:4700::1"]


def test_unresolvable_name_is_unavailable() -> None:
    """A name that does not resolve is unavailable, not refused."""
    with pytest.raises(DatasetUnavailable, match="cannot resolve"):
        resolve_public("no-such-host.invalid", 80)


def test_empty_host_is_refused() -> None:
    """A URL without a host cannot be fetched."""
    with pytest.raises(DatasetRefused):
        resolve_public("", 80)
