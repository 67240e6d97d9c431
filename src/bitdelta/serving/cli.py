"""``bitdelta serve``: argument parsing and the :func:`serve` function it calls.

    bitdelta serve --base models/tiny/base --delta shakespeare=deltas/shakespeare --delta gsm8k=deltas/gsm8k
    bitdelta serve --base BASE --delta-dir deltas/ --api-keys keys.toml --host 0.0.0.0 --port 8000
    bitdelta serve --ray --base BASE --delta-store s3://bucket/deltas --replicas 4 --gpus-per-replica 1

Everything that can be checked without the base model is checked before it loads (numbers by
argparse; the API-key file, the --delta paths, the --delta-dir), so a typo costs no start-up time.
A bad artifact in --delta-dir is logged and skipped; a bad --delta stops the start.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
from pathlib import Path

from ..cli_options import add_base, add_quiet, float_range, int_range
from ..errors import BitDeltaError
from .config import EngineConfig

logger = logging.getLogger("bitdelta.serve")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_deltas(values) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise BitDeltaError(f"--delta expects NAME=PATH (got {v!r})")
        if name in out:
            raise BitDeltaError(f"--delta name {name!r} given twice")
        out[name] = path
    return out


def _check_startup_delta(name: str, path: str) -> None:
    """A ``--delta NAME=PATH`` must name an artifact before the base loads: an existing directory with a
    readable ``delta_config.json``, or (``org/name``) a hub id that can be fetched."""
    from ..artifact import read_config
    from ..sources import resolve_model_dir

    local = Path(path).expanduser()
    if not local.exists():
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise BitDeltaError(f"--delta {name}={path}: no such artifact directory")
        try:  # an org/name hub id; load_delta finds it in the local cache afterwards
            local, _ = resolve_model_dir(path)
        except BitDeltaError as e:
            raise BitDeltaError(f"--delta {name}={path}: no such artifact directory, and {e}") from None
    if not local.is_dir():
        raise BitDeltaError(f"--delta {name}={path}: not a directory (an artifact is a directory with "
                            "delta_config.json)")
    read_config(local)


def _check_bind(host: str, port: int) -> None:
    """Fails now, in one line, if ``host:port`` cannot be listened on (in use, not an address of this
    machine), rather than after the base has loaded, when the HTTP server would exit on it."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise BitDeltaError(f"--host {host}: cannot resolve it ({e.strerror or e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
        try:
            sock.bind(address)
        except OSError as e:
            raise BitDeltaError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host"
                                ) from None


def _reason(e: Exception) -> str:
    """One line saying why an artifact was skipped (its type too, when it is not one of our errors)."""
    msg = " ".join(str(e).split())
    return msg if isinstance(e, BitDeltaError) else f"{type(e).__name__}: {msg}"


def scan_delta_dir(delta_dir) -> dict[str, str]:
    """Artifact directories (with ``delta_config.json``) directly under ``delta_dir``, by directory name."""
    root = Path(delta_dir)
    if not root.is_dir():
        raise BitDeltaError(f"--delta-dir {delta_dir} is not a directory")
    return {p.name: str(p) for p in sorted(root.iterdir()) if (p / "delta_config.json").is_file()}


def build_app(args):
    """The runtime and FastAPI app for parsed ``serve`` arguments (no network yet)."""
    from .http.app import create_app
    from .http.auth import load_api_keys
    from .http.server_config import ServerConfig
    from .runtime import build_runtime

    # everything checkable without the base first, so a mistake fails in a second, not after loading it
    deltas = _parse_deltas(args.delta)
    api_keys = load_api_keys(args.api_keys) if args.api_keys else None
    if args.allow_runtime_deltas and not args.admin_key:
        raise BitDeltaError("--allow-runtime-deltas needs --admin-key KEY (admin endpoints are never open)")
    for name, path in deltas.items():
        _check_startup_delta(name, path)
    scanned = scan_delta_dir(args.delta_dir) if args.delta_dir else {}
    if args.allow_runtime_deltas:
        logger.warning("runtime delta registration is enabled: holders of the admin key can load artifacts from %s",
                       args.delta_dir or "(no --delta-dir: nothing can be registered)")
    rt = build_runtime(args.base, deltas, base_name=args.base_name, config=EngineConfig.from_args(args))
    # every artifact in the allow-listed directory is served under its directory name; one that fails
    # to load for any reason (corrupt, wrong base, unreadable) is logged and skipped, the rest serve
    for name, path in scanned.items():
        if rt.has(name):
            continue
        try:
            rt.register(name, path, root=args.delta_dir)  # its files may not point outside the allow-listed dir
        except Exception as e:
            logger.error("skipping %s: %s", path, _reason(e))
    cfg = ServerConfig(api_keys=api_keys, admin_key=args.admin_key, allow_runtime_deltas=args.allow_runtime_deltas,
                       delta_dir=args.delta_dir)
    return rt, create_app(rt, cfg)


def ray_settings(args):
    """:class:`~bitdelta.serving.ray.settings.RaySettings` for parsed ``serve --ray`` arguments."""
    from .ray.settings import RaySettings

    if args.delta:
        raise BitDeltaError("--delta is not used with --ray: replicas load deltas on demand from --delta-store "
                            "(a directory or URL holding one artifact directory per model name)")
    if args.allow_runtime_deltas:
        raise BitDeltaError("--allow-runtime-deltas is not used with --ray: add artifacts to --delta-store instead")
    store = args.delta_store or args.delta_dir
    if not store:
        raise BitDeltaError("--ray needs --delta-store DIR_OR_URL (e.g. deltas/ or s3://bucket/deltas)")
    engine = dataclasses.asdict(EngineConfig.from_args(args))
    return RaySettings(base=args.base, store=store, base_name=args.base_name, replicas=args.replicas,
                       gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                       deltas_per_replica=args.deltas_per_replica, cache_dir=args.cache_dir,
                       api_keys_file=args.api_keys, **engine)


def cmd_serve_ray(args) -> None:
    from .http.auth import load_api_keys
    from .ray.deployment import run

    settings = ray_settings(args)
    if args.api_keys:
        load_api_keys(args.api_keys)  # a bad key file fails here, before a Ray cluster is started or joined
    if not args.api_keys and not _is_loopback(args.host):
        logger.warning("binding to %s without --api-keys: anyone who can reach this address can use every model",
                       args.host)
    run(settings, host=args.host, port=args.port, address=args.ray_address)


def cmd_serve(args) -> None:
    import uvicorn

    from ..cli_checks import check_device

    if args.config:  # engine settings from a file; flags given on the command line win
        EngineConfig.apply_settings_file(args, args.config, getattr(args, "given_options", frozenset()))
    if args.ray:
        return cmd_serve_ray(args)
    check_device(args.device)
    _check_bind(args.host, args.port)
    if not args.api_keys and not _is_loopback(args.host):
        logger.warning("binding to %s without --api-keys: anyone who can reach this address can use every model",
                       args.host)
    rt, app = build_app(args)
    print(f"serving {rt.base_name!r} + {len(rt.models()) - 1} deltas ({', '.join(rt.models()[1:]) or 'none'}) "
          f"on http://{args.host}:{args.port}\n{rt.plan()}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        rt.shutdown()


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve the base and many deltas over an OpenAI-compatible HTTP API")
    add_base(s)
    s.add_argument("--delta", action="append", metavar="NAME=PATH", help="serve an artifact under NAME (repeatable)")
    s.add_argument("--delta-dir", default=None,
                   help="allow-listed directory: its artifacts are served by directory name, and runtime registration "
                        "may only use paths inside it")
    s.add_argument("--base-name", default=None, help="model name of the plain base (default: its directory name)")
    EngineConfig.add_arguments(s)  # --max-gpu-deltas ... --engine-restart: one declaration (serving/config.py)
    s.add_argument("--config", default=None, metavar="FILE",
                   help="engine settings file (.yaml/.yml/.toml; keys as the flags above: max_batch: 16); flags "
                        "given explicitly override it")
    s.add_argument("--api-keys", default=None, help='TOML file: [keys] "sk-..." = ["model", ...] ("*" = all)')
    s.add_argument("--admin-key", default=None, help="bearer key of the admin endpoints")
    s.add_argument("--allow-runtime-deltas", action="store_true",
                   help="enable POST/DELETE /v1/deltas (needs --admin-key)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int_range(0, 65535), default=8000, help="TCP port (default 8000; 0: any free one)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the HTTP server's log level (default info)")
    add_quiet(s)
    r = s.add_argument_group("scale-out on Ray Serve (install bitdelta[ray]; see docs/scale_out.md)")
    r.add_argument("--ray", action="store_true", help="deploy engine replicas on Ray Serve, routed by tenant")
    r.add_argument("--replicas", type=int_range(1), default=None,
                   help="engine replicas (default: one per GPU of the cluster)")
    r.add_argument("--gpus-per-replica", type=float_range(0, 1), default=None,
                   help="GPUs per replica, at most 1 (default: 1 if the cluster has GPUs, else 0)")
    r.add_argument("--cpus-per-replica", type=float_range(0), default=1.0,
                   help="CPUs Ray reserves per replica (default 1)")
    r.add_argument("--deltas-per-replica", type=int_range(1), default=None,
                   help="tenants a replica holds before evicting the least recently used (default: --max-gpu-deltas)")
    r.add_argument("--delta-store", default=None,
                   help="directory or fsspec URL (s3://, gs://, file://) with one artifact per model name "
                        "(default: --delta-dir)")
    r.add_argument("--cache-dir", default=None, help="local directory for artifacts copied from a URL store")
    r.add_argument("--ray-address", default=None,
                   help="Ray cluster to join, e.g. auto or HEAD_IP:6379 (default: $RAY_ADDRESS, else a local one)")
    s.set_defaults(func=cmd_serve)
    return s
