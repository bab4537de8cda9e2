"""Role-based access control (issue 6): which permission each role holds, and each role's rate
limit, as data in a YAML policy file (security/policy.yaml by default) validated whole at load.

    policy = Policy.default()                         # or Policy.load(path)
    policy.allows(principal.roles, "task.submit")     # -> bool
    policy.rate_limit_for(principal.roles)            # -> RateLimit(requests_per_s, burst)

Errors:

    Exception
     ├── PolicyError      a policy file that does not load; the message names the file, the field
     │                    (roles.operator:level1.permissions[2]) and what is allowed there
     ├── ValueError       a permission name outside PERMISSIONS passed to allows(), or a RateLimit
     │                    out of bounds: programmer errors
     └── TypeError        roles passed as one str instead of an iterable of str

The file:

    version: 1
    roles:
      <role>:                      # a role name (ROLE_RE), or a pattern "<prefix>:*"
        description: <text>        # optional
        permissions: [<permission>, ...]   # names from PERMISSIONS, or "*" (all of them)
        inherits: [<role>, ...]    # declared roles; their permissions are added (no cycles)
    rate_limits:                   # optional; DEFAULT_RATE_LIMIT without it
      default: {requests_per_s: <float>, burst: <int>}
      roles: {<declared role>: {requests_per_s: ..., burst: ...}}

Semantics:
  * A principal's permissions are the union over its roles. A role gets the permissions of the
    declared role of the same name and of every declared pattern that matches it; a pattern
    "agent:*" matches any role that starts with "agent:" and has more after it ("agent:executor",
    "agent:mcp:x"), not "agent". '*' appears in a declared role name only as the whole last segment.
    A principal's roles are literal names: a principal role "agent:*" is the role of that name
    (which the pattern "agent:*" matches too), never a wildcard over other roles.
  * Roles the policy does not declare (or match) grant nothing; so do no roles.
  * "_own" permissions say only that a role may act on its own tasks; that a task is the
    caller's is checked in the state machine, not here.
  * Rate limits: each role of the principal contributes its override (exact name first, else the
    first matching pattern in file order) or else the default; the most generous applies, taken
    per component (the highest requests_per_s and the highest burst), so adding a role never
    lowers a limit. No roles: the default. Rate limits are not inherited.

Lookups are cached per roles tuple (bounded, ROLE_SETS_CACHED_MAX), so `allows` on a hot path is
a dict lookup and a set membership test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PERMISSIONS: frozenset[str] = frozenset({
    "task.submit", "task.read", "task.read_own", "task.update_own", "task.cancel", "task.requeue",
    "task.set_priority", "task.delegate_own", "task.assign",
    "executor.register", "executor.connect", "executor.read", "executor.unregister", "executor.pause",
    "checkpoint.read", "checkpoint.read_own", "checkpoint.write_own",
    "knowledge.read", "approval.decide", "cluster.read", "events.watch", "audit.read",
    "secret.read", "secret.write", "token.refresh", "token.issue",
})
ALL = "*"                                   # in a role's permissions: every permission

POLICY_VERSION = 1
POLICY_BYTES_MAX = 1024 * 1024
POLICY_ROLES_MAX = 256
ROLE_CHARS_MAX = 128
ROLE_PERMISSIONS_MAX = 256                  # entries in one role's permissions list
ROLE_INHERITS_MAX = 32                      # entries in one role's inherits list
DESCRIPTION_CHARS_MAX = 1024
REQUESTS_PER_S_MAX = 100_000.0
BURST_MAX = 1_000_000
ROLE_SETS_CACHED_MAX = 4096                 # distinct roles tuples remembered by permissions_of
ROLE_RE = r"^[a-z][a-z0-9_-]*(:[A-Za-z0-9_*-]+)*$"      # as security.tokens.ROLE_RE

_ROLE = re.compile(ROLE_RE)
_ROLE_KEYS = ("description", "inherits", "permissions")
_TOP_KEYS = ("rate_limits", "roles", "version")
_RATE_KEYS = ("default", "roles")
_LIMIT_KEYS = ("burst", "requests_per_s")


class PolicyError(Exception):
    """A policy file that does not load: names the file, the field and what is allowed."""


@dataclass(frozen=True)
class RateLimit:
    requests_per_s: float           # refill rate, 0 < . <= REQUESTS_PER_S_MAX
    burst: int                      # bucket size, 1 <= . <= BURST_MAX

    def __post_init__(self) -> None:
        rate = self.requests_per_s
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= REQUESTS_PER_S_MAX:
            raise ValueError(f"requests_per_s: a number in (0, {REQUESTS_PER_S_MAX:g}] (REQUESTS_PER_S_MAX), "
                             f"got {rate!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or not 1 <= self.burst <= BURST_MAX:
            raise ValueError(f"burst: an int in 1..{BURST_MAX} (BURST_MAX), got {self.burst!r}")
        object.__setattr__(self, "requests_per_s", float(rate))


DEFAULT_RATE_LIMIT = RateLimit(requests_per_s=200.0, burst=400)


# ---------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently, which in
    a policy would let a second `admin:` entry quietly replace the first)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key that is not a scalar",
                                                    key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# ---------------------------------------------------------------------------------- the policy
def _is_pattern(role: str) -> bool:
    return role.endswith(":*")


def _pattern_matches(pattern: str, role: str) -> bool:
    prefix = pattern[:-1]                   # "agent:"
    return len(role) > len(prefix) and role.startswith(prefix)


class Policy:
    def __init__(self, permissions: dict[str, frozenset[str]], rate_default: RateLimit,
                 rate_roles: dict[str, RateLimit], *, source: str = "<memory>") -> None:
        """`permissions`: each declared role's expanded permissions (inheritance and "*" resolved).
        Use Policy.load or Policy.default; this constructor does not validate."""
        self.source = source
        self.roles: frozenset[str] = frozenset(permissions)
        self._exact = {r: p for r, p in permissions.items() if not _is_pattern(r)}
        self._patterns = [(r, p) for r, p in permissions.items() if _is_pattern(r)]
        self._rate_default = rate_default
        self._rate_exact = {r: lim for r, lim in rate_roles.items() if not _is_pattern(r)}
        self._rate_patterns = [(r, lim) for r, lim in rate_roles.items() if _is_pattern(r)]
        self._cache: dict[tuple[str, ...], tuple[frozenset[str], RateLimit]] = {}

    def __repr__(self) -> str:
        return f"Policy({self.source}, {len(self.roles)} roles)"

    # ------------------------------------------------------------------------------ queries
    def permissions_of(self, roles: Iterable[str]) -> frozenset[str]:
        """Every permission the roles hold together (inheritance, "*" and patterns expanded)."""
        return self._lookup(roles)[0]

    def allows(self, roles: Iterable[str], permission: str) -> bool:
        if permission not in PERMISSIONS:
            raise ValueError(f"permission: one of PERMISSIONS, got {permission!r}")
        return permission in self._lookup(roles)[0]

    def rate_limit_for(self, roles: Iterable[str]) -> RateLimit:
        return self._lookup(roles)[1]

    def _lookup(self, roles: Iterable[str]) -> tuple[frozenset[str], RateLimit]:
        if isinstance(roles, str):
            raise TypeError(f"roles: an iterable of role names, not one str ({roles!r})")
        key = roles if type(roles) is tuple else tuple(roles)
        found = self._cache.get(key)
        if found is None:
            found = self._compute(key)
            if len(self._cache) >= ROLE_SETS_CACHED_MAX:
                del self._cache[next(iter(self._cache))]       # the oldest entry
            self._cache[key] = found
        return found

    def _compute(self, roles: tuple[str, ...]) -> tuple[frozenset[str], RateLimit]:
        granted: set[str] = set()
        rates: list[RateLimit] = []
        for role in roles:
            if not isinstance(role, str):
                raise TypeError(f"roles: role names are str, got {type(role).__name__}")
            exact = self._exact.get(role)
            if exact is not None:
                granted |= exact
            for pattern, permissions in self._patterns:
                if _pattern_matches(pattern, role):
                    granted |= permissions
            limit = self._rate_exact.get(role)
            if limit is None:
                limit = next((lim for p, lim in self._rate_patterns if _pattern_matches(p, role)), self._rate_default)
            rates.append(limit)
        if not rates:
            rate = self._rate_default
        else:
            rate = RateLimit(max(r.requests_per_s for r in rates), max(r.burst for r in rates))
        return frozenset(granted), rate

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def default(cls) -> Policy:
        """The policy shipped beside this module (security/policy.yaml)."""
        return cls.load(Path(__file__).with_name("policy.yaml"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read(POLICY_BYTES_MAX + 1)
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read ({exc.strerror})") from None
        if len(data) > POLICY_BYTES_MAX:
            raise PolicyError(f"{path}: larger than {POLICY_BYTES_MAX} bytes (POLICY_BYTES_MAX)")
        return cls.parse(data, source=str(path))

    @classmethod
    def parse(cls, data: bytes | str, *, source: str = "<policy>") -> Policy:
        """A policy from YAML text; `source` names it in errors."""
        if isinstance(data, str):
            data = data.encode()
        if len(data) > POLICY_BYTES_MAX:
            raise PolicyError(f"{source}: larger than {POLICY_BYTES_MAX} bytes (POLICY_BYTES_MAX)")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{source}: not UTF-8 text") from None
        try:
            document = yaml.load(text, Loader=_Loader)      # noqa: S506 — a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise PolicyError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
        except RecursionError:
            raise PolicyError(f"{source}: not valid YAML: nested too deeply") from None
        return _Parser(source).policy(document)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, field: str, what: str) -> PolicyError:
        return PolicyError(f"{self.source}: {field}: {what}" if field else f"{self.source}: {what}")

    def mapping(self, value: Any, field: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(field or "(top level)", f"a mapping expected, got {_kind(value)}")
        for key in value:
            if key not in allowed:
                raise self.error(field or "(top level)",
                                 f"unknown key {key!r} (allowed: {', '.join(allowed) or 'none'})")
        return value

    def str_list(self, value: Any, field: str, items_max: int) -> list[str]:
        if not isinstance(value, list):
            raise self.error(field, f"a list of names expected, got {_kind(value)}")
        if len(value) > items_max:
            raise self.error(field, f"at most {items_max} entries, got {len(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{field}[{i}]", f"a name (str) expected, got {_kind(item)}")
        return value

    def role_name(self, name: Any, field: str) -> str:
        if not isinstance(name, str):
            raise self.error(field, f"role name {name!r}: a str expected, got {_kind(name)}")
        if len(name) > ROLE_CHARS_MAX or not _ROLE.fullmatch(name):
            raise self.error(field, f"role name {name!r}: must match {ROLE_RE} and be at most {ROLE_CHARS_MAX} "
                                    "chars (ROLE_CHARS_MAX)")
        if "*" in name and (not name.endswith(":*") or name.count("*") != 1):
            raise self.error(field, f"role name {name!r}: '*' only as the whole last segment, as in 'agent:*'")
        return name

    def rate_limit(self, value: Any, field: str) -> RateLimit:
        limit = self.mapping(value, field, _LIMIT_KEYS)
        for key in _LIMIT_KEYS:
            if key not in limit:
                raise self.error(f"{field}.{key}", "missing")
        try:
            return RateLimit(requests_per_s=limit["requests_per_s"], burst=limit["burst"])
        except ValueError as exc:
            name, _, what = str(exc).partition(": ")
            raise self.error(f"{field}.{name}", what) from None

    def policy(self, document: Any) -> Policy:
        top = self.mapping(document, "", _TOP_KEYS)
        if "version" not in top:
            raise self.error("version", f"missing (this loader reads version {POLICY_VERSION})")
        if type(top["version"]) is not int or top["version"] != POLICY_VERSION:
            raise self.error("version", f"{POLICY_VERSION} expected, got {top['version']!r}")
        if "roles" not in top:
            raise self.error("roles", "missing")
        roles = top["roles"]
        if not isinstance(roles, dict):
            raise self.error("roles", f"a mapping of role name to role expected, got {_kind(roles)}")
        if len(roles) > POLICY_ROLES_MAX:
            raise self.error("roles", f"at most {POLICY_ROLES_MAX} roles (POLICY_ROLES_MAX), got {len(roles)}")
        own: dict[str, list[str]] = {}
        inherits: dict[str, list[str]] = {}
        for name, body in roles.items():
            self.role_name(name, "roles")
            field = f"roles.{name}"
            body = self.mapping(body, field, _ROLE_KEYS)
            if "description" in body and (not isinstance(body["description"], str)
                                          or len(body["description"]) > DESCRIPTION_CHARS_MAX):
                raise self.error(f"{field}.description", f"a str of at most {DESCRIPTION_CHARS_MAX} chars expected")
            permissions = self.str_list(body.get("permissions", []), f"{field}.permissions", ROLE_PERMISSIONS_MAX)
            for i, permission in enumerate(permissions):
                if permission != ALL and permission not in PERMISSIONS:
                    raise self.error(f"{field}.permissions[{i}]",
                                     f"unknown permission {permission!r} (known: {ALL!r}, "
                                     f"{', '.join(sorted(PERMISSIONS))})")
            own[name] = permissions
            parents = self.str_list(body.get("inherits", []), f"{field}.inherits", ROLE_INHERITS_MAX)
            for i, parent in enumerate(parents):
                if parent not in roles:
                    raise self.error(f"{field}.inherits[{i}]",
                                     f"unknown role {parent!r} (declared: {', '.join(sorted(map(str, roles)))})")
            inherits[name] = parents
        expanded = self.expand(own, inherits)

        rate_default, rate_roles = DEFAULT_RATE_LIMIT, {}
        if "rate_limits" in top:
            rates = self.mapping(top["rate_limits"], "rate_limits", _RATE_KEYS)
            if "default" in rates:
                rate_default = self.rate_limit(rates["default"], "rate_limits.default")
            if "roles" in rates:
                overrides = rates["roles"]
                if not isinstance(overrides, dict):
                    raise self.error("rate_limits.roles", f"a mapping expected, got {_kind(overrides)}")
                for name, value in overrides.items():
                    if name not in roles:
                        raise self.error("rate_limits.roles", f"role {name!r} is not declared under roles "
                                                              f"(declared: {', '.join(sorted(map(str, roles)))})")
                    rate_roles[name] = self.rate_limit(value, f"rate_limits.roles.{name}")
        return Policy(expanded, rate_default, rate_roles, source=self.source)

    def expand(self, own: dict[str, list[str]], inherits: dict[str, list[str]]) -> dict[str, frozenset[str]]:
        """Each role's permissions with its ancestors' added and "*" resolved; a cycle is an error."""
        done: dict[str, frozenset[str]] = {}

        def visit(role: str, path: list[str]) -> frozenset[str]:
            if role in done:
                return done[role]
            if role in path:
                cycle = " -> ".join(path[path.index(role):] + [role])
                raise self.error(f"roles.{path[-1]}.inherits", f"cycle: {cycle}")
            granted = set(own[role])
            for parent in inherits[role]:
                granted |= visit(parent, path + [role])
            done[role] = PERMISSIONS if ALL in granted else frozenset(granted)
            return done[role]

        for role in own:
            visit(role, [])
        return done


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
