"""IPv6 forms that carry an IPv4 address are judged by that address under a wildcard allow-list."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import requests
from lsfakes import ImageHost, scene_png

from backend.labelstudio.images import ImageLoader, ImageLoadError, carried_ipv4

PUBLIC = "8.8.8.8"


def teredo(server: str, client: str, port: int = 40000) -> str:
    """A Teredo address (RFC 4380): 2001:0::/32, the server, flags, then port and client obfuscated."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    value |= (0x8000 << 48) | ((port ^ 0xFFFF) << 32) | (int(ipaddress.IPv4Address(client)) ^ 0xFFFFFFFF)
    return str(ipaddress.IPv6Address(value))


def six_to_four(ipv4: str) -> str:
    return str(ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(ipv4)) << 80) | 1))


def embedded(prefix: str, ipv4: str) -> str:
    """``ipv4`` in the low 32 bits of the /96 ``prefix`` (mapped, compatible, NAT64)."""
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address(prefix)) | int(ipaddress.IPv4Address(ipv4))))


# form -> how it writes an IPv4 address
FORMS = {
    "ipv4-mapped": lambda v4: embedded("::ffff:0:0", v4),
    "ipv4-compatible": lambda v4: embedded("::", v4),
    "nat64": lambda v4: embedded("64:ff9b::", v4),
    "nat64-local": lambda v4: embedded("64:ff9b:1::", v4),
    "6to4": six_to_four,
    "teredo-client": lambda v4: teredo("65.54.227.120", v4),
    "teredo-server": lambda v4: teredo(v4, PUBLIC),
}
BLOCKED_IPV4 = {
    "cloud metadata": "169.254.169.254",
    "loopback": "127.0.0.1",
    "private": "10.1.2.3",
    "private 192.168": "192.168.0.7",
    "unspecified": "0.0.0.0",
}


def wildcard_loader(addresses: dict[str, list[str]]) -> ImageLoader:
    return ImageLoader(
        label_studio_url=None, api_key=None, allowed_hosts=["*"], resolver=lambda host, port: addresses[host]
    )


def test_the_forms_carry_the_ipv4_address_they_were_built_from():
    for name, form in FORMS.items():
        carried = carried_ipv4(ipaddress.IPv6Address(form("169.254.169.254")))
        assert ipaddress.IPv4Address("169.254.169.254") in carried, name
    assert carried_ipv4(ipaddress.IPv6Address("2002:a9fe:a9fe::1")) == [
        ipaddress.IPv4Address("169.254.169.254")
    ]
    assert carried_ipv4(ipaddress.IPv6Address("2606:4700::1111")) is None  # a plain IPv6 address


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", BLOCKED_IPV4)
def test_a_form_carrying_a_non_public_ipv4_is_refused(form, kind):
    ipv4 = BLOCKED_IPV4[kind]
    address = FORMS[form](ipv4)
    loader = wildcard_loader({"images.example.test": [address]})
    with pytest.raises(ImageLoadError, match=f"non-public address .*{address}") as info:
        loader.check_url("https://images.example.test/cat.png")
    assert info.value.kind == "refused" and ipv4 in str(info.value)


@pytest.mark.parametrize("form", FORMS)
def test_a_form_carrying_a_public_ipv4_is_allowed(form):
    address = FORMS[form](PUBLIC)
    loader = wildcard_loader({"images.example.test": [address]})
    loader.check_url("https://images.example.test/cat.png")  # no refusal
    assert loader.stats().get("refused_refused", 0) == 0


def test_the_6to4_form_of_the_metadata_address_is_refused_as_a_url_literal():
    # the default resolver: getaddrinfo on an address literal asks no DNS server
    loader = ImageLoader(label_studio_url=None, api_key=None, allowed_hosts=["*"])
    with pytest.raises(ImageLoadError, match=r"2002:a9fe:a9fe::1 = 169.254.169.254"):
        loader.load("http://[2002:a9fe:a9fe::1]/latest/meta-data/iam/security-credentials/")


def test_a_local_use_nat64_address_of_an_unknown_layout_is_refused():
    # 64:ff9b:1:ab00::/56 (RFC 6052 /56 layout) carrying 169.254.169.254, with 8.8.8.8 in the low bits
    address = "64:ff9b:1:aba9:fe:a9fe:808:808"
    assert carried_ipv4(ipaddress.IPv6Address(address)) == []
    with pytest.raises(ImageLoadError, match="unknown IPv4"):
        wildcard_loader({"nat.example.test": [address]}).check_url("http://nat.example.test/a.png")


def test_plain_ipv6_addresses_keep_their_own_rules():
    loader = wildcard_loader({"v6.example.test": ["2606:4700:4700::1111"], "ula.example.test": ["fd00::5"]})
    loader.check_url("http://v6.example.test/a.png")
    for address in ("fd00::5", "fe80::1%eth0", "::1", "::"):
        loader = wildcard_loader({"x.example.test": [address]})
        with pytest.raises(ImageLoadError, match="non-public address"):
            loader.check_url("http://x.example.test/a.png")


@pytest.fixture
def loopback_server():
    """A real HTTP server on 127.0.0.1 serving one PNG, counting the requests it gets."""
    host = ImageHost(scene_png(8, 8))
    yield host.port, host.seen
    host.close()


def ipv6_sockets() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_sockets(), reason="this host has no IPv6 sockets to reach the mapped form with")
def test_the_mapped_form_of_loopback_reaches_an_ipv4_loopback_server(loopback_server):
    # why the forms matter: a plain HTTP client reaches 127.0.0.1 through ::ffff:127.0.0.1
    port, seen = loopback_server
    assert requests.get(f"http://[::ffff:127.0.0.1]:{port}/secret.png", timeout=5).status_code == 200
    assert seen == ["/secret.png"]


def test_a_real_fetch_through_a_form_of_loopback_is_refused(loopback_server):
    port, seen = loopback_server
    loader = ImageLoader(label_studio_url=None, api_key=None, allowed_hosts=["*"])
    with pytest.raises(ImageLoadError, match=r"::ffff:127.0.0.1 = 127.0.0.1") as info:
        loader.load(f"http://[::ffff:127.0.0.1]:{port}/secret.png")
    assert info.value.kind == "refused"
    named = wildcard_loader({"cdn.example.test": [six_to_four("127.0.0.1")]})
    with pytest.raises(ImageLoadError, match="2002:7f00:1::1 = 127.0.0.1"):
        named.load(f"http://cdn.example.test:{port}/secret.png")
    assert seen == []  # the loader never connected
    assert loader.stats()["refused_refused"] == 1
