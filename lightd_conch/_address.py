"""
How a peer's address is written in the log: C{host:port}.
"""


def formatAddress(address) -> str:
    """
    C{host:port} of an IPv4/IPv6 address, or its str() for anything else.
    """
    return f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
