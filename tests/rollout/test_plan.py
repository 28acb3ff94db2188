"""Rollout plans and operator commands: the codec's strictness, who may sign, and every refusal."""

from __future__ import annotations

import dataclasses
import json
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.identity.signing import canonical_json
from mesh.rollout.plan import (
    MAX_PLAN_BYTES,
    MAX_PLAN_TTL_S,
    MAX_SELECTOR_LABELS,
    MAX_SELECTOR_VALUES,
    MAX_WAVES,
    PPM,
    CommandAction,
    CommandRefused,
    ExpiredCommand,
    ForgedCommand,
    MalformedCommand,
    NotOperatorKey,
    PlanExpiredError,
    PlanFormatError,
    PlanSignatureError,
    PrefetchPolicy,
    ReplayedCommand,
    RolloutCommand,
    RolloutPlan,
    Selector,
    SignedPlan,
    SkipKind,
    UnknownCommandKey,
    Wave,
    WrongRollout,
    expiry,
    format_share,
    parse_share,
    sign_plan,
    skew_check,
    verify_command,
    verify_plan,
)
from tests.rollout.builders import (
    NODE,
    OPERATOR,
    OTHER_SIGNATURE,
    PUBLISHER,
    ROGUE_OPERATOR,
    STRANGER,
    T0,
    TRUSTED,
    command,
    device,
    make_plan,
    signed,
    waves,
)
from tests.strategies import json_values

PLAN = make_plan()


def redo(doc_edit) -> bytes:
    """The signed plan document with `doc_edit` applied to its parsed JSON."""
    doc = json.loads(signed(PLAN).to_json())
    doc_edit(doc)
    return json.dumps(doc).encode()


# --- plan codec --------------------------------------------------------------------------------------


def test_signed_plan_round_trips_and_verifies():
    s = signed(PLAN)
    again = SignedPlan.from_json(s.to_json())
    assert again == s and again.digest == PLAN.digest
    assert verify_plan(again, TRUSTED, now=T0 + 1) == PLAN
    assert len(PLAN.digest) == 64
    # The defaults an operator expects: 1%, 10%, 100% at 5% errors, approval above 10%, prefetch on.
    kept = {
        f.name: getattr(PLAN, f.name)
        for f in dataclasses.fields(PLAN)
        if f.name not in ("waves", "autonomous_scope", "prefetch", "selector")
    }
    default = RolloutPlan(**kept)
    assert [w.label for w in default.waves] == ["1%", "10%", "100%"]
    assert [w.max_error_rate for w in default.waves] == [0.05] * 3
    assert default.autonomous_scope.max_share_ppm == 100_000
    assert default.prefetch is PrefetchPolicy.LOW


def test_default_waves_and_deadline():
    w = Wave(10_000)
    assert (w.soak_s, w.min_requests, w.max_error_rate, w.deadline_s) == (600.0, 100, 0.05, 1200.0)
    plan = dataclasses.replace(PLAN, waves=(Wave(10_000), Wave(100_000), Wave(PPM)))
    assert SignedPlan.from_json(signed(plan).to_json()).plan == plan


def test_needs_approval_above_scope_and_site_limit_only_narrows():
    assert [PLAN.needs_approval(k) for k in (1, 2, 3)] == [False, False, True]  # 10% is within "up to 10%"
    assert [PLAN.needs_approval(k, max_share_ppm=50_000) for k in (1, 2, 3)] == [False, True, True]
    assert [PLAN.needs_approval(k, max_share_ppm=PPM) for k in (1, 2, 3)] == [False, False, True]


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d["plan"].update(extra=1), "unknown field(s) extra"),
        (lambda d: d["plan"].pop("selector"), "missing field(s) selector"),
        (lambda d: d["plan"].update(format=2), "newer than this node understands"),
        (lambda d: d["plan"].update(format=True), "format"),
        (lambda d: d["plan"]["waves"][0].update(soak_s=60.0), "not in canonical form"),
        (lambda d: d["plan"]["waves"].reverse(), "shares must grow"),
        (lambda d: d["plan"]["waves"].pop(), "must be 100%"),
        (lambda d: d["plan"]["waves"][0].update(deadline_s=10), "shorter than soak_s"),
        (lambda d: d["plan"]["waves"][0].update(min_requests=0), "min_requests"),
        (lambda d: d["plan"]["waves"][0].update(max_error_rate=1.5), "max_error_rate"),
        (lambda d: d["plan"]["waves"][0].update(share_ppm=0.5), "share_ppm"),
        (lambda d: d["plan"].update(target_version=d["plan"]["baseline_version"]), "both version"),
        (lambda d: d["plan"].update(model="../etc"), "not allowed"),
        (lambda d: d["plan"].update(expires_at=d["plan"]["created_at"]), "must be positive"),
        (lambda d: d["plan"].update(prefetch="high"), "'low' or 'off'"),
        (lambda d: d["plan"].update(selector={"device_class": ["b", "a"]}), "not in canonical form"),
        (lambda d: d["plan"].update(selector={"device_class": []}), "1 to 16 values"),
        (lambda d: d["plan"]["skew"].update(min_runtime_version="latest"), "look like 2.3.0"),
        (lambda d: d.update(publisher_signature="00"), "publisher_signature"),
    ],
)
def test_malformed_plans_are_refused_naming_the_field(edit, fragment):
    with pytest.raises(PlanFormatError) as info:
        SignedPlan.from_json(redo(edit))
    assert fragment in str(info.value)


def test_duplicate_keys_and_oversized_documents_are_refused():
    text = signed(PLAN).to_json().decode()
    doubled = text.replace('"model":', '"model":"other","model":', 1)
    with pytest.raises(PlanFormatError, match="duplicate key"):
        SignedPlan.from_json(doubled.encode())
    with pytest.raises(PlanFormatError, match="at most"):
        SignedPlan.from_json(b" " * (MAX_PLAN_BYTES + 1))


def test_a_maximal_plan_fits_the_document_bound():
    many = tuple(
        (f"label-{i}" + "x" * 50, tuple(f"value-{j}" + "y" * 54 for j in range(MAX_SELECTOR_VALUES)))
        for i in range(MAX_SELECTOR_LABELS)
    )
    shares = [PPM * (k + 1) // MAX_WAVES for k in range(MAX_WAVES)]
    plan = make_plan(selector=Selector(many), plan_waves=waves(*shares, relative_margin=0.0125))
    document = signed(plan).to_json()
    assert len(document) <= MAX_PLAN_BYTES
    assert SignedPlan.from_json(document).plan == plan


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values())
def test_any_json_is_refused_with_a_plan_error(doc):
    with pytest.raises(PlanFormatError):
        SignedPlan.from_json(json.dumps(doc).encode())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_field_replaced_by_any_json_is_refused_or_parses_to_a_canonical_plan(data):
    doc = json.loads(signed(PLAN).to_json())
    plan_doc = doc["plan"]
    where = data.draw(st.sampled_from(["plan", "wave", "skew", "scope"]))
    target = {
        "plan": plan_doc,
        "wave": plan_doc["waves"][0],
        "skew": plan_doc["skew"],
        "scope": plan_doc["autonomous_scope"],
    }[where]
    key = data.draw(st.sampled_from(sorted(target)))
    target[key] = data.draw(json_values(max_leaves=5))
    try:
        parsed = SignedPlan.from_json(json.dumps(doc).encode())
    except PlanFormatError:
        return
    assert canonical_json(parsed.plan.to_dict()) == canonical_json(plan_doc)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_any_bytes_are_refused_with_a_plan_error(data):
    with pytest.raises(PlanFormatError):
        SignedPlan.from_json(data)


@st.composite
def plans(draw):
    count = draw(st.integers(1, MAX_WAVES))
    inner = sorted(draw(st.sets(st.integers(1, PPM - 1), min_size=count - 1, max_size=count - 1)))
    shares = (*inner, PPM)
    ws = tuple(
        Wave(
            s,
            soak_s=draw(st.one_of(st.integers(1, 86_400), st.floats(1.0, 86_400.0))),
            min_requests=draw(st.integers(1, 10**9)),
            max_error_rate=draw(st.floats(0.0, 1.0)),
            relative_margin=draw(st.none() | st.floats(0.0, 1.0)),
        )
        for s in shares
    )
    labels = draw(
        st.dictionaries(
            st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True),
            st.lists(
                st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}", fullmatch=True), min_size=1, max_size=3, unique=True
            ),
            max_size=3,
        )
    )
    return make_plan(
        rollout_id=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)),
        plan_waves=ws,
        selector=Selector.of(**labels),
        created_at=draw(st.floats(0, 2e9)),
        ttl_s=draw(st.floats(1, 90 * 24 * 3600)),
        prefetch=draw(st.sampled_from(PrefetchPolicy)),
    )


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_every_valid_plan_round_trips_through_its_signed_document(plan):
    s = sign_plan(plan, PUBLISHER)
    again = SignedPlan.from_json(s.to_json())
    assert again == s
    assert again.to_json() == s.to_json()
    assert verify_plan(again, TRUSTED) == plan


@given(st.integers(1, PPM))
def test_share_text_round_trips_exactly(ppm):
    assert parse_share(format_share(ppm)) == ppm
    assert Fraction(format_share(ppm)[:-1]) == Fraction(ppm, PPM // 100)


@pytest.mark.parametrize("bad", ["0", "101", "abc", "0.00001", "-1", "1/0"])
def test_share_text_outside_the_range_is_refused(bad):
    with pytest.raises(PlanFormatError):
        parse_share(bad)


# --- who may sign a plan -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "reason", "fragment"),
    [
        (OPERATOR, "not_publisher_key", "it is an operator key"),
        (NODE, "not_publisher_key", "it is a node key"),
        (STRANGER, "unknown_key", "does not trust that key at all"),
    ],
)
def test_a_plan_signed_by_any_other_key_is_refused_naming_the_key(key, reason, fragment):
    plan = make_plan(key=key)
    forged = SignedPlan(plan, key.sign(plan.signed_bytes()))  # sign_plan itself refuses non-publisher keys
    with pytest.raises(PlanSignatureError) as info:
        verify_plan(forged, TRUSTED)
    assert info.value.reason == reason and info.value.key_id == key.key_id
    assert key.key_id in str(info.value) and fragment in str(info.value)


def test_a_plan_changed_after_signing_is_refused_as_forged():
    s = signed(PLAN)
    wider = dataclasses.replace(
        PLAN, autonomous_scope=dataclasses.replace(PLAN.autonomous_scope, max_share_ppm=PPM)
    )
    with pytest.raises(PlanSignatureError) as info:
        verify_plan(SignedPlan(wider, s.publisher_signature), TRUSTED)
    assert info.value.reason == "forged" and PUBLISHER.key_id in str(info.value)


def test_signing_refuses_keys_of_other_roles_and_a_key_the_plan_does_not_name():
    with pytest.raises(PlanSignatureError, match="operator key"):
        sign_plan(make_plan(key=OPERATOR), OPERATOR)
    with pytest.raises(PlanSignatureError, match="names publisher key"):
        sign_plan(PLAN, STRANGER)


def test_a_plan_signature_is_not_a_manifest_or_command_signature():
    # Domain separation: the same key's signature over the bare canonical JSON does not verify.
    bare = SignedPlan(PLAN, PUBLISHER.sign(PLAN.canonical_bytes()))
    with pytest.raises(PlanSignatureError, match="changed after signing"):
        verify_plan(bare, TRUSTED)


def test_an_expired_plan_is_refused():
    with pytest.raises(PlanExpiredError, match="expired"):
        verify_plan(signed(PLAN), TRUSTED, now=PLAN.expires_at)
    assert verify_plan(signed(PLAN), TRUSTED, now=PLAN.expires_at - 1) == PLAN


# --- operator commands -------------------------------------------------------------------------------


def check(cmd: RolloutCommand, *, plan=PLAN, now: float = T0 + 200, used=frozenset()):
    return verify_command(cmd, plan, TRUSTED, now=now, used_nonces=used)


@pytest.mark.parametrize("action", list(CommandAction))
def test_each_command_verifies_and_round_trips(action):
    cmd = command(PLAN, action, wave=3 if action.needs_wave else None)
    assert check(cmd) == OPERATOR.verify_key
    assert RolloutCommand.from_json(cmd.to_json()) == cmd
    assert RolloutCommand.from_dict(json.loads(json.dumps(cmd.to_dict()))) == cmd


def _flip(cmd: RolloutCommand) -> RolloutCommand:
    sig = bytearray(bytes.fromhex(cmd.signature))
    sig[7] ^= 1
    return dataclasses.replace(cmd, signature=sig.hex())


@pytest.mark.parametrize(
    ("make", "refusal"),
    [
        (lambda: command(PLAN, CommandAction.APPROVE, wave=3, key=PUBLISHER), NotOperatorKey),
        (lambda: command(PLAN, CommandAction.APPROVE, wave=3, key=NODE), NotOperatorKey),
        (lambda: command(PLAN, CommandAction.APPROVE, wave=3, key=ROGUE_OPERATOR), UnknownCommandKey),
        (lambda: _flip(command(PLAN, CommandAction.APPROVE, wave=3)), ForgedCommand),
        (lambda: dataclasses.replace(command(PLAN, CommandAction.APPROVE, wave=2), wave=3), ForgedCommand),
        (
            lambda: dataclasses.replace(command(PLAN, CommandAction.PAUSE), action=CommandAction.RESUME),
            ForgedCommand,
        ),
        (lambda: command(make_plan(target="3.0"), CommandAction.APPROVE, wave=3), WrongRollout),
        (lambda: command(PLAN, CommandAction.APPROVE, wave=4), WrongRollout),
        (lambda: command(PLAN, CommandAction.ABORT, ttl_s=50), ExpiredCommand),
    ],
)
def test_refused_commands_say_why(make, refusal):
    with pytest.raises(refusal) as info:
        check(make())
    assert info.value.reason == refusal.reason


def test_a_replayed_command_is_refused_and_a_forged_one_is_reported_as_forged_first():
    cmd = command(PLAN, CommandAction.RESUME)
    with pytest.raises(ReplayedCommand, match="already used"):
        check(cmd, used={cmd.nonce})
    with pytest.raises(ForgedCommand):
        check(_flip(cmd), used={cmd.nonce}, now=cmd.expires_at + 10)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"action": CommandAction.ABORT, "wave": None, "reason": " "}, "needs a reason"),
        ({"action": CommandAction.PAUSE, "wave": 2}, "names no wave"),
        ({"action": CommandAction.APPROVE, "wave": None}, "wave"),
        ({"expires_at": T0}, "must be positive"),
        ({"nonce": "short"}, "nonce"),
        ({"reason": "\ud800"}, "UTF-8"),
    ],
)
def test_malformed_commands_are_refused(fields, fragment):
    cmd = command(PLAN, CommandAction.APPROVE, wave=2)
    with pytest.raises(MalformedCommand) as info:
        dataclasses.replace(cmd, **fields)
    assert fragment in str(info.value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values())
def test_any_json_is_refused_as_a_malformed_command(doc):
    with pytest.raises(CommandRefused):
        RolloutCommand.from_json(json.dumps(doc).encode())


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(command(PLAN, CommandAction.APPROVE, wave=2).to_dict())), json_values(max_leaves=4)
)
def test_any_command_field_replaced_is_refused_or_fails_verification(key, value):
    doc = command(PLAN, CommandAction.APPROVE, wave=2).to_dict()
    if doc[key] == value:
        return
    doc[key] = value
    with pytest.raises(CommandRefused):
        check(RolloutCommand.from_json(json.dumps(doc).encode()))


# --- version skew ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("facts", "kind", "fragment"),
    [
        (device("n1", labels={"device_class": "gateway"}), SkipKind.NOT_SELECTED, "device_class=gateway"),
        (device("n1", labels={}), SkipKind.NOT_SELECTED, "no device_class"),
        (device("n1", runtime="2.2.9"), SkipKind.OLD_RUNTIME, "2.2.9 is older than 2.3.0"),
        (device("n1", runtime="garbage"), SkipKind.OLD_RUNTIME, "older"),
        (device("n1", signature=OTHER_SIGNATURE), SkipKind.SIGNATURE_MISMATCH, "signature"),
        (device("n1", free_disk_bytes=10), SkipKind.LOW_DISK, "10 bytes free"),
    ],
)
def test_devices_that_cannot_run_the_target_skip_with_their_reason(facts, kind, fragment):
    plan = make_plan(selector=Selector.of(device_class=("camera", "camera-lite")))
    skip = skew_check(plan, facts)
    assert skip is not None and skip.kind is kind and fragment in skip.reason


def test_compatible_devices_take_part():
    plan = make_plan(selector=Selector.of(device_class="camera"))
    assert skew_check(plan, device("n1")) is None
    assert skew_check(plan, device("n1", runtime="2.3")) is None  # 2.3 == 2.3.0
    assert skew_check(plan, device("n1", runtime="10.0")) is None  # numeric, not text, order
    assert skew_check(plan, device("n1", signature=None)) is None  # serves nothing yet: nobody to break
    assert skew_check(plan, device("n1", free_disk_bytes=0, holds_target=True)) is None


def test_a_plan_with_the_longest_lifetime_is_not_refused_for_a_rounding_error():
    """created + ttl - created is not ttl in floating point: at this created_at it is 7776000.000000001 s,
    and the plan was refused ("7776000 s ... at most 7776000 s"); hypothesis found it. The makers of
    plans and commands round the expiry down (`expiry`); the check, which every replica's ledger
    applies, is unchanged."""
    created = 4212106.702221385
    assert (created + MAX_PLAN_TTL_S) - created > MAX_PLAN_TTL_S
    with pytest.raises(PlanFormatError, match="at most 7776000 s"):
        dataclasses.replace(make_plan(created_at=created, ttl_s=1.0), expires_at=created + MAX_PLAN_TTL_S)
    assert 0 < expiry(created, MAX_PLAN_TTL_S) - created <= MAX_PLAN_TTL_S
    plan = make_plan(created_at=created, ttl_s=MAX_PLAN_TTL_S)
    assert verify_plan(sign_plan(plan, PUBLISHER), TRUSTED, now=created + 1) == plan
