"""
Which host of the config is this machine?

The same config goes to every host, so each process must find itself in it:
by C{--host NAME} when given, else by matching the config's host names
against this machine's names, else by finding which configured addresses
belong to this machine (an address is ours when we can bind a socket to it).
Exactly one match is needed; none or several is a clear error asking for
C{--host}.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Callable, Iterable, Optional

from cluster_backup.config import Cluster, ConfigError


def local_names() -> set[str]:
    """This machine's host names: short, as configured, and fully qualified."""
    names = {socket.gethostname()}
    try:
        names.add(socket.getfqdn())
    except OSError:  # pragma: no cover - depends on the resolver
        pass
    names |= {name.split(".")[0] for name in list(names)}
    return {name.lower() for name in names if name}


def is_local_address(address: str) -> bool:
    """True when C{address} is an address of this machine (we can bind it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((address.strip("[]"), 0))
    except OSError as e:
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL):
            return False
        raise
    return True


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    return sorted({info[4][0] for info in infos})


def identify(
    cluster: Cluster,
    name: Optional[str] = None,
    *,
    names: Optional[Iterable[str]] = None,
    resolve: Callable[[str], list[str]] = _resolve,
    is_local: Callable[[str], bool] = is_local_address,
) -> Optional[str]:
    """
    The config host this process runs as, or None when no host matches
    (a machine with no role).  Raises L{ConfigError} when C{name} is not in
    the config, or when several hosts match and C{--host} must choose.

    C{names}, C{resolve} and C{is_local} are this machine's facts; tests
    pass their own.
    """
    hosts = cluster.hosts()
    if name is not None:
        if name in hosts:
            return name
        raise ConfigError([
            f"{cluster.filename}: --host {name} is not a host of this config "
            f"(hosts: {', '.join(hosts) or 'none'})"])
    mine = {n.lower() for n in (local_names() if names is None else names)}
    by_name = [h for h in hosts if h.lower() in mine or h.lower().split(".")[0] in mine]
    if len(by_name) == 1:
        return by_name[0]
    candidates = by_name or hosts
    by_address = []
    for host in candidates:
        address = cluster.address_of(host)
        addresses = [address] if address != host else resolve(host)
        if any(is_local(a) for a in addresses):
            by_address.append(host)
    if len(by_address) == 1:
        return by_address[0]
    if len(by_address) > 1 or len(by_name) > 1:
        several = by_address or by_name
        raise ConfigError([
            f"{cluster.filename}: this machine matches several hosts "
            f"({', '.join(several)}); choose one with --host NAME"])
    return None


def identify_or_none(cluster: Cluster, name: Optional[str] = None) -> Optional[str]:
    """
    L{identify} for commands that also work from a machine with no role:
    a bad C{--host NAME} is still an error, but several matching hosts give
    None instead of an error.
    """
    try:
        return identify(cluster, name)
    except ConfigError:
        if name is not None:
            raise
        return None


def as_ip(text: str) -> Optional[ipaddress._BaseAddress]:
    """C{text} as an IP address (brackets of an IPv6 host name allowed), or None."""
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def listen_address(
    cluster: Cluster,
    host: str,
    *,
    resolve: Callable[[str], list[str]] = _resolve,
    is_local: Callable[[str], bool] = is_local_address,
) -> tuple[Optional[str], Optional[str]]:
    """
    Where C{host}'s server listens (its AMP port and its rsync daemon), as
    C{(address, problem)}: the address, or None for every interface, and
    the reason it cannot listen, if any.

    A server listens on the address other hosts reach it at, never on
    every interface unless the config says C{LISTEN: *}:
      - the host's C{address:}, or its name when that is an IP address;
      - else the one address its name resolves to on this machine that is
        not a loopback address (the first IPv4 one if several).
    A name that resolves here only to loopback addresses (Debian's
    C{/etc/hosts} maps a machine's own name to 127.0.1.1) does not say
    where the other hosts reach it: that is a problem (unless the host is
    named C{localhost}, which asks for loopback), as is an address that is
    not this machine's.
    """
    if cluster.options.listen == "*":
        return None, None
    address = cluster.address_of(host)
    if as_ip(address) is not None:
        address = address.strip("[]")
        if not is_local(address):
            return None, (f"host {host}'s address {address} is not an address of this "
                          "machine (is this the right host? see --host)")
        return address, None
    found = sorted((a for a in resolve(address) if is_local(a)),
                   key=lambda a: (as_ip(a).version, a))  # IPv4 first
    outside = [a for a in found if not as_ip(a).is_loopback]
    if outside:
        return outside[0], None
    if found and address.lower() in ("localhost", "localhost.localdomain"):
        return found[0], None  # asked for
    if found:
        return None, (f"host {host} resolves here only to {', '.join(found)} (loopback, "
                      "as /etc/hosts may write a machine's own name): other hosts could "
                      f"not reach a server listening there; give {host} 'address: IP' in "
                      "the config, or set 'LISTEN: *' to listen on every interface")
    return None, (f"host {host} resolves to no address of this machine; give it "
                  "'address: IP' in the config, or set 'LISTEN: *'")
