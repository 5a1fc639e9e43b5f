"""Command line of the annotation store.

    python -m annotation_db upgrade                 # migrate to the newest schema, keeping every row
    python -m annotation_db export --format parquet --out exports/
    python -m annotation_db stats                   # per model version, agreement
    python -m annotation_db erase 12 --by ADMIN --reason "consent withdrawn"   # erase a conversation
    python -m annotation_db backup OUT_DIR          # consistent snapshot of the store and images, app running
    python -m annotation_db restore OUT_DIR [--force]

The database is `--db URL`, else DERMALOOP_DB, else SQLite in `--home DIR`
(default DERMALOOP_HOME, else ./dermaloop-data). Bad flags or input: one line on
stderr and exit status 2 (1 for a database that cannot be reached); no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import StoreError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        self.exit(2, f"annotation_db: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", help="SQLAlchemy URL (default: $DERMALOOP_DB, else SQLite in --home)")
    common.add_argument("--home", help="data directory (default: $DERMALOOP_HOME or ./dermaloop-data)")
    p = _Parser(prog="python -m annotation_db", description="The DermaLoop annotation store.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("upgrade", parents=[common], help="migrate the database to the newest schema")
    ex = sub.add_parser("export", parents=[common], help="export turns, ratings, gold and preference pairs")
    ex.add_argument("--format", required=True, choices=["csv", "jsonl", "parquet", "hf"])
    ex.add_argument("--out", required=True, type=Path, help="output folder")
    ex.add_argument("--images", type=Path, help="images folder for --format hf (default: HOME/images)")
    st = sub.add_parser("stats", parents=[common], help="statistics per model version and agreement")
    st.add_argument("--over-time", metavar="FREQ", help="also per period: D, W or M")
    er = sub.add_parser("erase", parents=[common], help="erase a conversation's content (turns, images, ratings)")
    er.add_argument("conversation_id", type=int)
    er.add_argument("--by", required=True, help="the admin's user name (recorded in the tombstone)")
    er.add_argument("--reason", required=True, help="why (recorded in the tombstone), e.g. consent withdrawn")
    bk = sub.add_parser("backup", parents=[common], help="snapshot the store and its images while the app runs")
    bk.add_argument("out", type=Path, help="a new (or empty) folder for the snapshot")
    rs = sub.add_parser("restore", parents=[common], help="bring a snapshot back (stop the app first)")
    rs.add_argument("snapshot", type=Path, help="a folder made by `backup`")
    rs.add_argument("--force", action="store_true", help="replace a store that already holds data")
    return p


def _url(args) -> str:
    from .db import url_from_env

    return args.db or url_from_env(args.home)


def _home(args) -> Path:
    import os

    return Path(args.home or os.environ.get("DERMALOOP_HOME") or "dermaloop-data")


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sqlalchemy.exc import SQLAlchemyError

    from .db import Store, upgrade

    url = _url(args)
    try:
        if args.command in ("backup", "restore"):
            from . import backup as bk

            if args.command == "backup":
                print(bk.backup(url, _home(args) / "images", args.out).message, f"-> {args.out}")
            else:
                m, again = bk.restore(args.snapshot, url, _home(args) / "images", force=args.force)
                print("restored", m.message)
                if again:
                    print(f"erased again (erased in the replaced store after this snapshot): conversations {again}")
            return 0
        if args.command == "upgrade":
            upgrade(url)
            print("database is at the newest schema")
            return 0
        store = Store.open(url, migrate=True)
        try:
            if args.command == "export":
                from .export import export

                images = args.images
                if images is None and args.format == "hf" and (_home(args) / "images").is_dir():
                    images = _home(args) / "images"
                counts = export(store, args.format, args.out, images)
                print(", ".join(f"{k}: {v}" for k, v in counts.items()), f"-> {args.out}")
            elif args.command == "erase":
                from .erase import erase_conversation

                done = erase_conversation(store, args.conversation_id, by=args.by, reason=args.reason,
                                          images_dir=_home(args) / "images")
                print(done.message)
            else:
                _print_stats(store, args.over_time)
        finally:
            store.dispose()
    except StoreError as e:
        print(f"annotation_db: {e}", file=sys.stderr)
        return 2
    except SQLAlchemyError as e:
        first = str(e.orig if getattr(e, "orig", None) is not None else e).strip().splitlines()
        print(f"annotation_db: database error: {first[0] if first else type(e).__name__}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"annotation_db: {e}", file=sys.stderr)
        return 1
    return 0


def _print_stats(store, over_time: str | None) -> None:
    import pandas as pd

    from .stats import agreement, stats_by_version, stats_over_time

    with store.session() as s, pd.option_context("display.width", 200, "display.max_columns", 20,
                                                 "display.float_format", "{:.3f}".format):
        df = stats_by_version(s)
        print("per model version" if len(df) else "no model versions yet")
        if len(df):
            print(df.drop(columns=["version_id"]).to_string(index=False))
        if over_time:
            if over_time not in ("D", "W", "M"):
                from .errors import InvalidInput

                raise InvalidInput(f"--over-time takes D, W or M, not {over_time!r}")
            print(f"\nover time ({over_time})")
            over = stats_over_time(s, over_time)
            print(over.to_string(index=False) if len(over) else "no ratings yet")
        a = agreement(s)
        print("\nagreement between experts")
        for k, v in a.items():
            print(f"  {k}: {'n/a' if v is None else (f'{v:.3f}' if isinstance(v, float) else v)}")


def main() -> None:
    sys.exit(run())
