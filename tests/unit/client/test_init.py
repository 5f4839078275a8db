"""``cp_token.client``'s package: the errors and ``FetchedToken`` load with it, the httpx-based
names on first use (PEP 562), so the sidecar, which uses only the former, never loads httpx."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cp_token.client
from cp_token.client import TokenError


def test_every_public_name_resolves_and_is_kept() -> None:
    for name in cp_token.client.__all__:
        value = getattr(cp_token.client, name)
        assert value is getattr(cp_token.client, name)
        assert name in vars(cp_token.client)  # resolved once, then a plain attribute
    assert cp_token.client.TokenError is TokenError


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        cp_token.client.NotAThing


def test_httpx_is_loaded_on_first_use_only() -> None:
    code = (
        "import sys\n"
        "from cp_token.client import FetchedToken, TokenError, TokenRejected, TokenUnavailable\n"
        "before = 'httpx' in sys.modules\n"
        "import cp_token.client\n"
        "cp_token.client.TokenSource\n"
        "print(before, 'httpx' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]
