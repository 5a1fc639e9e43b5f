"""Periodic push of a consistent snapshot of the store to a private Hugging Face dataset repository,
for a Space (whose persistent storage is not guaranteed). Off unless a repository is named.

    python -m demo --backup-repo ORG/dermaloop-backup [--backup-every-min 60]
    # or DERMALOOP_BACKUP_REPO / DERMALOOP_BACKUP_EVERY_MIN; the token: HF_TOKEN (a Space secret)

    from annotation_db.hub_backup import HubBackup
    HubBackup(url, images_dir, "org/dermaloop-backup").push()   # one push, now

Each push takes `backup.backup()` into a fresh temporary folder (SQLite's online backup or
pg_dump: never the live database file, which may be mid-write) and makes one commit that
mirrors it (`upload_folder` with `delete_patterns="*"`): annotations.db (or store.dump),
manifest.json and images/. When the commit removes files (images an erasure deleted), the
repository's history is squashed (`super_squash_history`) so the erased images do not stay
in an older commit. The repository is created private, and a public one is refused. The
token is read by huggingface_hub (HF_TOKEN or a stored login) and never written anywhere.

Why not huggingface_hub's CommitScheduler: it uploads the changed files of a folder that the
app writes into, but never deletes a remote file (an erasure would stay in the backup), and a
snapshot would need its lock around our writes anyway; a timer around `upload_folder` is as
short and does both. `annotation_db` never imports torch; huggingface_hub is imported lazily.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backup import BackupError, Manifest, backup
from .errors import InvalidInput

log = logging.getLogger("dermaloop.backup")

NO_TOKEN = ("backing up to {repo} needs a Hugging Face token with write access: set HF_TOKEN "
            "(on a Space: Settings → Variables and secrets → New secret)")


@dataclass(frozen=True)
class Pushed:
    repo_id: str
    manifest: Manifest
    files: int  # files in the snapshot (each commit mirrors all of them; unchanged ones cost nothing on the Hub)
    removed: list[str]  # remote files the snapshot no longer has (erased images)
    squashed: bool  # history squashed, so removed files are gone from older commits too


class HubBackup:
    """Push snapshots of the store at `url` and of `images_dir` to the private dataset `repo_id`."""

    def __init__(self, url: str, images_dir: Path | str, repo_id: str, *, token: str | None = None, api: Any = None):
        repo_id = (repo_id or "").strip()
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise InvalidInput(f"backup repository {repo_id!r} must be named OWNER/NAME (a dataset repository)")
        from huggingface_hub import HfApi, get_token

        token = token or get_token()
        if not token:
            raise BackupError(NO_TOKEN.format(repo=repo_id))
        self.url, self.images_dir, self.repo_id = url, Path(images_dir), repo_id
        self.api = api or HfApi(token=token)
        self._ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _ensure_repo(self) -> None:
        if self._ready:
            return
        self.api.create_repo(self.repo_id, repo_type="dataset", private=True, exist_ok=True)
        if not self.api.repo_info(self.repo_id, repo_type="dataset").private:
            raise BackupError(f"backup repository {self.repo_id} is public; make it private (the store holds clinical data)")
        self._ready = True

    def push(self) -> Pushed:
        """One snapshot, one commit."""
        self._ensure_repo()
        with tempfile.TemporaryDirectory(prefix="dermaloop-backup-") as tmp:
            out = Path(tmp) / "snapshot"
            manifest = backup(self.url, self.images_dir, out)
            local = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
            remote = self.api.list_repo_files(self.repo_id, repo_type="dataset")
            removed = sorted(set(remote) - set(local) - {".gitattributes"})
            self.api.upload_folder(repo_id=self.repo_id, repo_type="dataset", folder_path=str(out), path_in_repo="",
                                   delete_patterns="*", commit_message=f"DermaLoop backup: {manifest.message}")
        squashed = False
        if removed:  # erased images must not survive in the repository's history
            self.api.super_squash_history(self.repo_id, repo_type="dataset",
                                          commit_message=f"DermaLoop backup (history squashed after erasure): {manifest.message}")
            squashed = True
        return Pushed(self.repo_id, manifest, len(local), removed, squashed)

    # -- on a timer -------------------------------------------------------------------
    def start(self, every_min: float) -> threading.Thread:
        """Push every `every_min` minutes in a daemon thread (first push after one interval); a failed push
        is logged and retried at the next one, never stopping the app."""
        if not every_min > 0:
            raise InvalidInput(f"backup interval must be a positive number of minutes, not {every_min!r}")

        def loop() -> None:
            while not self._stop.wait(every_min * 60):
                try:
                    done = self.push()
                    log.info("backup pushed to %s: %s", self.repo_id, done.manifest.message)
                except Exception as e:  # the network, the Hub, a full disk: try again next time
                    log.error("backup to %s failed (retrying in %g min): %s: %s", self.repo_id, every_min, type(e).__name__, e)

        self._thread = threading.Thread(target=loop, name="dermaloop-hub-backup", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
