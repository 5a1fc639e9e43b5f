"""Who is asking, and with which role: local mode, a users file, or Hugging Face OAuth.

    python -m demo.auth hash              # prints a bcrypt hash for a password typed twice
    python -m demo.auth add users.yaml eve expert
    printf '%s\n' "$PW" | python -m demo.auth add users.yaml eve expert --password-stdin   # scripted

Three modes, chosen at start-up:
- local (default): one user, `Settings.local_user`, role expert; no login.
- password: `--auth-file users.yaml` (or DERMALOOP_AUTH_FILE). Gradio's login page
  checks the bcrypt hash through `demo.security.LoginGuard` (off the event loop, with
  back-off); the rater is always `gr.Request.username`.
- oauth (Spaces): `gr.LoginButton`; roles from the DERMALOOP_ROLES secret
  ("alice=admin,bob=expert"); everyone else signed in gets DERMALOOP_DEFAULT_ROLE
  (clinician). Not signed in: no access.

users.yaml:

    users:
      eve: {role: expert, password_hash: "$2b$12$..."}
      cara: {role: clinician, password_hash: "$2b$12$..."}

Roles are enforced here, server-side, in every handler: never from a form field.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from annotation_db.models import RATER_ROLES as RATERS  # may submit full ratings and use the Review tab
from annotation_db.models import ROLES


class AuthError(Exception):
    """A users file or role list that cannot be used (a message for the person starting the app)."""


class Denied(Exception):
    """The signed-in user may not do this (turned into gr.Error at the edge)."""


@dataclass(frozen=True)
class Identity:
    name: str
    role: str

    @property
    def can_rate(self) -> bool:
        return self.role in RATERS

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class UserEntry:
    role: str
    password_hash: str = field(repr=False)


@dataclass
class AuthConfig:
    mode: str = "local"  # local | password | oauth
    local_user: str = "local-expert"
    users: dict[str, UserEntry] = field(default_factory=dict)  # password mode
    oauth_roles: dict[str, str] = field(default_factory=dict)  # oauth mode: username -> role
    default_role: str = "clinician"  # oauth mode: signed in but not listed

    @classmethod
    def local(cls, user: str = "local-expert") -> "AuthConfig":
        return cls(mode="local", local_user=user)

    @classmethod
    def from_file(cls, path: str | Path) -> "AuthConfig":
        return cls(mode="password", users=load_users(path))

    @classmethod
    def oauth(cls, roles: str = "", default_role: str = "clinician") -> "AuthConfig":
        if default_role not in ROLES:
            raise AuthError(f"default role must be one of {', '.join(ROLES)}, not {default_role!r}")
        return cls(mode="oauth", oauth_roles=parse_roles(roles), default_role=default_role)

    # -- every handler ------------------------------------------------------
    def identify(self, request: Any) -> Identity:
        """The user behind `request` (a gr.Request or anything with .username / a session)."""
        if self.mode == "local":
            return Identity(self.local_user, "expert")
        if self.mode == "password":
            name = getattr(request, "username", None) if request is not None else None
            if not name or name not in self.users:
                raise Denied("please sign in first")
            return Identity(name, self.users[name].role)
        name = oauth_username(request) or token_username(request)
        if not name:
            raise Denied("please sign in with Hugging Face first (the button at the top)")
        return Identity(name, self.oauth_roles.get(name, self.default_role))

    def require_rater(self, request: Any) -> Identity:
        who = self.identify(request)
        if not who.can_rate:
            raise Denied(f"{who.name} is a {who.role}: expert ratings and the Review tab are for experts and admins")
        return who

    def require_admin(self, request: Any, what: str = "roll back a model version") -> Identity:
        who = self.identify(request)
        if not who.is_admin:
            raise Denied(f"{who.name} is a {who.role}: only admins can {what}")
        return who


def oauth_username(request: Any) -> str | None:
    """The Hugging Face username in the request's session (set by gr.LoginButton's login flow)."""
    if request is None:
        return None
    try:
        from gradio.helpers import _session_from_request

        session = _session_from_request(request)
    except ImportError:  # pragma: no cover - older gradio
        session = getattr(getattr(request, "request", request), "session", None) or {}
    info = session.get("oauth_info") if hasattr(session, "get") else None
    if not info:
        return None
    expires = info.get("expires_at")
    if expires is not None and expires < time.time():
        return None
    user = info.get("userinfo") or {}
    return user.get("preferred_username") or user.get("name")


_TOKEN_USERS: dict[str, tuple[str, float]] = {}  # sha256(token) -> (username, checked at)


def token_username(request: Any, whoami: Any = None) -> str | None:
    """API calls on a Space (gradio_client's `hf_token=`) carry a Hugging Face token, not a session:
    the Hub says whose it is (cached ten minutes; only a hash of the token is kept)."""
    import hashlib

    headers = getattr(request, "headers", None) if request is not None else None
    auth = (headers.get("authorization") or headers.get("Authorization") or "") if headers else ""
    if not auth.lower().startswith("bearer "):
        return None
    token = auth[7:].strip()
    key = hashlib.sha256(token.encode()).hexdigest()
    cached = _TOKEN_USERS.get(key)
    if cached and time.time() - cached[1] < 600:
        return cached[0]
    if whoami is None:
        from huggingface_hub import whoami
    try:
        name = whoami(token=token).get("name")
    except Exception:  # an invalid token, or the Hub unreachable: not signed in
        return None
    if name:
        _TOKEN_USERS[key] = (name, time.time())
    return name


def parse_roles(text: str) -> dict[str, str]:
    """"alice=admin, bob=expert" (or one per line) -> {"alice": "admin", "bob": "expert"}."""
    out: dict[str, str] = {}
    for item in (text or "").replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, role = item.partition("=")
        name, role = name.strip(), role.strip()
        if not sep or not name or role not in ROLES:
            raise AuthError(f"role list entry {item!r} is not name=role with role one of {', '.join(ROLES)}")
        out[name] = role
    return out


def load_users(path: str | Path) -> dict[str, UserEntry]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise AuthError(f"users file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise AuthError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    raw = data.get("users") if isinstance(data, dict) else None
    if isinstance(raw, list):  # also accept a list of {name, role, password_hash}
        raw = {str(u.get("name")): u for u in raw if isinstance(u, dict)}
    if not isinstance(raw, dict) or not raw:
        raise AuthError(f"{path} has no users: expected a 'users:' mapping of name -> {{role, password_hash}}")
    users: dict[str, UserEntry] = {}
    for name, entry in raw.items():
        if not isinstance(entry, dict):
            raise AuthError(f"{path}: user {name!r} needs role and password_hash")
        role, hashed = entry.get("role"), entry.get("password_hash")
        if role not in ROLES:
            raise AuthError(f"{path}: user {name!r} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(hashed, str) or not hashed.startswith("$2"):
            raise AuthError(f"{path}: user {name!r} needs a bcrypt password_hash (python -m demo.auth hash)")
        users[str(name).strip()] = UserEntry(role=role, password_hash=hashed)
    return users


def hash_password(password: str, rounds: int = 12) -> str:
    import bcrypt

    if not password:
        raise AuthError("the password is empty")
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def add_user(path: str | Path, name: str, role: str, password: str, rounds: int = 12) -> None:
    """Add or replace one user in a users file (created if missing)."""
    import yaml

    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    path = Path(path)
    data = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
    data.setdefault("users", {})[name] = {"role": role, "password_hash": hash_password(password, rounds)}
    # Written 0600 under a temp name, then renamed: never readable by others, never half-written.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(yaml.safe_dump(data, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def auth_from_env(auth_file: str | Path | None, local_user: str) -> AuthConfig:
    """The mode for this start: a users file, else OAuth on a Space with hf_oauth, else local."""
    auth_file = auth_file or os.environ.get("DERMALOOP_AUTH_FILE")
    if auth_file:
        return AuthConfig.from_file(auth_file)
    if os.environ.get("SPACE_ID") and os.environ.get("OAUTH_CLIENT_ID"):
        return AuthConfig.oauth(os.environ.get("DERMALOOP_ROLES", ""), os.environ.get("DERMALOOP_DEFAULT_ROLE", "clinician"))
    return AuthConfig.local(local_user)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.auth", description="Manage the users file of `--auth-file`.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hash", help="print a bcrypt hash of a password read from the terminal")
    add = sub.add_parser("add", help="add or replace a user in a users file")
    add.add_argument("file", type=Path)
    add.add_argument("name")
    add.add_argument("role", choices=ROLES)
    for p in sub.choices.values():
        p.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    args = parser.parse_args(argv)
    try:
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass("password: ")
            if password != getpass.getpass("again: "):
                raise AuthError("the passwords differ")
        if args.cmd == "hash":
            print(hash_password(password))
        else:
            add_user(args.file, args.name, args.role, password)
            print(f"{args.name} ({args.role}) written to {args.file}")
    except AuthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
