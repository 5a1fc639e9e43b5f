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

from demo.spaces import prepare

_T0 = time.perf_counter()


def build_parser() -> argparse.ArgumentParser:
    from core.config import add_settings_args

    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 on Spaces)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    parser.add_argument("--adapter", default=None, help="serve this LoRA adapter directory as the active version")
    parser.add_argument("--auth-file", default=None, help="users.yaml with password hashes and roles (DERMALOOP_AUTH_FILE)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--allow-anonymous", action="store_true",
                        help="serve without logins even when reachable from other machines (DERMALOOP_ALLOW_ANONYMOUS=1)")
    parser.add_argument("--review-need", type=int, default=None, help="expert reviews wanted per answer (default 2)")
    parser.add_argument("--no-offline-fallback", action="store_true",
                        help="on a store with no model versions, fail instead of using the offline demo model")
    parser.add_argument("--versions", action="store_true",
                        help="print the versions of torch, transformers, peft... and known-bad combinations, then exit")
    add_settings_args(parser, only=("home", "model", "db", "device", "dtype", "image_splitting", "max_new_tokens", "local_user",
                                    "offline_demo", "review_own_answers"))
    return parser


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


def create(argv: list[str] | None = None):
    """(demo, launch kwargs) from command-line arguments: what `main` and the Spaces app.py serve."""
    space = prepare()  # before torch is imported
    args = build_parser().parse_args(argv)
    from core import compat

    if args.versions:
        print(compat.report())
        raise SystemExit(0)
    for line in compat.warnings(compat.versions()):
        print(line, file=sys.stderr, flush=True)
    from annotation_db.errors import StoreError
    from core.config import settings_from_args
    from core.errors import DermaLoopError
    from demo.auth import AuthError, auth_from_env

    try:  # what a person can get wrong is checked before the slow imports
        settings = settings_from_args(args)
        from demo.security import prepare_upload_folder

        prepare_upload_folder(settings.home)
        auth = auth_from_env(args.auth_file, settings.local_user)
        check_anonymous(args, auth.mode, space.on_space)
        need = args.review_need or int(os.environ.get("DERMALOOP_REVIEW_NEED") or 2)
        if need < 1:
            raise ValueError(f"review need must be at least 1, not {need}")
        from demo.runtime import DemoOptions, start

        options = DemoOptions(review_need=need, offline_fallback=not args.no_offline_fallback)
        explicit_model = args.model is not None or bool(os.environ.get("DERMALOOP_MODEL"))
        runtime = start(settings, options, adapter=args.adapter, explicit_model=explicit_model, notices=space.notices,
                        zerogpu=space.zerogpu)
    except (DermaLoopError, StoreError, AuthError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from demo.app import build_demo, launch_kwargs

    demo = build_demo(runtime.settings, auth=auth, options=options, runtime=runtime)
    from demo.security import start_upload_sweeper

    start_upload_sweeper(demo.upload_file_set)
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
