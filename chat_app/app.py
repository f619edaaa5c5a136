"""The server: engine + router + service behind the Gradio UI, on one asyncio loop.

`serve(AppConfig(...))` prepares the base model, opens the feedback database, starts
uvicorn with a FastAPI app whose lifespan creates the engine (vLLM's AsyncLLM must live
on the serving loop), starts the router, and mounts the Gradio UI.

`/v1` is an OpenAI-compatible API on the same engine and database (chat_app/openai_api.py).
`/healthz` says whether the server is live and ready, and which version it serves. A watchdog
checks the engine every few seconds; when the engine is gone (vLLM's engine process died), the
server stops and `serve` exits with status 3, so a supervisor restarts it instead of it storing
empty error replies forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from feedback_db import FeedbackStore, default_db_path

from .auth import LOGIN_MESSAGE, ApiKeyDirectory, UserDirectory, install_login_guard
from .engines import EngineConfig, create_engine
from .identity import AnonymousIdQuota, IdentityConfig, IdentitySigner, load_or_create_key, secret_key_path
from .metrics import CONTENT_TYPE_LATEST
from .openai_api import build_openai_router
from .router import RouterConfig, ServingRouter
from .service import ChatService, ServiceConfig
from .ui import CSS, build_ui
from .ui.session_state import use_lean_sessions
from .runtime import Runtime

ENGINE_GONE_EXIT_STATUS = 3

log = logging.getLogger(__name__)


@dataclass
class AppConfig:
    """Everything `alignloop serve` takes."""

    base_model: str = "default"  # "default" = the embedded Gemma 3 270M, or an HF id / local folder
    engine: str = "auto"  # auto | vllm | hf
    db: Path | None = None  # default: $ALIGNLOOP_DB or ~/.local/share/alignloop/feedback.db
    host: str = "127.0.0.1"
    port: int = 7860
    users_file: Path | None = None  # login required when set: the file `alignloop users add` writes
    admin_users: set[str] = field(default_factory=set)  # logged-in users who may use the dashboard (besides --admin ones)
    admin_password: str | None = None  # default: $ALIGNLOOP_ADMIN_PASSWORD
    cache_dir: Path | None = None
    rounds_dir: Path | None = None  # where a round started from the dashboard writes (None: RoundConfig's)
    title: str = "alignloop"
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    health_interval_s: float = 2.0  # how often the watchdog checks the engine


async def watch_engine(rt: Runtime, engine, interval_s: float, on_gone: Callable[[], None]) -> None:
    """Check the engine every `interval_s`; when it is gone, mark the runtime and call `on_gone` once."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await engine.check_health()
        except Exception as exc:
            rt.fatal_error = f"The model engine stopped ({exc}). The server is shutting down to be restarted."
            log.critical("the model engine is gone (%s); stopping the server with exit status %d so that a "
                         "supervisor restarts it", exc, ENGINE_GONE_EXIT_STATUS)
            on_gone()
            return


def build_app(config: AppConfig, model_path: Path, base_model_name: str,
              on_engine_gone: Callable[[], None] | None = None) -> tuple[FastAPI, Runtime]:
    """The FastAPI app (Gradio mounted at /, /healthz) and the runtime its lifespan fills in.

    `on_engine_gone` is called once if the engine dies (serve() stops uvicorn then).
    """
    db_path = config.db or default_db_path()
    signer = IdentitySigner(load_or_create_key(secret_key_path(db_path)))
    users = UserDirectory.load(config.users_file) if config.users_file else None
    rt = Runtime(signer=signer, anonymous_ids=AnonymousIdQuota(config.identity.anonymous_ids_per_hour),
                 admin_password=config.admin_password or os.environ.get("ALIGNLOOP_ADMIN_PASSWORD"),
                 admin_users=set(config.admin_users) | (users.admin_names() if users else set()),
                 base_model=config.base_model, rounds_dir=config.rounds_dir)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store = FeedbackStore(db_path)
        engine = None
        router = None
        watchdog = None
        try:
            engine = create_engine(config.engine, model_path, config.engine_config)  # type: ignore[arg-type]
            router = ServingRouter(engine, store, base_model_name, config.router)
            await router.start()
            rt.service = ChatService(store, router, config.service)
            watchdog = asyncio.create_task(watch_engine(rt, engine, config.health_interval_s,
                                                        on_engine_gone or (lambda: None)))
            log.info("alignloop ready: %s engine, live version %s; open http://%s:%d in a browser",
                     engine.name, router.live.name, config.host, config.port)
        except Exception as exc:
            rt.startup_error = (f"The model engine failed to start ({type(exc).__name__}: {exc}). "
                                "Check the server log; try `--engine hf` if vLLM is the problem.")
            log.exception("engine start failed")
        try:
            yield
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if router is not None:
                await router.stop()
            if engine is not None:
                with contextlib.suppress(Exception):  # a dead engine may fail to close; we are leaving anyway
                    await engine.close()
            if rt.service is not None:
                rt.service.close()
            store.close()

    demo = build_ui(rt, title=config.title, default_sampling=config.service.default_sampling)
    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """live: the process answers; ready: the engine serves. 200 when ready, else 503 (with why)."""
        svc = rt.service
        ready = svc is not None and rt.fatal_error is None
        body = {"live": True, "ready": ready,
                "live_version": svc.router.live.name if svc is not None and svc.router.live else None,
                "candidate_version": svc.router.candidate.name if svc is not None and svc.router.candidate else None,
                "engine": svc.engine.name if svc is not None else None}
        if not ready:
            body["error"] = rt.fatal_error or rt.startup_error or "starting: the model engine is loading"
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        """Requests, time to first token, decode rate, tokens, feedback and the serving versions (Prometheus)."""
        svc = rt.service
        if svc is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST, status_code=503)
        svc.metrics.serving("live", svc.router.live.name if svc.router.live else None)
        svc.metrics.serving("candidate", svc.router.candidate.name if svc.router.candidate else None)
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # The OpenAI-compatible API (/v1): keys from the users file, else users.json beside the database.
    app.include_router(build_openai_router(rt.require, ApiKeyDirectory(config.users_file or db_path.with_name("users.json"))))

    if users is None:
        app = gr.mount_gradio_app(app, demo, path="", css=CSS)
    else:  # wrong passwords at /login are throttled per address and per user name
        app = gr.mount_gradio_app(app, demo, path="", css=CSS, auth=users.authenticate, auth_message=LOGIN_MESSAGE)
        install_login_guard(app)
    use_lean_sessions(demo)  # no full copy of the page's config per browser session
    return app, rt


def serve(config: AppConfig) -> None:
    """Prepare the model and run the server until interrupted."""
    import uvicorn

    from training.base_models import prepare_model, resolve_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_path = prepare_model(config.base_model, cache_dir=config.cache_dir)
    base_name = resolve_model(config.base_model).name
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app, rt = build_app(config, Path(model_path), base_name, on_engine_gone=stop)
    log.info("starting the %s engine on %s (the app answers once it is ready)", config.engine, model_path)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    server.run()
    if rt.fatal_error:
        sys.exit(ENGINE_GONE_EXIT_STATUS)
