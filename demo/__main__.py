"""Start the DermaLoop app.

    python -m demo --versions          # library versions and known-bad combinations
    python -m demo [--host 127.0.0.1] [--port 7860] [--model ID_OR_DIR] [--adapter DIR]
                   [--db URL] [--home DIR] [--auth-file users.yaml] [--share] [--allow-anonymous]

Migrates the database, loads the model (falling back to the offline demo model when
the configured one cannot be loaded), serves the store's active version and prints
the URL. Environment variables: those of `core.config.Settings` (DERMALOOP_*),
DERMALOOP_AUTH_FILE, DERMALOOP_REVIEW_NEED, DERMALOOP_ALLOW_ANONYMOUS; on Spaces see
`demo.spaces`.

Without a users file or Hugging Face sign-in, every visitor is the local expert (who can
rate, correct and export), so the app refuses to start when it would be reachable from
other machines (`--share`, a non-loopback `--host`, a Space) unless `--allow-anonymous`
(or DERMALOOP_ALLOW_ANONYMOUS=1) says that is intended.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass

from core.config import opt
from demo.spaces import prepare

_T0 = time.perf_counter()


@dataclass
class LaunchOptions:
    """How this process serves the app (the instance itself: core.config.Settings)."""

    _argument_group_name = "serving"

    host: str | None = opt(None, "address to listen on (127.0.0.1; 0.0.0.0 on Spaces)")
    port: int | None = opt(None, "port (7860, or the next free one)")
    adapter: str | None = opt(None, "serve this LoRA adapter directory as the active version", metavar="DIR")
    auth_file: str | None = opt(None, "users.yaml with password hashes and roles (DERMALOOP_AUTH_FILE)", metavar="FILE")
    share: bool = opt(False, "also open a public gradio.live link")
    allow_anonymous: bool = opt(False, "serve without logins even when reachable from other machines (DERMALOOP_ALLOW_ANONYMOUS=1)")
    review_need: int | None = opt(None, "expert reviews wanted per answer (DERMALOOP_REVIEW_NEED, else 2)")
    backup_repo: str | None = opt(None, "every --backup-every-min, push a snapshot of the store and images to this private Hugging Face "
                                  "dataset repository (DERMALOOP_BACKUP_REPO; token: HF_TOKEN); off by default", metavar="OWNER/NAME")
    backup_every_min: float | None = opt(None, "minutes between backup pushes (DERMALOOP_BACKUP_EVERY_MIN, else 60)")
    offline_fallback: bool = opt(True, "on a store with no model versions, use the offline demo model when the model cannot be loaded")
    versions: bool = opt(False, "print the versions of torch, transformers, peft... and known-bad combinations, then exit")


_TRUE = {"1", "true", "yes", "on"}


def is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: may be reachable from elsewhere
        return False


def exposure(args: argparse.Namespace, on_space: bool, environ: dict | None = None) -> str | None:
    """Why this start would be reachable from other machines (None when it only listens on loopback)."""
    env = os.environ if environ is None else environ
    if args.share:
        return "--share opens a public link"
    if on_space:
        return "this is a Hugging Face Space"
    host = args.host or env.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    if not is_loopback(host):
        return f"host {host} is not a loopback address"
    return None


def check_anonymous(args: argparse.Namespace, mode: str, on_space: bool, environ: dict | None = None) -> None:
    """Refuse (SystemExit 2, one line) to serve the login-free local mode where others can reach it,
    unless --allow-anonymous / DERMALOOP_ALLOW_ANONYMOUS says so (then warn)."""
    env = os.environ if environ is None else environ
    if mode != "local":
        return
    why = exposure(args, on_space, env)
    if why is None:
        return
    if args.allow_anonymous or (env.get("DERMALOOP_ALLOW_ANONYMOUS") or "").strip().lower() in _TRUE:
        print(f"WARNING: {why} and there are no logins: anyone who reaches the app acts as the local expert "
              "(rates, corrects, exports).", file=sys.stderr, flush=True)
        return
    print(f"error: {why} but there are no logins (anyone could rate, correct and export): use --auth-file "
          "(or hf_oauth on a Space), or --allow-anonymous / DERMALOOP_ALLOW_ANONYMOUS=1 if that is intended",
          file=sys.stderr)
    raise SystemExit(2)


def backup_pusher(args: argparse.Namespace, settings, environ: dict | None = None):
    """(HubBackup, minutes) when a backup repository is named by flag or DERMALOOP_BACKUP_REPO, else (None, 0).
    Checked at start: a missing token or a bad name stops the app with one line, not an hour later."""
    env = os.environ if environ is None else environ
    repo = args.backup_repo or env.get("DERMALOOP_BACKUP_REPO")
    if not repo:
        return None, 0.0
    every = args.backup_every_min or float(env.get("DERMALOOP_BACKUP_EVERY_MIN") or 60)
    if not every > 0:
        raise ValueError(f"backup interval must be a positive number of minutes, not {every:g}")
    from annotation_db.hub_backup import HubBackup

    return HubBackup(settings.db_url, settings.images_dir, repo), every


def create(argv: list[str] | None = None):
    """(demo, launch kwargs) from command-line arguments: what `main` and the Spaces app.py serve."""
    space = prepare()  # before torch is imported
    # OpenMP reads this once, when torch starts. Spinning worker threads stall the prompt's encoding 5-20x
    # on cores other processes share (a Space, a clinic's VM; docs/serving.md); waiting passively costs
    # little on a dedicated machine. Set OMP_WAIT_POLICY=ACTIVE to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from core import compat
    from core.config import Settings, parse_cli
    from core.errors import DermaLoopError

    if "--versions" in (sys.argv[1:] if argv is None else argv):  # before any setting is read
        print(compat.report())
        raise SystemExit(0)
    for line in compat.warnings(compat.versions()):
        print(line, file=sys.stderr, flush=True)
    from annotation_db.errors import StoreError
    from demo.auth import AuthError, auth_from_env

    try:  # what a person can get wrong is checked before the slow imports
        (args, settings), given = parse_cli([LaunchOptions, Settings], argv, prog="python -m demo", description=__doc__)
        from demo.security import prepare_upload_folder

        prepare_upload_folder(settings.home)
        auth = auth_from_env(args.auth_file, settings.local_user)
        check_anonymous(args, auth.mode, space.on_space)
        need = args.review_need or int(os.environ.get("DERMALOOP_REVIEW_NEED") or 2)
        if need < 1:
            raise ValueError(f"review need must be at least 1, not {need}")
        hub_backup, every_min = backup_pusher(args, settings)
        from demo.runtime import DemoOptions, start

        options = DemoOptions(review_need=need, offline_fallback=args.offline_fallback)
        explicit_model = "model" in given
        runtime = start(settings, options, adapter=args.adapter, explicit_model=explicit_model, notices=space.notices,
                        zerogpu=space.zerogpu)
    except (DermaLoopError, StoreError, AuthError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from demo.app import build_demo, launch_kwargs

    demo = build_demo(runtime.settings, auth=auth, options=options, runtime=runtime)
    from demo.security import start_upload_sweeper

    start_upload_sweeper(demo.upload_file_set)
    if hub_backup is not None:
        hub_backup.start(every_min)
        print(f"Backups: a snapshot is pushed to the private dataset {hub_backup.repo_id} every {every_min:g} min", flush=True)
    kwargs = launch_kwargs(demo, server_name=args.host, server_port=args.port, share=args.share or None)
    return demo, kwargs


def main(argv: list[str] | None = None) -> None:
    # Our own progress at INFO; libraries (alembic, httpx, absl...) only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dermaloop").setLevel(logging.INFO)
    demo, kwargs = create(argv)
    runtime = demo.dermaloop.runtime
    print(f"DermaLoop ready in {time.perf_counter() - _T0:.1f} s: model {runtime.engine.info.source} "
          f"({runtime.engine.info.device}), serving version {runtime.version}"
          f"{', OFFLINE DEMO MODEL' if runtime.offline else ''}; data in {runtime.settings.home}", flush=True)
    demo.launch(**kwargs)


if __name__ == "__main__":
    main()
