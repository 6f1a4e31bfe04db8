"""Local storage keeps the contract: an object appears only when its write completes."""

from datetime import UTC, datetime, timedelta

import pytest

from tests.storage_contract import StorageContract
from vq_tasks.retention.plan import prune
from vq_tasks.settings import load_settings
from vq_tasks.storage import open_storage
from vq_tasks.storage.base import StorageError
from vq_tasks.storage.local import LocalStorage


def test_write_commits_only_on_success(tmp_path):
    storage = LocalStorage(tmp_path / "store")
    with storage.open_write("a.tar.gz") as out:
        out.write(b"hello")
    assert storage.stat("a.tar.gz").size == 5
    with pytest.raises(RuntimeError), storage.open_write("b.tar.gz") as out:
        out.write(b"half")
        raise RuntimeError("the source died")
    assert [o.name for o in storage.list()] == ["a.tar.gz"]  # no partial file left behind
    assert (tmp_path / "store").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "store" / "a.tar.gz").stat().st_mode & 0o777 == 0o600


def test_read_delete_and_names(tmp_path):
    storage = LocalStorage(tmp_path)
    with storage.open_write("m.json") as out:
        out.write(b"{}")
    assert storage.read_bytes("m.json") == b"{}"
    assert storage.delete("m.json") and not storage.delete("m.json")
    for bad in ("../escape", ".hidden", ""):
        with pytest.raises(StorageError):
            storage.stat(bad)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs the right to mount, as in CI's root sandbox)."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_fails_clearly_and_leaves_nothing(tiny_disk):
    storage = LocalStorage(tiny_disk / "store")
    with pytest.raises(StorageError, match="no space left"), storage.open_write("big.tar.gz") as out:
        for _ in range(4):
            out.write(bytes(512 * 1024))
    assert storage.list() == []


def test_prune_on_real_files(tmp_path):
    now = datetime(2024, 3, 1, 12, tzinfo=UTC)
    settings = load_settings(
        backup_storage_path=str(tmp_path),
        backup_staging_dir=tmp_path.parent / "staging-of-prune-test",
        celery_broker_url="redis://127.0.0.1:1/0",
        backup_retention_days=30,
        backup_logs_retention_days=7,
        backup_weekly_retention_weeks=0,  # its manifests are unreadable: kept as monthly otherwise
        backup_monthly_retention_months=0,
    )
    storage = LocalStorage(tmp_path)

    def make(days: float, manifest: bool = True) -> str:
        backup_id = f"virtualqueue_backup_{now - timedelta(days=days):%Y%m%d_%H%M%S}"
        for suffix in (".tar.gz", "_logs.tar.gz") + (("_manifest.json",) if manifest else ()):
            (tmp_path / f"{backup_id}{suffix}").write_bytes(b"x")
        return backup_id

    newest, week_old, expired, debris, running = make(1), make(10), make(45), make(3, False), make(0.2, False)
    (tmp_path / "README.txt").write_text("not a backup")
    dry = prune(storage, settings, now, dry_run=True)
    assert len(dry.deletions) == 6 and len(list(tmp_path.iterdir())) == 14  # a dry run deletes nothing
    prune(storage, settings, now)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        [f"{newest}{s}" for s in (".tar.gz", "_logs.tar.gz", "_manifest.json")]
        + [f"{week_old}.tar.gz", f"{week_old}_manifest.json"]
        + [f"{running}.tar.gz", f"{running}_logs.tar.gz", "README.txt"]
    )
    assert not any(expired in n or debris in n for n in left)
    assert prune(storage, settings, now).deletions == []  # running it again changes nothing


def test_stale_staging_folders_go_and_running_ones_stay(tmp_path):
    from vq_tasks.retention.plan import remove_stale

    now = datetime(2024, 3, 1, 12, tzinfo=UTC)
    for name in ("virtualqueue_backup_20240227_020000", "virtualqueue_backup_20240301_020000", "lost+found"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "database.part").write_bytes(b"x")
    removed = remove_stale(tmp_path, "virtualqueue_backup", now, timedelta(days=1))
    assert removed == ["virtualqueue_backup_20240227_020000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lost+found", "virtualqueue_backup_20240301_020000"]


class TestLocalContract(StorageContract):
    @pytest.fixture
    def storage_factory(self, tmp_path):
        counter = iter(range(1000))

        def make(part_size_mb: int = 8, concurrency: int = 4):
            settings = load_settings(
                backup_storage_path=str(tmp_path / f"root-{next(counter)}"),
                celery_broker_url="redis://127.0.0.1:1/0",
                backup_upload_part_size_mb=part_size_mb,
                backup_upload_concurrency=concurrency,
            )
            return open_storage(settings)

        return make
