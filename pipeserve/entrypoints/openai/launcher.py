"""`pipeserve serve`: build the engine, bind the port, run uvicorn until SIGINT/SIGTERM, stop every stage."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import uvicorn

from pipeserve.engine.arg_utils import EngineArgs
from pipeserve.engine.async_engine import AsyncEngine
from pipeserve.engine.startup import build_async_engine
from pipeserve.entrypoints.openai.api_server import ServeSettings, build_app
from pipeserve.entrypoints.openai.startup import base_url, curl_example, describe_layout

logger = logging.getLogger("pipeserve.serve")

GRACEFUL_SHUTDOWN_S = 5  # open streams get this long to finish before they are cancelled (and aborted)


def build_engine(engine_args: EngineArgs) -> AsyncEngine:
    """The engine with its stages started; PP=1 runs forward passes in a thread so HTTP stays responsive."""
    config = engine_args.create_engine_config()
    return build_async_engine(config, offload=True)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails in a second rather than after the load."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, announcing readiness once the socket accepts connections."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]):
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self._on_ready()


def run_server(engine_args: EngineArgs, settings: ServeSettings, log_level: str = "info",
               access_log: bool = True) -> int:
    """Serve until interrupted; the engine (and every stage process) is shut down however this ends.

    Returns the exit code: 0 after SIGINT/SIGTERM, 1 when the engine failed for good (a stage that could
    not be recovered), so that a supervisor (systemd, Kubernetes) restarts the server."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    sock = bind_socket(settings.host, settings.port)
    engine = None
    dead: list[BaseException] = []
    try:
        settings.port = sock.getsockname()[1]  # --port 0 picks a free one
        engine = build_engine(engine_args)
        for line in describe_layout(engine.config, settings.served_model_names[0]):
            logger.info("%s", line)
        server: _Server | None = None

        def engine_dead(exc: BaseException) -> None:
            logger.error("the engine failed for good, exiting: %s", exc)
            dead.append(exc)
            server.should_exit = True

        app = build_app(engine, settings, on_engine_dead=engine_dead)
        config = uvicorn.Config(app, log_level=log_level, access_log=access_log,
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        server = _Server(config, lambda: _announce(settings))
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it handled; the shutdown already happened
    finally:
        if engine is not None:
            engine.shutdown()
        sock.close()
    return 1 if dead else 0


def _announce(settings: ServeSettings) -> None:
    url = base_url(settings.host, settings.port)
    logger.info("ready: %s (OpenAI API under /v1; also /health, /live, /metrics, /version; live view: %s/dashboard%s)",
                url, url, "?api_key=<key>" if settings.api_key else "")
    logger.info("try: %s", curl_example(url, settings.served_model_names[0], bool(settings.api_key)))
