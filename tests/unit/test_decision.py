"""The one decision behind both doors, with recording collaborators: the pipeline's order
(authenticate, rate limit, the identity rules, the label reads, mint), where each refusal
stops it, what the trace learns on the way, the remembered policy verdicts, the options
passed to the minter only when asked, and the Kubernetes deadline of the label reads."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from cp_token.decision import MAX_VERDICTS, TokenAsk, TokenDecision, Trace
from cp_token.errors import Forbidden, RateLimited, Unauthenticated
from cp_token.identity import POD_NAME_KEY, POD_UID_KEY, Identity
from cp_token.minters import DEFAULT_OPTIONS, IssuedToken, MintOptions
from cp_token.policy import RunnerPolicy
from cp_token.ratelimit import RateLimiter
from cp_token.runtime.clock import FakeClock

RUNNER = "system:serviceaccount:session-a:session-abc-sa"
BOUND = {POD_NAME_KEY: ("runner-abc",), POD_UID_KEY: ("uid-1",)}
MANAGED = ("ambient-code.io/managed-by", "ambient-control-plane")
NS_MANAGED = ("ambient-code.io/managed", "true")


class Steps:
    """Every collaborator, recording what was called, in order."""

    def __init__(self, identities: Mapping[str, Identity]) -> None:
        self.log: list[str] = []
        self.identities = identities
        self.peers: list[str | None] = []
        self.deadlines: list[float | None] = []
        self.mint_args: list[tuple[Any, ...]] = []
        self.ns_labels: Mapping[str, str] | None = {NS_MANAGED[0]: NS_MANAGED[1]}
        self.sa_labels: Mapping[str, str] | None = {MANAGED[0]: MANAGED[1]}

    # the authenticator
    async def authenticate(self, token: str, *, peer: str | None = None) -> Identity:
        self.log.append("authenticate")
        self.peers.append(peer)
        if token not in self.identities:
            raise Unauthenticated("unknown token", reason="not_authenticated")
        return self.identities[token]

    async def aclose(self) -> None:
        pass

    # the object cache
    async def namespace_labels(
        self, name: str, deadline: float | None = None
    ) -> Mapping[str, str] | None:
        self.log.append(f"namespace_labels {name}")
        self.deadlines.append(deadline)
        return self.ns_labels

    async def service_account_labels(
        self, namespace: str, name: str, deadline: float | None = None
    ) -> Mapping[str, str] | None:
        self.log.append(f"service_account_labels {namespace}/{name}")
        self.deadlines.append(deadline)
        return self.sa_labels

    # the minter (positional options, as the protocol has them)
    async def mint(self, identity: Identity, *options: MintOptions) -> IssuedToken:
        self.log.append("mint")
        self.mint_args.append(options)
        return IssuedToken(f"api-token-for-{identity.username}", 1.0, "jti-1")

    async def run(self) -> None:
        pass

    problem = None


class RecordingPolicy(RunnerPolicy):
    """The real policy, logging its two checks into ``steps``."""

    def __init__(self, steps: Steps, **kw: Any) -> None:
        super().__init__(**kw)
        self._steps = steps
        self.identity_checks = 0

    def check_identity(self, identity: Identity) -> None:
        self.identity_checks += 1
        self._steps.log.append("check_identity")
        super().check_identity(identity)

    def check_labels(
        self,
        identity: Identity,
        ns_labels: Mapping[str, str] | None,
        sa_labels: Mapping[str, str] | None,
    ) -> None:
        self._steps.log.append("check_labels")
        super().check_labels(identity, ns_labels, sa_labels)


class RecordingLimiter(RateLimiter):
    def __init__(self, steps: Steps, burst: int = 20) -> None:
        super().__init__(rate=1.0, burst=burst, clock=FakeClock())
        self._steps = steps

    def check(self, key: str) -> None:
        self._steps.log.append(f"rate_limit {key}")
        super().check(key)


def decision(
    steps: Steps, *, labels: bool = True, objects: bool = True, burst: int = 20
) -> tuple[TokenDecision, RecordingPolicy]:
    kw: dict[str, Any] = {"managed_label": MANAGED, "namespace_label": NS_MANAGED} if labels else {}
    policy = RecordingPolicy(steps, **kw)
    made = TokenDecision(
        authenticator=steps,
        policy=policy,
        minter=steps,
        limiter=RecordingLimiter(steps, burst),
        objects=steps if objects else None,  # type: ignore[arg-type]
        answer_within=12.0,
    )
    return made, policy


@pytest.fixture
def steps() -> Steps:
    return Steps(
        {
            "good": Identity(RUNNER, extra=BOUND),
            "default": Identity("system:serviceaccount:session-a:default", extra=BOUND),
        }
    )


async def test_the_pipeline_runs_in_one_order_and_the_trace_learns_as_it_goes(
    steps: Steps,
) -> None:
    made, _ = decision(steps)
    trace = Trace(peer="10.0.0.7")
    issued = await made.decide(TokenAsk("good"), trace)
    assert steps.log == [
        "authenticate",
        f"rate_limit {RUNNER}",
        "check_identity",
        "namespace_labels session-a",
        "service_account_labels session-a/session-abc-sa",
        "check_labels",
        "mint",
    ]
    assert steps.peers == ["10.0.0.7"]  # the door's peer reaches the authenticator
    assert trace.identity is not None and trace.identity.username == RUNNER
    assert trace.issued is issued and issued.token == f"api-token-for-{RUNNER}"


async def test_an_unauthenticated_caller_costs_nothing_further(steps: Steps) -> None:
    made, _ = decision(steps)
    trace = Trace()
    with pytest.raises(Unauthenticated):
        await made.decide(TokenAsk("forged"), trace)
    assert steps.log == ["authenticate"]
    assert trace.identity is None and trace.issued is None


async def test_the_rate_limit_comes_before_any_policy_read_or_mint(steps: Steps) -> None:
    made, _ = decision(steps, burst=1)
    await made.decide(TokenAsk("good"), Trace())
    steps.log.clear()
    trace = Trace()
    with pytest.raises(RateLimited):
        await made.decide(TokenAsk("good"), trace)
    assert steps.log == ["authenticate", f"rate_limit {RUNNER}"]
    assert trace.identity is not None and trace.issued is None  # the audit line names who


async def test_a_refused_identity_reads_no_labels_and_mints_nothing(steps: Steps) -> None:
    made, _ = decision(steps)
    with pytest.raises(Forbidden) as info:
        await made.decide(TokenAsk("default"), Trace())
    assert info.value.reason == "sa_not_allowed"
    assert "mint" not in steps.log and not any("labels" in s for s in steps.log)


async def test_unmanaged_labels_refuse_before_minting(steps: Steps) -> None:
    made, _ = decision(steps)
    steps.sa_labels = {MANAGED[0]: "someone-else"}
    with pytest.raises(Forbidden) as info:
        await made.decide(TokenAsk("good"), Trace())
    assert info.value.reason == "sa_not_managed"
    assert steps.log[-1] == "check_labels"


@pytest.mark.parametrize(("labels", "objects"), [(False, True), (True, False)])
async def test_no_label_reads_without_label_rules_or_an_object_cache(
    steps: Steps, labels: bool, objects: bool
) -> None:
    made, _ = decision(steps, labels=labels, objects=objects)
    await made.decide(TokenAsk("good"), Trace())
    assert steps.log == ["authenticate", f"rate_limit {RUNNER}", "check_identity", "mint"]


async def test_the_label_reads_share_the_request_s_kubernetes_deadline(steps: Steps) -> None:
    made, _ = decision(steps)
    before = asyncio.get_running_loop().time()
    await made.decide(TokenAsk("good"), Trace())
    after = asyncio.get_running_loop().time()
    assert len(steps.deadlines) == 2 and steps.deadlines[0] == steps.deadlines[1]
    deadline = steps.deadlines[0]
    assert deadline is not None and before + 12.0 <= deadline <= after + 12.0


async def test_verdicts_are_remembered_per_username_and_pod_binding(steps: Steps) -> None:
    made, policy = decision(steps, labels=False)
    for _ in range(3):
        await made.decide(TokenAsk("good"), Trace())
    raised = []
    for _ in range(3):
        with pytest.raises(Forbidden) as info:
            await made.decide(TokenAsk("default"), Trace())
        raised.append(info.value)
    assert policy.identity_checks == 2  # once per (username, pod-bound)
    assert len({id(e) for e in raised}) == 3  # a fresh exception each time
    assert {(e.description, e.reason) for e in raised} == {
        (raised[0].description, "sa_not_allowed")
    }
    steps.identities = {**steps.identities, "unbound": Identity(RUNNER)}
    with pytest.raises(Forbidden) as unbound:
        await made.decide(TokenAsk("unbound"), Trace())
    assert unbound.value.reason == "not_pod_bound" and policy.identity_checks == 3


async def test_the_verdict_memory_is_bounded(steps: Steps) -> None:
    made, policy = decision(steps, labels=False)
    steps.identities = {
        f"t{i}": Identity(f"system:serviceaccount:ns:session-{i}-sa", extra=BOUND)
        for i in range(MAX_VERDICTS + 1)
    }
    for i in range(MAX_VERDICTS + 1):
        await made.decide(TokenAsk(f"t{i}"), Trace())
    assert len(made._verdicts) == 1  # full: every verdict was dropped, then the new one kept
    await made.decide(TokenAsk("t0"), Trace())
    assert policy.identity_checks == MAX_VERDICTS + 2  # t0 was forgotten: checked again


async def test_mint_options_are_passed_only_when_asked(steps: Steps) -> None:
    made, _ = decision(steps, labels=False)
    await made.decide(TokenAsk("good"), Trace())
    narrowed = MintOptions(audiences=("mcp",), scopes=("read",))
    await made.decide(TokenAsk("good", options=narrowed), Trace())
    assert steps.mint_args == [(), (narrowed,)]  # a minter without options keeps working
    assert TokenAsk("x").options is DEFAULT_OPTIONS
