"""`aded serve`: load one model and serve it over an OpenAI-compatible HTTP API.

FastAPI and uvicorn are imported inside the command, so `aded` works without the `server` extra
and says how to install it when `serve` is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from aded.cli.common import DrafterOpt, ModelOpt, NodesOpt, friendly

__all__ = ["serve_command"]


@friendly
def serve_command(
    model: str = ModelOpt,
    drafter: str = DrafterOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port to listen on."),
    state: Path | None = typer.Option(None, "--state", dir_okay=False,
                                         help="File of the drafter's learned state: loaded at start, saved after requests."),
    save_interval: float = typer.Option(0.0, "--save-interval", min=0.0,
                                        help="Least seconds between state saves (0: after each request)."),
    api_key: list[str] = typer.Option([], "--api-key",
                                      help="Bearer token required on /v1 routes; repeatable (default: $ADED_API_KEY, comma-separated)."),
    admin_key: list[str] = typer.Option([], "--admin-key",
                                        help="Bearer token that also reads the whole server's /metrics and /health "
                                             "(other keys read only their own); repeatable (default: $ADED_ADMIN_KEY)."),
    allowed_origin: list[str] = typer.Option([], "--allowed-origin",
                                             help="Web origin whose browser requests are served; repeatable; * allows any."),
    allowed_host: list[str] = typer.Option([], "--allowed-host",
                                           help="Host name (HOST or HOST:PORT) accepted besides the bound address and "
                                                "loopback names; repeatable; * turns the check off."),
    state_per: str = typer.Option("shared", "--state-per",
                                  help="Learned state shared by all, per API key (key), or per request cache_salt (salt)."),
    max_tenants: int = typer.Option(64, "--max-tenants", min=1, help="Tenants' learned states kept in memory."),
    aded_stats: bool | None = typer.Option(None, "--aded-stats/--no-aded-stats",
                                              help="Include the `aded` statistics in responses (default: on, off when "
                                                   "API keys are set and state is shared)."),
    parse_threads: int = typer.Option(2, "--parse-threads", min=1, help="Threads that parse and tokenize request bodies."),
    served_name: str | None = typer.Option(None, "--served-model-name",
                                              help="Model id clients use (default: --model, or a folder's name)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (transformers backend)."),
    backend: str = typer.Option("auto", "--backend", help="auto (llama.cpp for GGUF files when installed), hf, or llama.cpp."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (default: physical cores)."),
    budget: str = typer.Option("measured", "--budget", help="measured, typical or off."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests queued or running before 429."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1024, help="Largest request body."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.1,
                                       help="Seconds a request's body may take to arrive (then 408)."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.1,
                                         help="Seconds a request's headers may take to arrive (then the connection closes)."),
    shutdown_timeout: float = typer.Option(3.0, "--shutdown-timeout", min=0.1,
                                           help="Seconds open connections get after SIGTERM before the server exits."),
    max_tokens: int = typer.Option(256, "--default-max-tokens", min=1, help="max_tokens when a request gives none."),
    max_draft_nodes: int = NodesOpt,
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, ...)."""
    try:
        import uvicorn  # noqa: F401  (the server extra: said here, before anything loads)

        from aded.server.app import ServerConfig, create_app
        from aded.server.run import serve
    except ModuleNotFoundError as exc:
        raise ValueError(f"`aded serve` needs {exc.name}; install it with: pip install 'aded[server]'") from exc
    from aded.api import load

    levels = {"debug", "info", "warning", "error"}
    if log_level not in levels:
        raise ValueError(f"--log-level must be one of {', '.join(sorted(levels))}, got {log_level!r}")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = served_name or (Path(model).name if Path(model).exists() else model)
    config = ServerConfig(model_name=name, state_path=state, save_interval=save_interval, max_queue=max_queue,
                          max_body_bytes=max_body_bytes, default_max_tokens=max_tokens,
                          max_draft_nodes=max_draft_nodes, api_keys=tuple(api_key), admin_keys=tuple(admin_key),
                          allowed_origins=tuple(allowed_origin), allowed_hosts=tuple(allowed_host),
                          state_per=state_per, max_tenants=max_tenants, aded_stats=aded_stats,
                          parse_threads=parse_threads, body_timeout=body_timeout, header_timeout=header_timeout,
                          shutdown_timeout=shutdown_timeout).resolved()  # bad settings fail before loading
    lm = load(model, drafter=drafter, dtype=dtype, budget=budget, backend=backend,
              threads=threads)  # fail before binding the port
    app = create_app(lm, config)
    if host not in ("127.0.0.1", "localhost", "::1") and not (config.api_keys or config.admin_keys):
        logging.getLogger("aded.server").warning("binding %s without --api-key: the API has no authentication", host)
    serve(app, host, port, log_level)
