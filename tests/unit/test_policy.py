"""May this identity have a token? The ServiceAccount pattern, namespaces, pod binding and
the labels of the ServiceAccount and its namespace."""

from __future__ import annotations

import pytest

from cp_token.errors import Forbidden
from cp_token.identity import POD_NAME_KEY, POD_UID_KEY, Identity
from cp_token.policy import RunnerPolicy, glob_match

MANAGED = ("ambient-code.io/managed-by", "ambient-control-plane")
NS_MANAGED = ("ambient-code.io/managed", "true")
BOUND = {POD_NAME_KEY: ("runner",), POD_UID_KEY: ("uid-1",)}


def ident(username: str, bound: bool = True) -> Identity:
    return Identity(username=username, extra=BOUND if bound else {})


@pytest.mark.parametrize(
    ("username", "bound", "reason"),
    [
        ("alice", True, "not_service_account"),
        ("system:serviceaccount:ns:default", True, "sa_not_allowed"),
        ("system:serviceaccount:session-1:session-x-sa", False, "not_pod_bound"),
        ("system:serviceaccount:kube-system:session-x-sa", True, "namespace_not_allowed"),
    ],
)
def test_identity_rules(username: str, bound: bool, reason: str) -> None:
    policy = RunnerPolicy(allowed_namespaces=("session-*", "team-*"))
    with pytest.raises(Forbidden) as info:
        policy.check_identity(ident(username, bound))
    assert info.value.reason == reason


def test_allowed_runner_passes_and_bound_can_be_disabled() -> None:
    RunnerPolicy().check_identity(ident("system:serviceaccount:ns:session-x-sa"))
    RunnerPolicy(require_bound=False).check_identity(
        ident("system:serviceaccount:ns:session-x-sa", bound=False)
    )


def test_label_rules() -> None:
    policy = RunnerPolicy(managed_label=MANAGED, namespace_label=NS_MANAGED)
    i = ident("system:serviceaccount:ns:session-x-sa")
    good_ns = {"ambient-code.io/managed": "true"}
    good_sa = {"ambient-code.io/managed-by": "ambient-control-plane"}
    policy.check_labels(i, good_ns, good_sa)
    for ns_labels, sa_labels, reason in [
        (None, good_sa, "namespace_not_managed"),
        ({}, good_sa, "namespace_not_managed"),
        ({"ambient-code.io/managed": "false"}, good_sa, "namespace_not_managed"),
        (good_ns, None, "sa_not_managed"),
        (good_ns, {"ambient-code.io/managed-by": "someone-else"}, "sa_not_managed"),
    ]:
        with pytest.raises(Forbidden) as info:
            policy.check_labels(i, ns_labels, sa_labels)
        assert info.value.reason == reason


@pytest.mark.parametrize(
    ("name", "admitted"),
    [
        ("session-abc-sa", True),
        ("session---sa", True),  # the id is "-": not empty
        ("session--sa", False),
        ("session-sa", False),
    ],
)
def test_empty_session_id_is_never_admitted(name: str, admitted: bool) -> None:
    identity = Identity(f"system:serviceaccount:ns:{name}", extra=BOUND)
    for policy in (RunnerPolicy(), RunnerPolicy(allowed_sa="system:serviceaccount:*:*")):
        if admitted:
            policy.check_identity(identity)
            assert identity.session_id
        else:
            with pytest.raises(Forbidden) as info:
                policy.check_identity(identity)
            assert info.value.reason == "sa_not_allowed"
            if name == "session--sa":  # the reason, not a pattern it does match
                assert "empty session id" in info.value.description


def test_a_line_break_in_the_session_id_is_refused_for_what_it_is() -> None:
    identity = Identity("system:serviceaccount:ns:session-a\nb-sa", extra=BOUND)
    with pytest.raises(Forbidden) as info:
        RunnerPolicy().check_identity(identity)
    assert info.value.reason == "sa_not_allowed"
    assert "invalid session id" in info.value.description  # not "empty": it is not


def test_glob_is_fnmatch_with_a_non_empty_star() -> None:
    assert glob_match("team-a", "team-*") and not glob_match("team-", "team-*")
    assert glob_match("a]d", "a[]]d") and glob_match("axd", "a[!bc]d")
    assert not glob_match("abd", "a[!bc]d") and glob_match("a.c", "a?c")
    assert not glob_match("abc", "a.c")  # a dot is a dot, not a regex
