"""Running the app: check the serving stack is installed, bind, say where, hand over to uvicorn.

The socket is bound here, before uvicorn starts, so that a port in use or a host this machine
does not have is one line and exit 2 (uvicorn would log it and exit 1), and so that port 0 gets
a real port to announce.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket

from imgflow.errors import UserError
from imgflow.serving.settings import ServeSettings

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'imgflow[serve]'"


def require_serving_stack() -> None:
    """UserError naming the install command unless FastAPI, uvicorn and python-multipart import."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401 - Starlette parses uploads with it
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"imgflow serve needs {exc.name or 'FastAPI and uvicorn'}: {INSTALL_HINT}") from None


def run_server(source: str | os.PathLike, settings: ServeSettings = ServeSettings()) -> None:
    """Serve a run directory or an exported .onnx until Ctrl-C (blocks)."""
    require_serving_stack()
    import uvicorn

    from imgflow.serving.app import create_app
    from imgflow.serving.model import describe, load_served_model

    served = load_served_model(source, settings.device)
    app = create_app(served, settings)
    sock = open_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    url, *warnings = address_lines(settings.host, port)
    log.info("serving %s", describe(served.info))
    log.info("%s", url)
    for line in warnings:
        log.warning("%s", line)
    server = uvicorn.Server(uvicorn.Config(app, log_level=_uvicorn_level(), timeout_graceful_shutdown=5))
    with sock:
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            # uvicorn shuts down gracefully on Ctrl-C, then raises the signal again for its caller:
            # for a server that is the normal way to stop, not an interruption.
            pass
    log.info("stopped")


def open_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (uvicorn listens on it); UserError for a port in use or an unknown host."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after Ctrl-C
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror} (another server there? "
                        "choose another --port)") from None
    return sock


def address_lines(host: str, port: int) -> list[str]:
    """Where to open the page; then, off loopback, the warning that others can reach it."""
    shown = f"[{host}]" if ":" in host else host
    if _is_loopback(host):
        return [f"open http://{shown}:{port}/ in a browser (Ctrl-C stops); reachable from this machine only"]
    local = "localhost" if host in ("0.0.0.0", "::", "") else shown
    return [f"open http://{local}:{port}/ in a browser (Ctrl-C stops)",
            f"--host {host}: the server is reachable from the network, by anyone who can reach this "
            f"machine on port {port}; it has no authentication"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _uvicorn_level() -> str:
    """uvicorn logs at imgflow's level (-v / -q), so -q also silences the access log."""
    level = logging.getLogger("imgflow").getEffectiveLevel()
    return {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}.get(level, "error")
