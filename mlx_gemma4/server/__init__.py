"""An OpenAI-compatible local server for one loaded model (``gemma4-serve``).

    from mlx_gemma4.server import Engine, create_app
    engine = Engine(lambda: ChatSession(*load("models/gemma-4-e4b-it-4bit")))  # loads on the model's thread
    app = create_app(engine, model_id="gemma-4-e4b")                           # any ASGI server runs it

``engine.py`` owns the model on one thread, ``requests.py`` checks requests, ``responses.py`` builds answers,
``app.py`` is the HTTP side, ``cli.py`` the command line.
"""

from __future__ import annotations

from .app import create_app
from .engine import Engine
from .body import Limits, RequestError

__all__ = ["Engine", "Limits", "RequestError", "create_app"]
