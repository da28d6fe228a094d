"""Where a server listens (``daemon --metrics-port``, ``ui``, ``emulator``): its host as a URL
writes it, and the one-line error when it cannot listen there (the address, the option to
change, and why), in the same words for all."""

from __future__ import annotations

import errno
import os
import socket

from orchestrator.errors import UserError


def url_host(host: str) -> str:
    """``host`` as it stands in a URL or before ``:port``: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def cannot_listen(exc: OSError | UnicodeError, host: str, port: int, *, who: str,
                  host_option: str = "--host", port_option: str = "--port") -> UserError:
    """What binding ``host:port`` raised, as a UserError naming the option to change:
    ``host_option`` for a host that does not resolve, is not a host name, or is not this
    machine's; ``port_option`` otherwise (a port taken, one not allowed)."""
    if isinstance(exc, socket.gaierror):  # its errno is an EAI_ code, which os.strerror does not know
        option, reason = host_option, (exc.strerror or str(exc)).lower()
    elif isinstance(exc, UnicodeError):  # the IDNA codec: a label empty or longer than 63 characters
        option, reason = host_option, "not a valid host name"
    else:
        option = host_option if exc.errno == errno.EADDRNOTAVAIL else port_option
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    in_use = isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
    hint = f"; another process listens there ({port_option} 0 picks a free one)" if in_use else ""
    return UserError(f"{who}: cannot listen on {url_host(host)}:{port} ({option}): {reason}{hint}")
