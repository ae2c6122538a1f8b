"""The local Python worker daemon (``carousel.spark_daemon``): archives re-read only when changed.

Unit tests on real zip archives imported through ``zipimport``, and one check that a local
session runs its Python tasks through the daemon (imports frozen, Unix sockets).
"""

from __future__ import annotations

import importlib
import sys
import zipfile
import zipimport
from pathlib import Path

import pytest

from carousel import spark_daemon


@pytest.fixture
def patched_zipimport():
    original = zipimport.zipimporter.invalidate_caches
    spark_daemon.install()
    try:
        yield
    finally:
        zipimport.zipimporter.invalidate_caches = original  # type: ignore[method-assign]


def _write_zip(path: Path, modules: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in modules.items():
            archive.writestr(f"{name}.py", text)


def test_an_unchanged_archive_is_not_read_again(patched_zipimport, tmp_path, monkeypatch) -> None:
    archive = tmp_path / "code.zip"
    _write_zip(archive, {"carousel_zip_probe_a": "VALUE = 1\n"})
    monkeypatch.syspath_prepend(str(archive))
    importlib.import_module("carousel_zip_probe_a")
    reads: list[str] = []
    original = spark_daemon._reread
    monkeypatch.setattr(
        spark_daemon, "_reread", lambda importer: (reads.append(importer.archive), original(importer))
    )
    importlib.invalidate_caches()
    importlib.invalidate_caches()
    assert reads.count(str(archive)) == 1  # the first call stamps it, the second skips it
    sys.modules.pop("carousel_zip_probe_a", None)


def test_an_archive_replaced_in_place_is_read_again(patched_zipimport, tmp_path, monkeypatch) -> None:
    archive = tmp_path / "code.zip"
    _write_zip(archive, {"carousel_zip_probe_b": "VALUE = 1\n"})
    monkeypatch.syspath_prepend(str(archive))
    assert importlib.import_module("carousel_zip_probe_b").VALUE == 1
    importlib.invalidate_caches()
    # A new module added to the archive (its size changes): importable after the invalidation.
    _write_zip(archive, {"carousel_zip_probe_b": "VALUE = 1\n", "carousel_zip_probe_c": "VALUE = 2\n"})
    importlib.invalidate_caches()
    assert importlib.import_module("carousel_zip_probe_c").VALUE == 2
    sys.modules.pop("carousel_zip_probe_b", None)
    sys.modules.pop("carousel_zip_probe_c", None)


def test_a_local_session_runs_python_tasks_through_the_daemon(spark) -> None:
    assert spark.sparkContext.getConf().get("spark.python.daemon.module") == "carousel.spark_daemon"

    def worker_facts(_rows):
        import gc
        import os
        import zipimport

        # The zip patch, the imports frozen before the fork, and Unix sockets to the executor.
        yield (
            zipimport.zipimporter.invalidate_caches.__name__,
            gc.get_freeze_count() > 0,
            os.environ.get("PYTHON_UNIX_DOMAIN_ENABLED", "").lower(),
        )

    facts = spark.sparkContext.parallelize(range(4), 2).mapPartitions(worker_facts).collect()
    assert facts == [("invalidate_unless_unchanged", True, "true")] * 2
