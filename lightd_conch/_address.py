"""
How a peer's address is written in the log (C{host:port}), and whether it is
in a list of networks.
"""

import ipaddress


def formatAddress(address) -> str:
    """
    C{host:port} of an IPv4/IPv6 address, or its str() for anything else.
    """
    return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"


def addressIn(host: str, networks) -> bool:
    """
    Whether the address C{host} is in one of C{networks} (C{ip_network}s).
    An IPv4-mapped IPv6 address (C{::ffff:192.0.2.1}, what a dual-stack
    listener reports for an IPv4 client) is the IPv4 address it maps, and
    an IPv6 zone (C{%eth0}) is ignored; anything not an address is in none.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    candidates = [address]
    if address.version == 6 and address.ipv4_mapped is not None:
        candidates.append(address.ipv4_mapped)
    elif address.version == 4:
        candidates.append(ipaddress.IPv6Address("::ffff:" + str(address)))
    return any(
        candidate in network
        for candidate in candidates
        for network in networks
        if candidate.version == network.version
    )
