"""`aded serve`: an OpenAI-compatible HTTP server with speculative decoding on every request.

`create_app` (in `aded.server.app`) needs the `server` extra (fastapi, uvicorn); importing this
package does not, so the CLI can mount `aded serve` and explain what is missing when it is used.
"""

__all__ = ["create_app", "ServerConfig"]


def __getattr__(name: str):
    if name in __all__:
        from aded.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'aded.server' has no attribute {name!r}")
