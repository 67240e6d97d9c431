"""What the light parts of serving import: the Ray ingress, the delta store and tenant names load
neither torch nor the engine (each checked in a fresh interpreter, since this one has both loaded);
the old import paths still give the same objects."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


NO_TORCH = "assert 'torch' not in sys.modules and 'bitdelta.serving.engine' not in sys.modules"


@pytest.mark.slow  # imports Ray in a fresh interpreter
def test_ray_ingress_imports_no_torch_and_no_engine():
    pytest.importorskip("ray")
    r = _fresh_python(f"import bitdelta.serving.ray.ingress, sys; {NO_TORCH}")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("module", ["bitdelta.serving.store", "bitdelta.serving.names", "bitdelta.serving.http.auth",
                                    "bitdelta.serving.http.errors", "bitdelta.serving.ray.settings"])
def test_light_modules_import_no_torch_and_no_engine(module):
    r = _fresh_python(f"import {module}, sys; {NO_TORCH}")
    assert r.returncode == 0, r.stderr


@pytest.mark.slow  # imports torch in a fresh interpreter
def test_package_names_still_resolve_to_what_they_named():
    # torch-heavy names load on first use; the submodules called like their function (compress,
    # apply) must not replace the function once they are imported
    r = _fresh_python(
        "import sys, types, bitdelta\n"
        "assert 'torch' not in sys.modules\n"
        "import bitdelta.compress, bitdelta.apply\n"
        "assert isinstance(bitdelta.compress, types.FunctionType)\n"
        "assert bitdelta.compress.__module__ == 'bitdelta.compress'\n"
        "assert isinstance(bitdelta.apply, types.FunctionType) and bitdelta.apply.__module__ == 'bitdelta.apply'\n"
        "from bitdelta import Delta, merge, pack_signs\n"
        "assert Delta.__module__ == 'bitdelta.delta' and merge is bitdelta.merge\n"
        "assert bitdelta.pack.pack_signs is pack_signs  # a submodule is reachable as an attribute\n"
        "import bitdelta.serving as s\n"
        "assert 'bitdelta.serving.engine' not in sys.modules\n"
        "assert s.Engine.__module__ == 'bitdelta.serving.engine'\n"
        "assert s.build_runtime.__module__ == 'bitdelta.serving.runtime'\n"
    )
    assert r.returncode == 0, r.stderr


def test_unknown_package_attribute_is_an_attribute_error():
    import bitdelta
    import bitdelta.serving

    for package in (bitdelta, bitdelta.serving):
        with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
            _ = package.no_such_thing


def test_old_import_paths_give_the_same_objects():
    from bitdelta.serving import api, ray_serve
    from bitdelta.serving.http import app, auth, errors, schemas, server_config
    from bitdelta.serving.ray import deployment, settings

    assert api.create_app is app.create_app and api.ServerConfig is server_config.ServerConfig
    assert api.ApiError is errors.ApiError and api.error_body is errors.error_body
    assert (api.load_api_keys, api.key_scope, api.check_in_scope, api.bearer_token) == (
        auth.load_api_keys, auth.key_scope, auth.check_in_scope, auth.bearer_token)
    assert api.CompletionBody is schemas.CompletionBody and api.ChatBody is schemas.ChatBody
    assert ray_serve.RaySettings is settings.RaySettings and ray_serve.app_builder is deployment.app_builder
    assert ray_serve.run is deployment.run and ray_serve.build_app is deployment.build_app
