"""Host code. The embedded, zero-setup MQTT broker (amqtt) for the demo and for tests.

Production, CI and HIL runs use Mosquitto (see `edgeline.hil.mosquitto`); this broker exists
so that `edgeline demo` works on a machine with nothing installed but the Python package.
Known amqtt 0.12 limits (measured, see DESIGN.md): 2-5k msg/s; no persistent session for
anonymous clients; QoS0 upgraded to QoS1; retained messages sent to clients that never
subscribed to them; no client-certificate requirement. Correctness tests therefore run on
Mosquitto too.

Two ways to run it:

- `EmbeddedBroker`: `await start()` / `await stop()` in the caller's asyncio loop (the demo).
- `BrokerThread`: a context manager running an `EmbeddedBroker` in its own thread and loop,
  for tests and for callers without a loop: `with BrokerThread() as b: connect(b.port)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from types import TracebackType
from typing import Any

from amqtt.broker import Broker
from edgeline.host.ports import free_tcp_port

log = logging.getLogger(__name__)

# amqtt logs every connection at INFO and its state machine (`transitions`) every step.
_NOISY_LOGGERS = ("amqtt", "transitions")
# A port picked by free_tcp_port can be taken before amqtt binds it; pick again this often.
_BIND_ATTEMPTS = 3


class _Broker(Broker):
    """amqtt's Broker, keeping track of its connection tasks so stop() can end them.

    amqtt 0.12's shutdown() ends every session, but a connection that has not completed
    CONNECT (a port probe, a slow client) waits in `stream_connected` for bytes with no
    timeout, and Python < 3.13 servers do not close the connections they accepted: the task
    would outlive the broker. `close_pending()` cancels those tasks; each ends quietly (a
    cancelled connection task makes Python 3.11's asyncio.streams log a spurious "Exception
    in callback" error) and closes its socket.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._connection_tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connection_tasks.add(task)
        try:
            await super().stream_connected(reader, writer, listener_name)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            writer.close()  # cancelled by close_pending(): the broker is gone, end quietly
        finally:
            if task is not None:
                self._connection_tasks.discard(task)

    async def close_pending(self) -> int:
        self._closing = True
        left = [t for t in self._connection_tasks if not t.done()]
        for t in left:
            t.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
        return len(left)


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not start (port taken, bad configuration)."""


def _quiet_amqtt() -> None:
    # Only raise levels nobody set: a caller who asked for amqtt's DEBUG output keeps it.
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:
            lg.setLevel(logging.WARNING)


class EmbeddedBroker:
    """amqtt listening on `host:port` (plain TCP), in the running asyncio loop.

    :param host: address to bind; loopback by default, so the demo exposes nothing.
    :param port: TCP port; 0 picks a free one (see `free_tcp_port`).
    :param allow_anonymous: True (the default) lets any client connect without a username,
        which is what the zero-setup demo needs: its virtual nodes and gateway run on this
        machine, on loopback only, and there is nothing to provision. amqtt then treats every
        session as anonymous and keeps none of them across a disconnect. False requires a
        username (amqtt checks no password without a password file) and, in exchange, keeps
        persistent sessions for clients connecting with clean_session=False.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, allow_anonymous: bool = True) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not a TCP port (0 picks a free one)")
        self._host = host
        self._port = port
        self._allow_anonymous = allow_anonymous
        self._broker: _Broker | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The listening port: 0 until the first start() when constructed with port 0, then
        the chosen one, kept for restarts."""
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self._host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._broker is not None

    def _config(self, port: int) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self._host}:{port}"}},
            # No $SYS publisher and no event/packet loggers (amqtt's defaults): only the
            # authentication plugin, which amqtt needs to accept anyone at all.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {
                    "allow_anonymous": self._allow_anonymous
                }
            },
        }

    async def start(self) -> None:
        """Bind and start serving; returns once the port accepts connections.

        :raises RuntimeError: if already started.
        :raises EmbeddedBrokerError: if the broker cannot bind or start.
        """
        if self._broker is not None:
            raise RuntimeError(f"embedded broker already running at {self.url}")
        _quiet_amqtt()
        # Port 0 picks a free port at the first start; a restart reuses the same port, so
        # clients can reconnect to the same URL (as with MosquittoProcess).
        auto = self._port == 0
        attempts = _BIND_ATTEMPTS if auto else 1
        last: Exception | None = None
        for _ in range(attempts):
            port = free_tcp_port(self._host) if auto else self._port
            broker = _Broker(self._config(port))
            try:
                await broker.start()
            except Exception as e:  # amqtt wraps OSError (port in use) in BrokerError
                last = e
                log.debug("amqtt could not start on %s:%d: %s", self._host, port, e)
                continue
            self._broker, self._port = broker, port
            log.info("embedded amqtt broker listening on %s", self.url)
            return
        raise EmbeddedBrokerError(
            f"the embedded amqtt broker could not listen on {self._host}:"
            f"{self._port or '<free port>'}: {last} "
            "(pass another port, or use Mosquitto with --broker mqtt://host:port)"
        ) from last

    async def stop(self) -> None:
        """Disconnect every client and stop listening. Safe to call twice."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        await broker.shutdown()
        if n := await broker.close_pending():
            log.debug("closed %d connections that never completed CONNECT", n)
        log.info("embedded amqtt broker on %s:%d stopped", self._host, self._port)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class BrokerThread:
    """An `EmbeddedBroker` in a thread of its own, with its own asyncio loop.

    `with BrokerThread() as b:` returns once the broker accepts connections on `b.port`;
    leaving the block shuts the broker down, ends the loop (cancelling anything amqtt left
    behind) and joins the thread.

    :param start_timeout: seconds to wait for the broker to start, and again to stop.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_anonymous: bool = True,
        start_timeout: float = 10.0,
    ) -> None:
        self.broker = EmbeddedBroker(host, port, allow_anonymous=allow_anonymous)
        self._timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        # Set when the loop ended with tasks still pending after the broker's shutdown.
        self.leftover_tasks: list[str] = []

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return self.broker.url

    def start(self) -> None:
        """Start the thread and the broker; return when it listens.

        :raises EmbeddedBrokerError: if it did not start (the thread is gone again).
        """
        if self._thread is not None:
            raise RuntimeError(f"broker thread already running at {self.url}")
        self._started.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="edgeline-amqtt", daemon=True)
        self._thread.start()
        if not self._started.wait(self._timeout):
            self.stop()
            raise EmbeddedBrokerError(f"the embedded amqtt broker did not start within {self._timeout} s")
        if self._error is not None:
            err = self._error
            self._join()
            raise err

    def stop(self) -> None:
        """Shut the broker down and join its thread. Safe to call twice."""
        if self._thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop.set)
        self._join()

    def _join(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(self._timeout)
        if thread.is_alive():
            raise EmbeddedBrokerError(f"the embedded amqtt broker thread did not stop in {self._timeout} s")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported to the starting thread, never lost
            if not self._started.is_set():
                self._error = e
                self._started.set()
            else:
                log.exception("embedded amqtt broker thread failed")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.broker.start()
        except BaseException as e:
            self._error = e
            self._started.set()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await self.broker.stop()
            me = asyncio.current_task()
            self.leftover_tasks = [t.get_name() for t in asyncio.all_tasks() if t is not me and not t.done()]
            if self.leftover_tasks:
                log.debug("amqtt left %d tasks after shutdown; cancelling", len(self.leftover_tasks))
            self._loop = None

    def __enter__(self) -> BrokerThread:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
