"""One tenant-name rule (bitdelta.serving.names) wherever a name arrives: registration, the admin
route, the delta store and the Ray ingress."""

from __future__ import annotations

import pytest

from bitdelta.errors import BitDeltaError
from bitdelta.serving import store
from bitdelta.serving.names import MAX_NAME_CHARS, check_tenant_name, is_tenant_name

httpx = pytest.importorskip("httpx")  # an optional extra (bitdelta[test])

GOOD = ["zephyr", "team-a/zephyr", "org/team/m-1.5:q4@v2", "A_b", "x" * MAX_NAME_CHARS]
BAD = ["", "../etc", "a/../b", ".hidden", "a//b", "a/", "/a", "x" * (MAX_NAME_CHARS + 1), "sp ace", "a/.git",
       "zephyr\n", "naïve", None, 7]


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass_unchanged(name):
    assert is_tenant_name(name) and check_tenant_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_with_what_a_name_may_contain(name):
    assert not is_tenant_name(name)
    with pytest.raises(BitDeltaError, match=r"invalid model name .*letters, digits and \. _ - : @"):
        check_tenant_name(name)


def test_the_store_checks_names_by_the_same_rule(tmp_path):
    assert store.check_name is check_tenant_name
    with pytest.raises(BitDeltaError, match="invalid model name"):
        store.DeltaStore(str(tmp_path)).fetch("a/../b")


def test_the_ray_ingress_checks_names_by_the_same_rule():
    pytest.importorskip("ray")
    from bitdelta.serving.ray import ingress

    assert ingress.check_tenant_name is check_tenant_name


@pytest.mark.parametrize("name", ["a/../b", "a//b", "zephyr\n"])
def test_registration_refuses_what_the_store_refuses(server, delta_dir, name):
    # the runtime used to allow these ("/" anywhere): a store could never hold them
    with pytest.raises(BitDeltaError, match="invalid model name"):
        server.runtime.register(name, str(delta_dir / "shakespeare"))
    assert name not in server.runtime.models()


def test_admin_route_answers_400_naming_the_name_field(server):
    r = httpx.post(server.url + "/v1/deltas", json={"name": "team/../x", "path": "shakespeare"},
                   headers={"Authorization": "Bearer adm"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_value", "name") and "invalid model name" in err["message"]
    assert "team/../x" not in {m["id"] for m in httpx.get(server.url + "/v1/models", timeout=60).json()["data"]}
