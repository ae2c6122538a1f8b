"""A real public interaction data set, fetched from PyPI and converted to the training CSV format.

Role: the held-out *public* data of the offline evaluation (issue 3): the same bar as on simulator
data (next_item2vec must beat every baseline on Recall@k and MRR@k), on interactions of real
people. This machine and CI reach package registries only, so the data comes inside a package:

* ``ml-100k`` - MovieLens 100K (GroupLens): 100,000 ratings (1-5) by 943 users of 1,682 films,
  each with the second it was entered (1997-09-20 .. 1998-04-22). It is shipped, as RecBole's
  "atomic" file ``ml-100k.inter`` (``user_id:token, item_id:token, rating:float,
  timestamp:float``), in the wheel of ``recbole`` (MIT; the data keeps GroupLens' terms) on PyPI.
  These are ratings, not clicks: each rating is one interaction (a rating implies the user watched
  the film), typed ``Product Viewed``; the rating value is dropped.

  GroupLens' terms (the data set's README): research use; no redistribution without permission
  (so the data is never committed: every run downloads the wheel); no commercial or
  revenue-bearing use without permission; no implied endorsement; publications cite F. Maxwell
  Harper and Joseph A. Konstan, "The MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015.

Inputs: the pinned wheel, downloaded with ``pip download`` (the ordinary client, from the
configured index) into ``--cache-dir`` and checked against its pinned SHA-256 before anything is
read; a cached wheel with the right checksum is reused.

Outputs: ``--output`` (default ``<storage.root>/public/<dataset>.csv``, git-ignored), header
``user_id,item_id,event_type,event_time`` (ISO-8601 UTC), rows in time order; equal times keep the
source file's order, which is then the order the models see. Ids are prefixed (``u196``,
``m242``) so they read as ids. Logs the rows read, written and skipped (exact duplicates).

    ./spark-submit.sh fetch-public-data                           # data/public/ml-100k.csv
    ./spark-submit.sh evaluate --input data/public/ml-100k.csv --test-days 28 --no-planted
    make eval-public                                              # both; report in data/public/evaluation
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from carousel import objectstore
from carousel.cli import add_config_args, config_from_args, setup_logging
from carousel.config import CarouselConfig
from carousel.schemas import INTERACTION_COLUMNS, PRODUCT_VIEWED

log = logging.getLogger("fetch-public-data")

__all__ = [
    "DATASETS",
    "DatasetError",
    "PublicDataset",
    "download_archive",
    "main",
    "parse_atomic_inter",
    "read_member",
    "run",
    "sha256_of",
    "to_interactions",
    "verify_checksum",
]


class DatasetError(Exception):
    """A download, checksum or parse problem; the message names the file and the reason."""


@dataclass(frozen=True)
class PublicDataset:
    """Where a data set lives in a registry package, pinned to one file and its checksum."""

    name: str
    package: str  # the PyPI project
    version: str
    archive: str  # the exact file pip downloads (a wheel is a zip)
    sha256: str  # of ``archive``
    member: str  # the data file inside the archive
    user_prefix: str
    item_prefix: str
    event_type: str
    description: str


DATASETS: dict[str, PublicDataset] = {
    "ml-100k": PublicDataset(
        name="ml-100k",
        package="recbole",
        version="1.2.1",
        archive="recbole-1.2.1-py3-none-any.whl",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        member="recbole/dataset_example/ml-100k/ml-100k.inter",
        user_prefix="u",
        item_prefix="m",
        event_type=PRODUCT_VIEWED,
        description="MovieLens 100K ratings with timestamps (GroupLens), from the recbole wheel",
    ),
}

# RecBole atomic files: a tab-separated header of name:type fields; these three are needed.
_USER, _ITEM, _TIME = "user_id:token", "item_id:token", "timestamp:float"


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksum(path: str | os.PathLike[str], expected: str) -> None:
    """Raise :class:`DatasetError` unless the file's SHA-256 is ``expected``."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise DatasetError(
            f"{path}: SHA-256 {actual} does not match the pinned {expected}; refusing to use it"
        )


def download_archive(dataset: PublicDataset, cache_dir: str | os.PathLike[str]) -> Path:
    """The dataset's pinned archive in ``cache_dir``: reused when its checksum matches, else downloaded.

    Uses ``python -m pip download --no-deps --only-binary :all:`` (the registry's ordinary client,
    honouring the machine's pip configuration), then checks the pinned SHA-256.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / dataset.archive
    if target.is_file():
        try:
            verify_checksum(target, dataset.sha256)
            log.info("using cached %s", target)
            return target
        except DatasetError as err:
            log.warning("%s; downloading it again", err)
            target.unlink()
    spec = f"{dataset.package}=={dataset.version}"
    with tempfile.TemporaryDirectory(prefix="carousel-public-", dir=cache) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
        command += ["--dest", tmp, spec]
        log.info("downloading %s: %s", spec, " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise DatasetError(f"pip download {spec} failed (exit {done.returncode}): " + " | ".join(tail))
        fetched = Path(tmp) / dataset.archive
        if not fetched.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise DatasetError(f"pip download {spec} gave {found}, not the pinned {dataset.archive}")
        verify_checksum(fetched, dataset.sha256)
        fetched.replace(target)
    log.info("downloaded %s (%d bytes, SHA-256 verified)", target, target.stat().st_size)
    return target


def read_member(archive: str | os.PathLike[str], member: str) -> str:
    """The text of one file inside a zip archive (a wheel)."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            return bundle.read(member).decode("utf-8")
    except KeyError:
        raise DatasetError(f"{archive}: has no member {member!r}") from None
    except zipfile.BadZipFile as err:
        raise DatasetError(f"{archive}: not a zip archive ({err})") from None


def parse_atomic_inter(text: str, source: str = "<inter>") -> pd.DataFrame:
    """Parse a RecBole atomic ``.inter`` file into ``user``, ``item`` (strings) and ``timestamp`` (int s).

    Other columns (the rating) are ignored. Raises :class:`DatasetError` naming the line and the
    reason: a header without the user, item or timestamp field, a missing id, or a timestamp that
    is not a whole number of seconds.
    """
    try:
        frame = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{source}: empty file") from None
    except pd.errors.ParserError as err:
        raise DatasetError(f"{source}: malformed file: {err}") from None
    missing = [field for field in (_USER, _ITEM, _TIME) if field not in frame.columns]
    if missing:
        raise DatasetError(f"{source}: line 1: header {list(frame.columns)} lacks {missing}")
    for field in (_USER, _ITEM, _TIME):
        empty = frame[field].isna().to_numpy()
        if empty.any():
            raise DatasetError(f"{source}: line {int(np.flatnonzero(empty)[0]) + 2}: missing {field}")
    seconds = pd.to_numeric(frame[_TIME], errors="coerce")
    bad = (seconds.isna() | (seconds % 1 != 0) | (seconds < 0)).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = frame[_TIME].iloc[row]
        raise DatasetError(f"{source}: line {row + 2}: {_TIME} {value!r} is not a whole number of seconds")
    return pd.DataFrame(
        {
            "user": frame[_USER].str.strip(),
            "item": frame[_ITEM].str.strip(),
            "timestamp": seconds.astype(np.int64),
        }
    )


def to_interactions(
    rows: pd.DataFrame, event_type: str, user_prefix: str = "", item_prefix: str = ""
) -> tuple[pd.DataFrame, int]:
    """Training-format interactions from parsed rows; returns (frame, exact duplicates dropped).

    Columns :data:`carousel.schemas.INTERACTION_COLUMNS`, times ISO-8601 UTC (``...Z``), rows sorted
    by time with a stable sort: equal times keep their source order (the data says nothing finer).
    """
    unique = rows.drop_duplicates(subset=["user", "item", "timestamp"], keep="first")
    ordered = unique.iloc[np.argsort(unique["timestamp"].to_numpy(), kind="stable")]
    times = pd.to_datetime(ordered["timestamp"].to_numpy(), unit="s", utc=True)
    frame = pd.DataFrame(
        {
            "user_id": user_prefix + ordered["user"].to_numpy(dtype=object),
            "item_id": item_prefix + ordered["item"].to_numpy(dtype=object),
            "event_type": event_type,
            "event_time": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        columns=list(INTERACTION_COLUMNS),
    )
    return frame.reset_index(drop=True), len(rows) - len(unique)


def run(
    cfg: CarouselConfig, dataset: str = "ml-100k", output: str | None = None, cache_dir: str | None = None
) -> Path:
    """Download (or reuse) the pinned archive, convert its data, write the CSV; returns its path."""
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[dataset]
    out_uri = output or cfg.storage.path("public", f"{spec.name}.csv")
    cache_uri = cache_dir or cfg.storage.path("public", "cache")
    remote = [uri for uri in (out_uri, cache_uri) if objectstore.is_s3(uri)]
    if remote:  # evaluate reads a local CSV; pip downloads to a local folder
        raise DatasetError(
            f"{remote[0]}: the output and cache must be local paths (pass --output/--cache-dir)"
        )
    out, cache = objectstore.local_path(out_uri), objectstore.local_path(cache_uri)
    archive = download_archive(spec, cache)
    source = f"{archive.name}!{spec.member}"
    rows = parse_atomic_inter(read_member(archive, spec.member), source)
    frame, skipped = to_interactions(rows, spec.event_type, spec.user_prefix, spec.item_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    frame.to_csv(partial, index=False)
    partial.replace(out)  # a reader never sees half a file
    log.info(
        "%s: read %d rows from %s, wrote %d interactions (%d users, %d items, %s .. %s) to %s, "
        "skipped %d exact duplicates",
        spec.name,
        len(rows),
        source,
        len(frame),
        frame["user_id"].nunique(),
        frame["item_id"].nunique(),
        frame["event_time"].iloc[0] if len(frame) else "-",
        frame["event_time"].iloc[-1] if len(frame) else "-",
        out,
        skipped,
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fetch-public-data",
        description="Fetch a real public interaction data set from PyPI and write it as a training CSV.",
    )
    parser.add_argument("--dataset", default="ml-100k", choices=sorted(DATASETS), help="which data set")
    parser.add_argument("--output", metavar="CSV", help="default: <storage.root>/public/<dataset>.csv")
    parser.add_argument("--cache-dir", metavar="DIR", help="default: <storage.root>/public/cache")
    return add_config_args(parser)


def main(argv: Sequence[str]) -> int:
    setup_logging()
    args = build_parser().parse_args(list(argv))
    cfg = config_from_args(args, "fetch-public-data")
    try:
        run(cfg, args.dataset, args.output, args.cache_dir)
    except DatasetError as err:
        log.error("%s", err)
        print(f"fetch-public-data: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
