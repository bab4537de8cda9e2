"""RBAC: the default policy's role × permission matrix (written out here independently of
policy.yaml), inheritance, the agent:* pattern, rate limits, and policies that must not load —
hand-written and hypothesis-mutated — each refused with a PolicyError naming the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from security.rbac import (
    BURST_MAX,
    DEFAULT_RATE_LIMIT,
    PERMISSIONS,
    POLICY_BYTES_MAX,
    POLICY_ROLES_MAX,
    REQUESTS_PER_S_MAX,
    ROLE_SETS_CACHED_MAX,
    Policy,
    PolicyError,
    RateLimit,
)

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "security" / "policy.yaml"

LEVEL1 = {"task.read", "task.set_priority", "executor.read", "cluster.read", "events.watch", "checkpoint.read",
          "knowledge.read", "token.refresh"}
AGENT = {"knowledge.read", "task.read_own", "task.update_own", "task.delegate_own", "checkpoint.write_own",
         "checkpoint.read_own", "executor.register", "executor.connect", "secret.read", "token.refresh"}
EXPECTED: dict[str, set[str]] = {
    "admin": set(PERMISSIONS),
    "operator:level1": LEVEL1,
    "operator:level2": LEVEL1 | {"approval.decide", "executor.pause", "audit.read"},
    "agent:executor": AGENT,
    "agent:mcp": AGENT,
    "system:scheduler": {"task.read", "task.assign", "executor.read", "cluster.read"},
    "user": {"task.submit", "task.read", "task.cancel", "task.requeue", "events.watch", "checkpoint.read",
             "executor.read", "cluster.read", "token.refresh"},
    # not declared, or not matched by a pattern: nothing
    "agent": set(),
    "agents:x": set(),
    "operator": set(),
    "operator:level3": set(),
    "system:other": set(),
    "guest": set(),
}


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.default()


def test_the_permission_set_is_the_closed_set_of_the_design() -> None:
    assert len(PERMISSIONS) == 26
    assert {"task.submit", "task.read_own", "executor.pause", "secret.write", "token.issue"} <= PERMISSIONS


def test_the_default_policy_loads_with_its_roles(policy) -> None:
    assert policy.roles == {"admin", "operator:level1", "operator:level2", "agent:*", "system:scheduler", "user"}
    assert Policy.load(DEFAULT_PATH).roles == policy.roles


@pytest.mark.parametrize("role, permission", [(r, p) for r in EXPECTED for p in sorted(PERMISSIONS)])
def test_the_matrix(policy, role, permission) -> None:
    assert policy.allows([role], permission) is (permission in EXPECTED[role])


@pytest.mark.parametrize("role", sorted(EXPECTED))
def test_permissions_of_each_role(policy, role) -> None:
    assert policy.permissions_of((role,)) == EXPECTED[role]


def test_roles_combine_as_a_union_and_no_roles_grant_nothing(policy) -> None:
    assert policy.permissions_of(["user", "agent:executor"]) == EXPECTED["user"] | AGENT
    assert policy.permissions_of(("system:scheduler", "operator:level1")) == EXPECTED["system:scheduler"] | LEVEL1
    assert policy.permissions_of([]) == frozenset()
    assert not policy.allows((), "task.read")
    assert policy.permissions_of(iter(["user"])) == EXPECTED["user"]               # any iterable
    assert policy.permissions_of(frozenset({"user", "guest"})) == EXPECTED["user"]


def test_programmer_errors(policy) -> None:
    with pytest.raises(ValueError, match="permission: one of PERMISSIONS, got 'task.raed'"):
        policy.allows(["admin"], "task.raed")
    with pytest.raises(TypeError, match="not one str"):
        policy.allows("admin", "task.read")
    with pytest.raises(TypeError, match="role names are str"):
        policy.permissions_of([1])


def test_the_lookup_cache_is_bounded(policy) -> None:
    fresh = Policy.load(DEFAULT_PATH)
    for i in range(ROLE_SETS_CACHED_MAX + 100):
        fresh.allows(("user", f"agent:a{i}"), "task.submit")
    assert len(fresh._cache) == ROLE_SETS_CACHED_MAX
    assert fresh.allows(("user", "agent:a0"), "task.read_own")                     # recomputed, same answer


# ---------------------------------------------------------------------------------- semantics
def write(tmp_path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


def test_inheritance_is_transitive_and_star_is_everything(tmp_path) -> None:
    policy = Policy.load(write(tmp_path, """
version: 1
roles:
  base: {permissions: [task.read]}
  mid: {inherits: [base], permissions: [task.submit]}
  top: {inherits: [mid, "agent:*"]}
  "agent:*": {permissions: [knowledge.read]}
  root: {inherits: [base], permissions: ["*"]}
"""))
    assert policy.permissions_of(["top"]) == {"task.read", "task.submit", "knowledge.read"}
    assert policy.permissions_of(["root"]) == PERMISSIONS
    assert policy.permissions_of(["mid"]) == {"task.read", "task.submit"}


def test_a_pattern_matches_only_roles_under_its_prefix(tmp_path) -> None:
    policy = Policy.load(write(tmp_path, """
version: 1
roles:
  "agent:*": {permissions: [knowledge.read]}
  "agent:mcp": {permissions: [secret.read]}
  "team:a:*": {permissions: [task.submit]}
"""))
    assert policy.permissions_of(["agent:executor"]) == {"knowledge.read"}
    assert policy.permissions_of(["agent:mcp"]) == {"knowledge.read", "secret.read"}      # exact and pattern
    assert policy.permissions_of(["agent:x:y"]) == {"knowledge.read"}
    for role in ("agent", "agentx", "agents:x", "Agent:x", "x:agent:y"):
        assert policy.permissions_of([role]) == frozenset(), role
    assert policy.permissions_of(["team:a:b"]) == {"task.submit"}
    assert policy.permissions_of(["team:a"]) == frozenset()
    assert policy.permissions_of(["team:b:c"]) == frozenset()


def test_rate_limits_default_override_and_the_most_generous_per_component(tmp_path, policy) -> None:
    assert policy.rate_limit_for([]) == RateLimit(200, 400) == DEFAULT_RATE_LIMIT
    assert policy.rate_limit_for(["user"]) == RateLimit(200, 400)
    assert policy.rate_limit_for(["agent:executor"]) == RateLimit(500, 1000)
    assert policy.rate_limit_for(["user", "system:scheduler"]) == RateLimit(2000, 4000)
    mixed = Policy.load(write(tmp_path, """
version: 1
roles:
  a: {}
  b: {}
  "agent:*": {}
  "agent:slow": {}
rate_limits:
  default: {requests_per_s: 10, burst: 20}
  roles:
    a: {requests_per_s: 100, burst: 5}
    b: {requests_per_s: 1, burst: 500}
    "agent:*": {requests_per_s: 50, burst: 50}
    "agent:slow": {requests_per_s: 0.5, burst: 1}
"""))
    assert mixed.rate_limit_for(["a", "b"]) == RateLimit(100, 500)
    assert mixed.rate_limit_for(["a"]) == RateLimit(100, 5)
    assert mixed.rate_limit_for(["unknown"]) == RateLimit(10, 20)
    assert mixed.rate_limit_for(["agent:x"]) == RateLimit(50, 50)
    assert mixed.rate_limit_for(["agent:slow"]) == RateLimit(0.5, 1)            # the exact name wins
    assert mixed.rate_limit_for(["agent:slow", "unknown"]) == RateLimit(10, 20)
    assert isinstance(mixed.rate_limit_for(["a"]).requests_per_s, float)
    bare = Policy.load(write(tmp_path, "version: 1\nroles: {user: {permissions: [task.read]}}\n"))
    assert bare.rate_limit_for(["user"]) == DEFAULT_RATE_LIMIT


def test_rate_limit_bounds() -> None:
    RateLimit(REQUESTS_PER_S_MAX, BURST_MAX)
    RateLimit(0.001, 1)
    for rate, burst in ((0, 1), (-1, 1), (REQUESTS_PER_S_MAX * 2, 1), (float("nan"), 1), (float("inf"), 1),
                        (True, 1), ("5", 1), (1, 0), (1, BURST_MAX + 1), (1, 2.5), (1, True)):
        with pytest.raises(ValueError, match="requests_per_s|burst"):
            RateLimit(rate, burst)


# ---------------------------------------------------------------------------------- bad policies
GOOD = """
version: 1
roles:
  user: {permissions: [task.read]}
  "operator:level1": {permissions: [task.read, task.set_priority]}
"""


@pytest.mark.parametrize("text, message", [
    ("version: 1\nroles:\n  \"operator:level1\":\n    permissions: [task.read, cluster.read, task.raed]\n",
     r"roles.operator:level1.permissions\[2\]: unknown permission 'task.raed' \(known: '\*', approval.decide"),
    ("version: 1\nroles:\n  user: {permisions: [task.read]}\n",
     r"roles.user: unknown key 'permisions' \(allowed: description, inherits, permissions\)"),
    ("version: 1\nrole: {}\nroles: {}\n", r"\(top level\): unknown key 'role'"),
    ("version: 1\nroles: {a: {inherits: [b]}, b: {inherits: [a]}}\n", r"roles.b.inherits: cycle: a -> b -> a"),
    ("version: 1\nroles: {a: {inherits: [a]}}\n", r"roles.a.inherits: cycle: a -> a"),
    ("version: 1\nroles: {a: {inherits: [b]}, b: {inherits: [c]}, c: {inherits: [a]}}\n", "cycle: a -> b -> c -> a"),
    ("version: 1\nroles: {a: {inherits: [ghost]}}\n", r"roles.a.inherits\[0\]: unknown role 'ghost'"),
    ("version: 1\nroles: {Admin: {}}\n", "roles: role name 'Admin'"),
    ("version: 1\nroles: {\"bad role\": {}}\n", "roles: role name 'bad role'"),
    ("version: 1\nroles: {\"agent:x*\": {}}\n", r"role name 'agent:x\*': '\*' only as the whole last segment"),
    ("version: 1\nroles: {\"agent:*:x\": {}}\n", "only as the whole last segment"),
    ("version: 1\nroles: {\"a:*:*\": {}}\n", "only as the whole last segment"),
    ("version: 1\nroles: {yes: {}}\n", "roles: role name True: a str expected"),
    ("version: 1\nroles: {user: {}}\nrate_limits: {default: {requests_per_s: 0, burst: 10}}\n",
     r"rate_limits.default.requests_per_s: a number in \(0, 100000\]"),
    ("version: 1\nroles: {user: {}}\nrate_limits: {default: {requests_per_s: 5, burst: 0}}\n",
     r"rate_limits.default.burst: an int in 1..1000000"),
    ("version: 1\nroles: {user: {}}\nrate_limits: {default: {requests_per_s: 5}}\n",
     "rate_limits.default.burst: missing"),
    ("version: 1\nroles: {user: {}}\nrate_limits: {default: {requests_per_s: 5, burst: 5, rps: 1}}\n",
     "rate_limits.default: unknown key 'rps'"),
    ("version: 1\nroles: {user: {}}\nrate_limits: {roles: {user: {requests_per_s: 1e9, burst: 5}}}\n",
     "rate_limits.roles.user.requests_per_s"),
    ("version: 1\nroles: {user: {}}\nrate_limits: {roles: {admin: {requests_per_s: 1, burst: 5}}}\n",
     "rate_limits.roles: role 'admin' is not declared"),
    ("version: 1\nroles: {user: {}}\nrate_limits: {roles: [user]}\n", "rate_limits.roles: a mapping expected"),
    ("version: 1\nroles: {user: {}}\nrate_limits: {defaults: {}}\n", "rate_limits: unknown key 'defaults'"),
    ("roles: {user: {}}\n", "version: missing"),
    ("version: 2\nroles: {user: {}}\n", "version: 1 expected, got 2"),
    ("version: '1'\nroles: {user: {}}\n", "version: 1 expected"),
    ("version: 1\n", "roles: missing"),
    ("version: 1\nroles: [user]\n", "roles: a mapping of role name to role expected, got list"),
    ("version: 1\nroles: {user: [task.read]}\n", "roles.user: a mapping expected, got list"),
    ("version: 1\nroles: {user: {permissions: task.read}}\n", "roles.user.permissions: a list of names expected"),
    ("version: 1\nroles: {user: {permissions: [1]}}\n", r"roles.user.permissions\[0\]: a name \(str\) expected"),
    ("version: 1\nroles: {user: {description: [x]}}\n", "roles.user.description"),
    ("version: 1\nroles:\n  user: {permissions: [task.read]}\n  user: {permissions: ['*']}\n",
     "not valid YAML: .*duplicate key 'user'"),
    ("version: 1\nroles: {user: {permissions: [task.read}\n", "not valid YAML"),
    ("", r"\(top level\): a mapping expected, got null"),
    ("- 1\n- 2\n", r"\(top level\): a mapping expected, got list"),
    ("version: 1\nroles: {user: {}}\n? [a, b]\n: 1\n", "not valid YAML"),
    ("version: 1\nroles: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_a_bad_policy_is_refused_naming_the_field(tmp_path, text, message) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError, match=message) as failure:
        Policy.load(path)
    assert str(failure.value).startswith(f"{path}: ")


def test_size_and_count_bounds(tmp_path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"version: 1\n#" + b"x" * POLICY_BYTES_MAX)
    with pytest.raises(PolicyError, match=r"larger than 1048576 bytes \(POLICY_BYTES_MAX\)"):
        Policy.load(path)
    many = "version: 1\nroles:\n" + "".join(f"  r{i}: {{}}\n" for i in range(POLICY_ROLES_MAX + 1))
    with pytest.raises(PolicyError, match=r"roles: at most 256 roles \(POLICY_ROLES_MAX\), got 257"):
        Policy.load(write(tmp_path, many))
    with pytest.raises(PolicyError, match="roles.user.permissions: at most 256 entries"):
        Policy.load(write(tmp_path, "version: 1\nroles: {user: {permissions: [" + "task.read, " * 257 + "]}}\n"))
    (tmp_path / "bin.yaml").write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.load(tmp_path / "bin.yaml")
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "missing.yaml")


def test_deep_nesting_and_alias_bombs_are_refused_quickly(tmp_path) -> None:
    with pytest.raises(PolicyError):
        Policy.load(write(tmp_path, "version: 1\nroles: " + "[" * 5000 + "]" * 5000 + "\n"))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(15))
    with pytest.raises(PolicyError, match="unknown key 'a'"):
        Policy.load(write(tmp_path, bomb + "version: 1\nroles: {user: {permissions: *p}}\n"))


# ---------------------------------------------------------------------------------- mutations
DEFAULT_DOC = yaml.safe_load(DEFAULT_PATH.read_text())


def _paths(node, prefix=()):
    """Every (path, node) in a YAML document; a path is a tuple of keys and list indexes."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _set(doc, path, value):
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def _field(path) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


ALL_PATHS = [p for p, _ in _paths(DEFAULT_DOC) if p]
MAPPING_PATHS = [p for p, n in _paths(DEFAULT_DOC) if isinstance(n, dict)]
PERMISSION_PATHS = [p for p in ALL_PATHS if len(p) == 4 and p[2] == "permissions"]
junk = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) \
    | st.lists(st.text(max_size=6), max_size=3) | st.dictionaries(st.text(max_size=6), st.integers(), max_size=2)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ALL_PATHS), value=junk)
def test_any_value_replaced_anywhere_loads_or_raises_policy_error(tmp_path, path, value) -> None:
    doc = copy.deepcopy(DEFAULT_DOC)
    _set(doc, path, value)
    try:
        Policy.load(write(tmp_path, yaml.safe_dump(doc)))
    except PolicyError as exc:
        assert str(exc).startswith(str(tmp_path / "policy.yaml"))


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(MAPPING_PATHS), key=st.text(min_size=1, max_size=10), value=junk)
def test_an_unknown_key_in_any_mapping_is_named(tmp_path, path, key, value) -> None:
    doc = copy.deepcopy(DEFAULT_DOC)
    node = doc
    for step in path:
        node = node[step]
    if key in node:
        return
    node[key] = value
    where = _field(path) or "(top level)"
    if path == ("roles",):                              # a new role: fine if its name and body are
        try:
            Policy.load(write(tmp_path, yaml.safe_dump(doc)))
        except PolicyError as exc:
            assert f"role name {key!r}" in str(exc) or f"roles.{key}" in str(exc), str(exc)
        return
    with pytest.raises(PolicyError) as failure:
        Policy.load(write(tmp_path, yaml.safe_dump(doc)))
    if path == ("rate_limits", "roles"):                # a rate limit for a role that is not declared
        assert f"rate_limits.roles: role {key!r} is not declared" in str(failure.value), str(failure.value)
    else:
        assert f": {where}: unknown key {key!r}" in str(failure.value), str(failure.value)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PERMISSION_PATHS), name=st.text(max_size=20))
def test_an_unknown_permission_is_named_with_its_index(tmp_path, path, name) -> None:
    if name in PERMISSIONS or name == "*":
        return
    doc = copy.deepcopy(DEFAULT_DOC)
    _set(doc, path, name)
    with pytest.raises(PolicyError, match="unknown permission") as failure:
        Policy.load(write(tmp_path, yaml.safe_dump(doc)))
    assert f": {_field(path)}: unknown permission {name!r}" in str(failure.value)


@settings(max_examples=200)
@given(data=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_bytes_load_or_raise_policy_error(data) -> None:
    try:
        Policy.parse(data, source="fuzz.yaml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.yaml: ")


def test_the_good_example_loads(tmp_path) -> None:
    assert Policy.load(write(tmp_path, GOOD)).allows(["operator:level1"], "task.set_priority")
