"""JWT identities: issue/verify, every way a token is refused (expired, early, wrong audience or
issuer, foreign or unknown key, alg none, HS256 forged with our public key, tampering, oversize,
garbage), key rotation and retirement, the verifier reloading a rotated file, and the cache never
extending a token's life. Time is a fake clock everywhere."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from security.tokens import (
    AUDIENCE,
    ISSUER,
    LEEWAY_S,
    ROLES_MAX,
    TOKEN_CHARS_MAX,
    TOKEN_TTL_S_MAX,
    KeyRing,
    KeyRingError,
    Principal,
    TokenError,
    TokenIssuer,
    TokenVerifier,
)

T0 = 1_800_000_000          # 2027-01-15T08:00:00Z


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


@pytest.fixture(scope="module")
def ring_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ring")


@pytest.fixture(scope="module")
def ring(ring_dir) -> KeyRing:
    return KeyRing.create(ring_dir / "jwt-keys.json")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides) -> dict:
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "roles": ["user"], "iat": T0, "nbf": T0,
            "exp": T0 + 900, "jti": "j1"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def sign(ring: KeyRing, payload: dict, *, kid: str | None = None) -> str:
    kid = kid or ring.active_kid
    return jwt.encode(payload, ring.private_key(ring.active_kid), algorithm="EdDSA", headers={"kid": kid})


def refused(verifier: TokenVerifier, token, match: str) -> TokenError:
    with pytest.raises(TokenError, match=match) as failure:
        verifier.verify(token)
    assert failure.value.code == "UNAUTHENTICATED" and failure.value.message == str(failure.value)
    return failure.value


# ---------------------------------------------------------------------------------- round trip
def test_issue_then_verify_gives_the_subject_roles_and_expiry(ring) -> None:
    clock = FakeClock()
    token = TokenIssuer(ring, clock=clock).issue("alice@example.org", ["user", "agent:executor"], ttl_s=600)
    principal = TokenVerifier(keyring=ring, clock=clock).verify(token)
    assert principal == Principal("alice@example.org", ("user", "agent:executor"), "token", T0 + 600)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"] == ring.active_kid
    body = jwt.decode(token, options={"verify_signature": False})
    assert set(body) == {"iss", "aud", "sub", "roles", "iat", "nbf", "exp", "jti"}
    assert (body["iat"], body["nbf"], body["exp"]) == (T0, T0, T0 + 600)
    second = TokenIssuer(ring, clock=clock).issue("alice@example.org", ["user", "agent:executor"], ttl_s=600)
    assert jwt.decode(second, options={"verify_signature": False})["jti"] != body["jti"]


def test_refresh_keeps_subject_and_roles_with_a_new_expiry(ring) -> None:
    clock = FakeClock()
    issuer, verifier = TokenIssuer(ring, clock=clock), TokenVerifier(keyring=ring, clock=clock)
    first = verifier.verify(issuer.issue("bob", ["operator:level1"], ttl_s=60))
    clock.advance(50)
    renewed = verifier.verify(issuer.refresh(first, ttl_s=120))
    assert (renewed.subject, renewed.roles, renewed.expires_unix_s) == ("bob", ("operator:level1",), T0 + 170)
    with pytest.raises(ValueError, match="principal.kind"):
        issuer.refresh(Principal("n1", ("node",), kind="node"))


@pytest.mark.parametrize("subject, roles, ttl_s, field", [
    ("", ["user"], 60, "subject"),
    ("-alice", ["user"], 60, "subject"),
    ("alice\n", ["user"], 60, "subject"),
    ("a" * 129, ["user"], 60, "subject"),
    ("alice", "user", 60, "roles"),
    ("alice", ["User"], 60, r"roles\[0\]"),
    ("alice", ["user", "*"], 60, r"roles\[1\]"),
    ("alice", ["user\n"], 60, r"roles\[0\]"),
    ("alice", ["a" * 129], 60, r"roles\[0\]"),
    ("alice", [f"r{i}" for i in range(ROLES_MAX + 1)], 60, "ROLES_MAX"),
    ("alice", ["user", "user"], 60, "each role once"),
    ("alice", ["user"], 0, "ttl_s"),
    ("alice", ["user"], TOKEN_TTL_S_MAX + 1, "TOKEN_TTL_S_MAX"),
    ("alice", ["user"], True, "ttl_s"),
    ("alice", ["user"], 60.0, "ttl_s"),
])
def test_issue_refuses_bad_arguments_naming_the_field(ring, subject, roles, ttl_s, field) -> None:
    with pytest.raises(ValueError, match=field):
        TokenIssuer(ring).issue(subject, roles, ttl_s)


def test_the_largest_allowed_token_fits_the_size_bound(ring) -> None:
    roles = [f"r{i:02d}:" + "x" * 124 for i in range(ROLES_MAX)]
    token = TokenIssuer(ring).issue("s" * 128, roles, TOKEN_TTL_S_MAX)
    assert len(token) <= TOKEN_CHARS_MAX
    assert TokenVerifier(keyring=ring).verify(token).roles == tuple(roles)


# ---------------------------------------------------------------------------------- time
def test_expired_after_exp_plus_leeway_and_not_before(ring) -> None:
    clock = FakeClock()
    token = TokenIssuer(ring, clock=clock).issue("alice", ["user"], ttl_s=60)
    verifier = TokenVerifier(keyring=ring, clock=clock)
    clock.advance(60 + LEEWAY_S - 1)
    assert verifier.verify(token).subject == "alice"
    clock.advance(1)
    error = refused(verifier, token, "token: expired at 2027-01-15T08:01:00Z")
    assert error.message == "token: expired at 2027-01-15T08:01:00Z"


def test_not_yet_valid_beyond_the_leeway(ring) -> None:
    issuer_clock, clock = FakeClock(T0 + LEEWAY_S + 1), FakeClock(T0)
    early = TokenIssuer(ring, clock=issuer_clock).issue("alice", ["user"])
    verifier = TokenVerifier(keyring=ring, clock=clock)
    refused(verifier, early, r"token: not valid before 2027-01-15T08:00:31Z")
    clock.advance(1)
    assert verifier.verify(early).subject == "alice"           # within the allowed skew now


def test_issued_in_the_future_and_overlong_lifetimes_are_refused(ring) -> None:
    verifier = TokenVerifier(keyring=ring, clock=FakeClock())
    refused(verifier, sign(ring, claims(iat=T0 + 3600, nbf=T0, exp=T0 + 7200)), "issued in the future")
    refused(verifier, sign(ring, claims(iat=T0, exp=T0 + TOKEN_TTL_S_MAX + 1)),
            r"lifetime 86401 s longer than 86400 s \(TOKEN_TTL_S_MAX\)")
    refused(verifier, sign(ring, claims(iat=T0, nbf=T0 + 100, exp=T0 + 50)), "after exp")
    refused(verifier, sign(ring, claims(exp=float(T0 + 900))), "'exp' is not an integer")
    refused(verifier, sign(ring, claims(exp=10**20)), "'exp' is not an integer")


def test_the_cache_never_extends_an_expired_token(ring) -> None:
    clock = FakeClock()
    token = TokenIssuer(ring, clock=clock).issue("alice", ["user"], ttl_s=60)
    verifier = TokenVerifier(keyring=ring, clock=clock)
    for _ in range(3):
        verifier.verify(token)
    assert (verifier.cache_misses, verifier.cache_hits) == (1, 2)           # it was served from the cache
    clock.advance(60 + LEEWAY_S)
    refused(verifier, token, "expired")
    refused(verifier, token, "expired")
    clock.now = T0                                                          # a clock stepped back still
    assert verifier.verify(token).subject == "alice"                        # sees a valid token, freshly checked
    assert verifier.cache_misses == 3


def test_the_cache_is_bounded(ring) -> None:
    clock = FakeClock()
    issuer = TokenIssuer(ring, clock=clock)
    verifier = TokenVerifier(keyring=ring, clock=clock, cache_entries_max=8)
    tokens = [issuer.issue(f"u{i}", ["user"]) for i in range(20)]
    for token in tokens:
        verifier.verify(token)
    verifier.verify(tokens[-1])
    assert verifier.cache_hits == 1 and len(verifier._cache) == 8
    verifier.verify(tokens[0])                                              # evicted: verified again
    assert verifier.cache_misses == 21
    uncached = TokenVerifier(keyring=ring, clock=clock, cache_entries_max=0)
    uncached.verify(tokens[0]), uncached.verify(tokens[0])
    assert (uncached.cache_hits, uncached.cache_misses) == (0, 2)


# ---------------------------------------------------------------------------------- claims
@pytest.mark.parametrize("overrides, match", [
    ({"aud": "someone-else"}, "token: wrong audience"),
    ({"aud": [AUDIENCE, "x"]}, "token: wrong audience"),
    ({"iss": "evil"}, "token: wrong issuer"),
    ({"sub": "bad subject"}, "'sub'"),
    ({"sub": 7}, "'sub'"),
    ({"sub": "alice\n"}, "'sub'"),                   # $ would match before a trailing newline
    ({"roles": ["user\n"]}, "'roles'"),
    ({"roles": "admin"}, "'roles'"),
    ({"roles": ["Admin"]}, "'roles'"),
    ({"roles": [f"r{i}" for i in range(ROLES_MAX + 1)]}, "'roles'"),
    ({"roles": [["admin"]]}, "'roles'"),
    ({"jti": 5}, "'jti'"),
    ({"exp": ...}, "'exp' missing"),
    ({"roles": ...}, "'roles' missing"),
    ({"aud": ...}, "'aud' missing"),
])
def test_claims_that_do_not_pass_are_refused_by_name(ring, overrides, match) -> None:
    refused(TokenVerifier(keyring=ring, clock=FakeClock()), sign(ring, claims(**overrides)), match)


def test_extra_claims_grant_nothing(ring) -> None:
    token = sign(ring, claims(admin=True, scope="*", roles=["user"]))
    principal = TokenVerifier(keyring=ring, clock=FakeClock()).verify(token)
    assert principal == Principal("alice", ("user",), "token", T0 + 900)


# ---------------------------------------------------------------------------------- forgery
def test_a_foreign_key_or_an_unknown_kid_is_refused(ring, tmp_path) -> None:
    other = KeyRing.create(tmp_path / "other.json")
    verifier = TokenVerifier(keyring=ring, clock=FakeClock())
    foreign = TokenIssuer(other, clock=FakeClock()).issue("alice", ["admin"])
    refused(verifier, foreign, f"token: unknown key id '{other.active_kid}'")
    # the foreign key claiming our kid: the signature does not verify
    impostor = jwt.encode(claims(roles=["admin"]), other.private_key(other.active_kid), algorithm="EdDSA",
                          headers={"kid": ring.active_kid})
    refused(verifier, impostor, "token: signature does not verify")
    refused(verifier, sign(ring, claims(), kid="k2"), "token: unknown key id 'k2'")
    no_kid = jwt.encode(claims(), ring.private_key(ring.active_kid), algorithm="EdDSA")
    refused(verifier, no_kid, "no key id")


def _forge(header: dict, payload: dict, signature: bytes) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(signature)}"


def test_alg_none_and_hs256_keyed_with_our_public_key_are_refused(ring) -> None:
    verifier = TokenVerifier(keyring=ring, clock=FakeClock())
    payload = claims(roles=["admin"])
    kid = ring.active_kid
    for alg in ("none", "None", "NONE"):
        refused(verifier, _forge({"alg": alg, "kid": kid}, payload, b""), f"algorithm '{alg}' not allowed")
    public = ring.public_keys()[kid]
    secrets_tried = [
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
    ]
    for secret in secrets_tried:
        for alg, digest in (("HS256", hashlib.sha256), ("HS512", hashlib.sha512)):
            header = {"alg": alg, "kid": kid, "typ": "JWT"}
            signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
            mac = hmac.new(secret, signing_input.encode(), digest).digest()
            refused(verifier, f"{signing_input}.{b64(mac)}", f"algorithm '{alg}' not allowed")
    for alg in ("ES256", "RS256", "PS256", "Ed25519", "eddsa", None, 7, ["EdDSA"]):
        refused(verifier, _forge({"alg": alg, "kid": kid}, payload, b"x" * 64), "not allowed")


def test_a_tampered_payload_or_signature_does_not_verify(ring) -> None:
    verifier = TokenVerifier(keyring=ring, clock=FakeClock())
    token = TokenIssuer(ring, clock=FakeClock()).issue("alice", ["user"])
    header, payload, signature = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["roles"] = ["admin"]
    refused(verifier, f"{header}.{b64(json.dumps(body).encode())}.{signature}", "signature does not verify")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    refused(verifier, f"{header}.{payload}.{flipped}", "signature does not verify")
    refused(verifier, f"{header}.{payload}.", "signature does not verify|malformed")
    refused(verifier, f"{header}.{payload}", "malformed")
    refused(verifier, f"{header}.{payload}.{signature}.x", "malformed")
    refused(verifier, f" {token}", "malformed")
    refused(verifier, f"{token}\n", "malformed")


def test_missing_oversize_and_non_string_tokens(ring) -> None:
    verifier = TokenVerifier(keyring=ring, clock=FakeClock())
    refused(verifier, "", "token: missing")
    refused(verifier, "a" * (TOKEN_CHARS_MAX + 1), f"token: longer than {TOKEN_CHARS_MAX} chars")
    refused(verifier, b"abc.def.ghi", "malformed")
    refused(verifier, None, "malformed")


def test_a_deeply_nested_header_is_malformed_not_a_crash(ring) -> None:
    verifier = TokenVerifier(keyring=ring, clock=FakeClock())
    deep = b64(b"[" * 2000)
    refused(verifier, f"{deep}.{b64(b'{}')}.{b64(b'x' * 64)}", "malformed")
    refused(verifier, f"{b64(b'1' * 2500)}.{b64(b'{}')}.{b64(b'x' * 64)}", "malformed")


JWT_SHAPED = r"\A[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,200}\.[A-Za-z0-9_-]{0,90}\Z"


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300) | st.from_regex(JWT_SHAPED))
def test_any_text_is_refused_with_a_token_error_and_nothing_else(ring, text) -> None:
    with pytest.raises(TokenError):
        TokenVerifier(keyring=ring, clock=FakeClock(), cache_entries_max=0).verify(text)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header_extra=st.dictionaries(st.sampled_from(["typ", "kid", "crit", "b64", "x5u", "jku", "cty"]), _json,
                                    max_size=3),
       replaced=st.dictionaries(st.sampled_from(["iss", "aud", "sub", "roles", "iat", "nbf", "exp", "jti", "x"]),
                                _json, max_size=4))
def test_signed_tokens_with_arbitrary_claims_verify_or_raise_token_error(ring, header_extra, replaced) -> None:
    """Even a correctly signed token with hostile claims or headers never raises anything else."""
    header_extra = {k: v for k, v in header_extra.items() if k != "kid"} | {"kid": ring.active_kid}
    payload = json.dumps(claims(**replaced)).encode()
    header = {"alg": "EdDSA", **header_extra}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(payload)}"
    token = f"{signing_input}.{b64(ring.private_key(ring.active_kid).sign(signing_input.encode()))}"
    try:
        principal = TokenVerifier(keyring=ring, clock=FakeClock(), cache_entries_max=0).verify(token)
    except TokenError:
        return
    assert isinstance(principal, Principal) and principal.kind == "token"


# ---------------------------------------------------------------------------------- key ring
def test_key_files_are_0600_and_create_refuses_to_overwrite(tmp_path) -> None:
    path = tmp_path / "keys" / "jwt.json"
    ring = KeyRing.create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(KeyRingError, match="already exists"):
        KeyRing.create(path)
    ring.rotate(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ring.retire(path, ring.kids[0])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == ["jwt.json"]                  # no temp files left
    document = json.loads(path.read_text())
    assert document["format"] == "agent-coordinator-jwt-keys-v1" and document["active"] == ring.active_kid
    assert set(document["keys"][0]) == {"kid", "created_unix_s", "private_pem", "public_pem"}
    assert "BEGIN PRIVATE KEY" in document["keys"][0]["private_pem"]         # PKCS8


def test_rotation_keeps_old_tokens_verifying_until_their_key_is_retired(tmp_path) -> None:
    path, clock = tmp_path / "jwt.json", FakeClock()
    ring = KeyRing.create(path)
    old_kid = ring.active_kid
    issuer, verifier = TokenIssuer(ring, clock=clock), TokenVerifier(keyring=ring, clock=clock)
    old = issuer.issue("alice", ["user"])
    assert verifier.verify(old).subject == "alice"
    new_kid = ring.rotate(path)
    assert new_kid != old_kid and ring.active_kid == new_kid and set(ring.public_keys()) == {old_kid, new_kid}
    new = issuer.issue("alice", ["user"])
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert verifier.verify(old).subject == verifier.verify(new).subject == "alice"
    with pytest.raises(KeyRingError, match="active key; rotate first"):
        ring.retire(path, new_kid)
    ring.retire(path, old_kid)
    assert ring.private_key(old_kid) is None
    refused(verifier, old, f"unknown key id '{old_kid}'")                   # even though it was cached
    assert verifier.verify(new).subject == "alice"
    assert KeyRing.load(path).kids == [new_kid]
    with pytest.raises(KeyRingError, match="not in the ring"):
        ring.retire(path, old_kid)


def test_the_verifier_reloads_a_rotated_key_file_without_a_restart(tmp_path) -> None:
    path, clock = tmp_path / "jwt.json", FakeClock()
    admin_ring = KeyRing.create(path)
    verifier = TokenVerifier(path, clock=clock, reload_check_s=1.0)
    old = TokenIssuer(admin_ring, clock=clock).issue("alice", ["user"])
    assert verifier.verify(old).subject == "alice"                           # now cached
    rotated = KeyRing.load(path)                                             # another process rotates
    rotated.rotate(path)
    new = TokenIssuer(rotated, clock=clock).issue("bob", ["user"])
    refused(verifier, new, "unknown key id")                                 # not checked again yet
    clock.advance(1.0)
    assert verifier.verify(new).subject == "bob" and verifier.reloads == 1
    assert verifier.verify(old).subject == "alice"
    rotated.retire(path, admin_ring.active_kid)
    clock.advance(0.5)
    assert verifier.verify(old).subject == "alice"                           # within reload_check_s
    clock.advance(0.5)
    refused(verifier, old, "unknown key id")
    assert verifier.verify(new).subject == "bob" and verifier.reloads == 2
    # a file that stops loading keeps the last good keys (and is logged)
    path.write_text("{not json")
    clock.advance(1.0)
    assert verifier.verify(new).subject == "bob" and verifier.reloads == 2


def _write_document(path, mutate) -> None:
    document = json.loads(path.read_text())
    mutate(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("active"), "active"),
    (lambda d: d.update(active="nope"), "active"),
    (lambda d: d.update(format="v0"), "format"),
    (lambda d: d.update(extra=1), "extra: unknown field"),
    (lambda d: d.update(keys=[]), "keys"),
    (lambda d: d.update(keys={}), "keys"),
    (lambda d: d["keys"][0].pop("public_pem"), r"keys\[0\].public_pem"),
    (lambda d: d["keys"][0].update(public_pem="-----BEGIN PUBLIC KEY-----\ngarbage\n"), r"keys\[0\].public_pem"),
    (lambda d: d["keys"][0].update(private_pem="garbage"), r"keys\[0\].private_pem"),
    (lambda d: d["keys"][0].update(private_pem=7), r"keys\[0\].private_pem"),
    (lambda d: d["keys"][0].update(kid="has space"), r"keys\[0\].kid"),
    (lambda d: d["keys"][0].pop("kid"), r"keys\[0\].kid"),
    (lambda d: d["keys"][0].update(created_unix_s="yesterday"), r"keys\[0\].created_unix_s"),
    (lambda d: d["keys"].append(dict(d["keys"][0])), r"keys\[1\].kid: .* appears twice"),
    (lambda d: d["keys"].append(5), r"keys\[1\]"),
])
def test_a_corrupt_key_file_names_the_file_and_the_field(tmp_path, mutate, field) -> None:
    path = tmp_path / "jwt.json"
    KeyRing.create(path)
    _write_document(path, mutate)
    with pytest.raises(KeyRingError, match=field) as failure:
        KeyRing.load(path)
    assert str(path) in str(failure.value)
    with pytest.raises(KeyRingError, match=field):
        TokenVerifier(path)


def test_mismatched_keys_not_json_and_missing_files(tmp_path) -> None:
    a, b = KeyRing.create(tmp_path / "a.json"), KeyRing.create(tmp_path / "b.json")
    del a
    other_public = json.loads((tmp_path / "b.json").read_text())["keys"][0]["public_pem"]
    _write_document(tmp_path / "a.json", lambda d: d["keys"][0].update(public_pem=other_public))
    with pytest.raises(KeyRingError, match=r"keys\[0\].public_pem: does not match private_pem"):
        KeyRing.load(tmp_path / "a.json")
    (tmp_path / "c.json").write_text("[1,")
    with pytest.raises(KeyRingError, match="c.json: not JSON"):
        KeyRing.load(tmp_path / "c.json")
    with pytest.raises(KeyRingError, match="missing.json: cannot read"):
        KeyRing.load(tmp_path / "missing.json")
    assert b.active_kid


def test_a_verify_only_key_file_verifies_but_cannot_issue(tmp_path, ring) -> None:
    path = tmp_path / "public.json"
    path.write_text(json.dumps({
        "format": "agent-coordinator-jwt-keys-v1", "active": ring.active_kid,
        "keys": [{"kid": ring.active_kid, "created_unix_s": 0, "private_pem": None,
                  "public_pem": ring.public_keys()[ring.active_kid].public_bytes(
                      serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()}]}))
    public_only = KeyRing.load(path)
    token = TokenIssuer(ring, clock=FakeClock()).issue("alice", ["user"])
    assert TokenVerifier(path, clock=FakeClock()).verify(token).subject == "alice"
    with pytest.raises(KeyRingError, match="no private key"):
        TokenIssuer(public_only).issue("alice", ["user"])


def test_verifier_arguments_are_bounded(ring) -> None:
    with pytest.raises(ValueError, match="keys_path or keyring"):
        TokenVerifier()
    with pytest.raises(ValueError, match="cache_entries_max"):
        TokenVerifier(keyring=ring, cache_entries_max=-1)
    with pytest.raises(ValueError, match="reload_check_s"):
        TokenVerifier(keyring=ring, reload_check_s=-1)
