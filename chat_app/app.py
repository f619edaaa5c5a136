"""The server: engine + router + service behind the Gradio UI, on one asyncio loop.

`serve(AppConfig(...))` prepares the base model, opens the feedback database, starts
uvicorn with a FastAPI app whose lifespan creates the engine (vLLM's AsyncLLM must live
on the serving loop), starts the router, and mounts the Gradio UI.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from fastapi import FastAPI

from feedback_db import FeedbackStore, default_db_path

from .engines import EngineConfig, create_engine
from .router import RouterConfig, ServingRouter
from .service import ChatService, ServiceConfig
from .ui import build_ui
from .ui.common import Runtime

log = logging.getLogger(__name__)


@dataclass
class AppConfig:
    """Everything `alignloop serve` takes."""

    base_model: str = "default"  # "default" = the embedded Gemma 3 270M, or an HF id / local folder
    engine: str = "auto"  # auto | vllm | hf
    db: Path | None = None  # default: $ALIGNLOOP_DB or ~/.local/share/alignloop/feedback.db
    host: str = "127.0.0.1"
    port: int = 7860
    users: dict[str, str] = field(default_factory=dict)  # login required when set: name -> password
    admin_users: set[str] = field(default_factory=set)  # logged-in users who may use the dashboard
    admin_password: str | None = None  # default: $ALIGNLOOP_ADMIN_PASSWORD
    cache_dir: Path | None = None
    title: str = "alignloop"
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)


def build_app(config: AppConfig, model_path: Path, base_model_name: str) -> tuple[FastAPI, Runtime]:
    """The FastAPI app (Gradio mounted at /) and the runtime its lifespan fills in."""
    rt = Runtime(admin_password=config.admin_password or os.environ.get("ALIGNLOOP_ADMIN_PASSWORD"),
                 admin_users=set(config.admin_users))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store = FeedbackStore(config.db or default_db_path())
        engine = None
        router = None
        try:
            engine = create_engine(config.engine, model_path, config.engine_config)  # type: ignore[arg-type]
            router = ServingRouter(engine, store, base_model_name, config.router)
            await router.start()
            rt.service = ChatService(store, router, config.service)
            log.info("alignloop ready: %s engine, live version %s", engine.name, router.live.name)
        except Exception as exc:
            rt.startup_error = (f"The model engine failed to start ({type(exc).__name__}: {exc}). "
                                "Check the server log; try `--engine hf` if vLLM is the problem.")
            log.exception("engine start failed")
        try:
            yield
        finally:
            if router is not None:
                await router.stop()
            if engine is not None:
                await engine.close()
            store.close()

    demo = build_ui(rt, title=config.title, default_sampling=config.service.default_sampling)
    app = FastAPI(lifespan=lifespan)
    auth = list(config.users.items()) or None
    app = gr.mount_gradio_app(app, demo, path="", auth=auth)
    return app, rt


def serve(config: AppConfig) -> None:
    """Prepare the model and run the server until interrupted."""
    import uvicorn

    from training.base_models import prepare_model, resolve_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model_path = prepare_model(config.base_model, cache_dir=config.cache_dir)
    base_name = resolve_model(config.base_model).name
    app, _ = build_app(config, Path(model_path), base_name)
    log.info("open http://%s:%d in a browser", config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5)
