"""The HTTP API's former home, kept so that ``from bitdelta.serving.api import ...`` keeps working.

The app now lives in :mod:`bitdelta.serving.http` (one module per concern); import from there.
"""

from .http.app import create_app
from .http.auth import bearer_token, check_in_scope, key_scope, load_api_keys
from .http.errors import ApiError, error_body
from .http.openai_routes import MAX_CHARS_PER_TOKEN, THREAD_ENCODE_CHARS
from .http.schemas import ChatBody, CompletionBody, DeltaBody, Message
from .http.server_config import ServerConfig

__all__ = ["MAX_CHARS_PER_TOKEN", "THREAD_ENCODE_CHARS", "ApiError", "ChatBody", "CompletionBody", "DeltaBody",
           "Message", "ServerConfig", "bearer_token", "check_in_scope", "create_app", "error_body", "key_scope",
           "load_api_keys"]
