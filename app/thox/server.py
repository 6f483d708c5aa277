"""`thox serve`: the Quart app on Hypercorn, with systemd readiness."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from .config import Config


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        pass


def _no_5xx_from_the_http_layer() -> None:
    """h11 hints 501 for requests it cannot parse (e.g. an unsupported
    Transfer-Encoding) and Hypercorn sends that before the app sees anything.
    To a client such a request is malformed: answer 400. The only 5xx this
    service sends is 503 with Retry-After."""
    from hypercorn.protocol import h11 as hyper_h11
    original = hyper_h11.H11Protocol._send_error_response
    if getattr(original, "_thox", False):
        return

    async def send_error_response(self, status_code: int) -> None:
        await original(self, 400 if status_code >= 500 else status_code)
    send_error_response._thox = True
    hyper_h11.H11Protocol._send_error_response = send_error_response


def listen_socket(host: str, port: int) -> socket.socket:
    from .errors import ThoxError
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host in ("::", "[::]"):
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        s.bind((host.strip("[]"), port))
    except OSError as e:
        s.close()
        raise ThoxError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    s.listen(1024)
    s.set_inheritable(True)
    return s


def serve(host: str | None = None, port: int | None = None, config: Config | None = None) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config as HConfig

    from .api.app import create_app

    config = config or Config()
    config.ensure_api_key()
    host = host or config.get("api.host")
    port = port or int(config.get("api.port"))
    logging.basicConfig(level=os.environ.get("THOX_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    _no_5xx_from_the_http_layer()
    hc = HConfig()
    web_port = int(config.get("api.web_port"))
    ports = [port] + ([web_port] if web_port and web_port != port else [])
    # bind here, before serving, so readiness means "listening" and a busy
    # port is a clear one-line error
    socks = [listen_socket(host, p) for p in ports]
    hc.bind = [f"fd://{s.fileno()}" for s in socks]
    where = ", ".join(f"{host}:{p}" for p in ports)
    hc.accesslog = logging.getLogger("thox.access")
    hc.access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'
    hc.errorlog = logging.getLogger("thox.server")
    hc.keep_alive_timeout = 75
    hc.graceful_timeout = 5

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        app.before_serving(_notify_ready)
        await hypercorn_serve(app, hc, shutdown_trigger=stop.wait)
        sd_notify("STOPPING=1")

    async def _notify_ready() -> None:
        sd_notify("READY=1\nSTATUS=serving on " + where)
        logging.getLogger("thox.server").info("serving on %s", where)

    asyncio.run(main())
