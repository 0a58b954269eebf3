"""``nx serve``: OpenAI's HTTP API over `nx.Engine`."""

from __future__ import annotations

from typing import Any

import click

from nx.cli import from_cache, load_model, main, model_options, quiet_option, serving_load_kwargs, text_tokenizer


@main.command()
@click.argument("target")
@click.argument("path", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port to listen on.")
@click.option(
    "--batch-size", default=None, type=int,
    help="Rows decoded together, i.e. requests generating at once. Default: 8, or a saved artifact's.",
)
@click.option("--max-queue", default=256, show_default=True, type=int, help="Waiting requests before answering 429.")
@click.option(
    "--model-name", default=None,
    help="The model id clients send and /v1/models lists. Default: the checkpoint's file or directory name.",
)
@model_options()
@click.option(
    "--sampling/--no-sampling", default=True, show_default=True,
    help="Also compile the sampling programs before serving (else the first sampled requests compile them).",
)
@click.option(
    "--shutdown-timeout", default=30.0, show_default=True, type=float,
    help="Seconds SIGTERM waits for running requests before cancelling them.",
)
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]),
              help="Least severe server log lines shown (info: start-up steps and one line per request).")
@quiet_option
def serve(
    target: str,
    path: str | None,
    host: str,
    port: int,
    batch_size: int | None,
    max_queue: int,
    model_name: str | None,
    sampling: bool,
    shutdown_timeout: float,
    log_level: str,
    quiet: bool,
    **load: Any,
) -> None:
    """Serve OpenAI's HTTP API: ``nx serve [FAMILY] PATH --port 8000`` (a checkpoint or a saved artifact).

    POST /v1/completions and /v1/chat/completions (streaming with SSE), GET /v1/models, /health
    and /metrics (Prometheus). Prompt buckets default to every 16 tokens up to 128, then powers of
    two (--context-length-estimate overrides; a prompt pads to its bucket). Every program requests
    can run is compiled (or loaded from the compile cache) and warmed up before the server accepts
    traffic. SIGTERM drains running requests (up to --shutdown-timeout) and exits 0. --quiet logs
    warnings and errors only.
    """
    import logging
    import signal
    import time
    from pathlib import Path

    import uvicorn

    import nx
    from nx import artifacts
    from nx.progress import plural
    from nx.serve import create_app

    if quiet and log_level in ("debug", "info"):
        log_level = "warning"
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("nx.serve")
    where = path or target
    if batch_size is None and not artifacts.is_artifact(where):
        batch_size = 8
    t0 = time.perf_counter()
    sized = {} if batch_size is None else {"batch_size": batch_size}
    log.info("loading %s ...", where)
    # compiled below: every program a request can run; its steps are logged here, not drawn
    model = load_model(target, path, True, **sized, **serving_load_kwargs(where, load), progress=False)
    text_tokenizer(model, where, "serve")
    log.info("loaded %r in %.1fs", model, time.perf_counter() - t0)
    engine = nx.Engine(model, max_queue=max_queue)
    shapes = engine.program_keys() + (engine.program_keys(sample=True) if sampling else [])
    saved = set(model.compiled_shapes) | set(model.programs.offered)  # an artifact's programs load, not compile
    todo = [s for s in shapes if s not in saved]
    log.info("compiling %s (%d saved with the model) and warming them up ...", plural(len(todo), "program"),
             len(shapes) - len(todo))
    t1 = time.perf_counter()
    model.compile(progress=False, shapes=shapes, warm=True)
    log.info("compiled in %.1fs%s", time.perf_counter() - t1, from_cache(model))
    name = model_name or Path(where).name
    app = create_app(engine, name, shutdown_timeout=shutdown_timeout)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=shutdown_timeout
    )

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:
                log.info("ready on http://%s:%d (model %r, batch size %d)", host, port, name, model.config.batch_size)

    # uvicorn re-raises the signal that stopped it once shutdown is done; a no-op handler makes
    # that a clean return (exit 0) instead of death by SIGTERM.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("server stopped")
