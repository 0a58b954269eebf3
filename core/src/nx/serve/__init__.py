"""``nx serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `nx.Engine`.

`create_app(engine, model_name)` builds the ASGI app without starting anything; the ``nx serve``
command loads and compiles the model, then runs the app with uvicorn.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    """`create_app` on first use: importing ``nx.serve.text`` (the CLI's detokenizer) should not
    import FastAPI."""
    if name == "create_app":
        from nx.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'nx.serve' has no attribute {name!r}")
