"""``nx serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `nx.Engine`.

`create_app(engine, model_name)` builds the ASGI app without starting anything; the ``nx serve``
command loads and compiles the model, then runs the app with uvicorn.
"""

from __future__ import annotations

from nx.serve.app import create_app

__all__ = ["create_app"]
