"""Tenant names: the one rule for what a served delta may be called, wherever a name arrives.

A name is what clients put in ``model``, what ``POST /v1/deltas`` registers, what the Ray ingress
routes by and the directory a delta store keeps the artifact in (``<root>/<name>``), so the same
check guards all of them: ``/``-separated parts (``team-a/zephyr``) of letters, digits and
``. _ - : @``, none empty and none starting with a dot (a name can never climb out of a store
root or hide a file), at most ``MAX_NAME_CHARS`` characters. Plain ``re``, no torch: the Ray
ingress imports it.

    check_tenant_name("team-a/zephyr")   # returns the name
    check_tenant_name("a/../b")          # raises BitDeltaError saying what a name may contain
"""

from __future__ import annotations

import re

from ..errors import BitDeltaError

MAX_NAME_CHARS = 128
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")


def is_tenant_name(name) -> bool:
    """Whether ``name`` may name a tenant (see the module docstring for the rule)."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        return False
    # fullmatch, not match with "$": "$" also matches before a trailing newline
    return all(_PART.fullmatch(part) for part in name.split("/"))


def check_tenant_name(name) -> str:
    """``name`` if it may name a tenant; else a :class:`BitDeltaError` that says what a name may contain."""
    if not is_tenant_name(name):
        raise BitDeltaError(f"invalid model name {name!r}: use letters, digits and . _ - : @ with / between parts "
                            f"(no part may start with a dot; max {MAX_NAME_CHARS} characters)")
    return name
