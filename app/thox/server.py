"""`thox serve`: the Quart app on Hypercorn, with systemd readiness."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import resource
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


# every address of both families: an IPv4 socket and an IPv6-only socket
# (not one dual-stack socket, whose IPv4 clients would show as ::ffff:a.b.c.d)
ALL_ADDRESSES = ("::", "[::]", "*")
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)
KEEP_ALIVE_SECONDS = 10   # an idle connection is closed after this long
NOFILE_TARGET = 65536     # open files the process asks for (systemd's LimitNOFILE sets the same)


def _bind(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(1024)
    except OSError:
        s.close()
        raise
    s.set_inheritable(True)
    return s


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host`` (one of ALL_ADDRESSES: IPv4 and IPv6,
    or IPv4 only on a machine without IPv6) and ``port``."""
    from .errors import ThoxError
    if host in ALL_ADDRESSES:
        wanted = [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    else:
        bare = host.strip("[]")
        wanted = [(socket.AF_INET6 if ":" in bare else socket.AF_INET, bare)]
    socks: list[socket.socket] = []
    for family, addr in wanted:
        try:
            socks.append(_bind(family, addr, port))
        except OSError as e:
            if host in ALL_ADDRESSES and family == socket.AF_INET6 and e.errno in _NO_IPV6:
                logging.getLogger("thox.server").warning("no IPv6 on this machine: listening on IPv4 only")
                continue
            for s in socks:
                s.close()
            raise ThoxError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return socks


def raise_open_file_limit() -> int:
    """Raise the soft limit of open files toward NOFILE_TARGET (within the
    hard limit); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(NOFILE_TARGET, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return NOFILE_TARGET if soft == resource.RLIM_INFINITY else soft


class ConnectionLimiter:
    """Open connections per client address, and in all (so that idle
    connections cannot use up the process's file descriptors)."""

    def __init__(self, per_client: int, total: int):
        self.per_client = per_client
        self.total = total
        self.open: dict[str, int] = {}
        self.n_open = 0

    def acquire(self, client: str) -> str | None:
        """Count a new connection from ``client``; None, or why it is refused."""
        if self.n_open >= self.total:
            return "total"
        n = self.open.get(client, 0)
        if self.per_client and n >= self.per_client:
            return "client"
        self.open[client] = n + 1
        self.n_open += 1
        return None

    def release(self, client: str) -> None:
        n = self.open.get(client, 0) - 1
        if n > 0:
            self.open[client] = n
        else:
            self.open.pop(client, None)
        self.n_open -= 1


def _refusal(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "rate_limit_error" if status == 429 else
                                 "server_error", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def _limit_connections() -> None:
    """Make Hypercorn's asyncio connection handler count connections with the
    ConnectionLimiter found on its config (``thox_connections``): one over a
    limit is answered 429 (per client) or 503 (in all), with Retry-After,
    and closed before the app sees it."""
    from hypercorn.asyncio import run as hyper_run
    from hypercorn.asyncio.tcp_server import TCPServer
    if getattr(hyper_run.TCPServer, "_thox", False):
        return

    class LimitedTCPServer(TCPServer):
        _thox = True

        async def run(self) -> None:
            limiter: ConnectionLimiter | None = getattr(self.config, "thox_connections", None)
            try:
                client = self.writer.get_extra_info("peername")[0]
            except (TypeError, IndexError):
                client = ""
            refused = limiter.acquire(client) if limiter else None
            if refused is None:
                try:
                    await super().run()
                finally:
                    if limiter:
                        limiter.release(client)
                return
            if refused == "client":
                reply = _refusal(429, "Too Many Requests",
                                 f"Too many open connections from this client (limit {limiter.per_client}); "
                                 f"close idle connections and retry.", "too_many_connections")
            else:
                reply = _refusal(503, "Service Unavailable", "The server has too many open connections; "
                                 "retry shortly.", "too_many_connections")
            await self._refuse(reply)

        async def _read_data(self) -> None:
            await super()._read_data()
            # the client has closed: stop the idle timer now, or the connection
            # (and its file descriptor) would wait out the keep-alive timeout
            await self.idle_task.stop()

        async def _refuse(self, reply: bytes) -> None:
            try:
                self.writer.write(reply)
                await self.writer.drain()
                self.writer.write_eof()
                # read what the client sends until it closes (briefly), so that
                # closing does not reset the connection before it reads the answer
                async with asyncio.timeout(1):
                    while await self.reader.read(1 << 16):
                        pass
            except (OSError, RuntimeError, TimeoutError):
                pass
            finally:
                self.writer.close()

    hyper_run.TCPServer = LimitedTCPServer


def _address(s: socket.socket) -> str:
    host, port = s.getsockname()[:2]
    return f"[{host}]:{port}" if s.family == socket.AF_INET6 else f"{host}:{port}"


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
    socks = [s for p in ports for s in listen_sockets(host, p)]
    hc.bind = [f"fd://{s.fileno()}" for s in socks]
    where = ", ".join(_address(s) for s in socks)
    hc.accesslog = logging.getLogger("thox.access")
    hc.access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'
    hc.errorlog = logging.getLogger("thox.server")
    hc.keep_alive_timeout = KEEP_ALIVE_SECONDS
    hc.thox_connections = ConnectionLimiter(int(config.get("api.max_connections_per_client")),
                                            max(64, raise_open_file_limit() // 2))
    _limit_connections()
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
