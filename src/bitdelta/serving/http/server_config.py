"""ServerConfig: the HTTP server's own settings (who may call what), beside the engine's.

    ServerConfig(api_keys={"sk-a": {"zephyr"}, "sk-ops": {"*"}}, admin_key="adm",
                 allow_runtime_deltas=True, delta_dir="deltas")
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    api_keys: dict[str, set[str]] | None = None  # key -> allowed model names ("*" = all); None: no key needed
    admin_key: str | None = None
    allow_runtime_deltas: bool = False
    delta_dir: str | None = None  # allow-list for runtime registration
    request_timeout_s: float = 600.0
