"""Static dev identities (``CP_TOKEN_AUTHN=static``): the file's shape, every mistake refused
with its place in the file, tokens held only as hashes, and a changed file read again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cp_token.authn.static import StaticReviewer, parse_identities
from cp_token.errors import Unauthenticated
from cp_token.identity import POD_NAME_KEY, token_hash
from cp_token.runtime.errors import ConfigError
from cp_token.runtime.filewatch import WatchedFile

RUNNER = "system:serviceaccount:session-a:session-abc-sa"


def doc(*identities: object) -> bytes:
    return json.dumps({"identities": list(identities)}).encode()


def test_an_identity_with_extra_groups_and_uid() -> None:
    parsed = parse_identities(
        doc(
            {
                "token": "t1",
                "username": RUNNER,
                "uid": "u-1",
                "groups": ["system:serviceaccounts", 7],
                "extra": {POD_NAME_KEY: ["runner-abc"], "single": "value"},
            }
        )
    )
    assert list(parsed) == [token_hash("t1")]  # keyed by hash: the token is not kept
    identity = parsed[token_hash("t1")]
    assert (identity.username, identity.uid) == (RUNNER, "u-1")
    assert identity.groups == ("system:serviceaccounts", "7")
    assert identity.extra == {POD_NAME_KEY: ("runner-abc",), "single": ("value",)}
    assert identity.pod_name == "runner-abc" and not identity.pod_bound  # no pod uid


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", 'expected {"identities": [...]}'),
        (b'{"identities": {}}', 'expected {"identities": [...]}'),
        (doc("x"), "identities[0] is not an object"),
        (doc({"token": "", "username": RUNNER}), "identities[0] needs a non-empty token"),
        (doc({"token": "t", "username": RUNNER}, {"token": "u"}), "identities[1] needs"),
        (doc({"token": 5, "username": RUNNER}), "identities[0] needs"),
        (doc({"token": "t", "username": RUNNER, "extra": ["x"]}), "identities[0].extra is not"),
    ],
)
def test_a_bad_file_says_where(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_identities(raw)


async def test_the_reviewer_knows_the_file_s_tokens_and_reads_it_again(tmp_path: Path) -> None:
    path = tmp_path / "ids.json"
    path.write_bytes(doc({"token": "t1", "username": RUNNER}))
    reviewer = StaticReviewer(
        WatchedFile("CP_TOKEN_STATIC_IDENTITIES_FILE", str(path), parse_identities)
    )
    assert (await reviewer.review("t1")).username == RUNNER
    with pytest.raises(Unauthenticated) as info:
        await reviewer.review("t2")
    assert info.value.reason == "not_authenticated" and "t2" not in info.value.description
    path.write_bytes(doc({"token": "t2", "username": RUNNER}))
    watched = reviewer._identities
    assert watched.check()  # the watcher's poll: new content, new identities
    assert (await reviewer.review("t2")).username == RUNNER
    with pytest.raises(Unauthenticated):
        await reviewer.review("t1")
    await reviewer.aclose()


def test_an_unreadable_file_names_its_variable(tmp_path: Path) -> None:
    path = tmp_path / "ids.json"
    path.write_bytes(b"[]")
    with pytest.raises(ConfigError) as info:
        WatchedFile("CP_TOKEN_STATIC_IDENTITIES_FILE", str(path), parse_identities)
    assert info.value.variable == "CP_TOKEN_STATIC_IDENTITIES_FILE"
    assert "identities" in str(info.value)
