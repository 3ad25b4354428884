"""The local web page and JSON API (`python -m ghostvis_jax.serve --checkpoint CKPT`); see server.py."""

from ghostvis_jax.serve.requests import Limits, RequestError, parse_chat
from ghostvis_jax.serve.server import main, make_server

__all__ = ["Limits", "RequestError", "main", "make_server", "parse_chat"]
