#!/usr/bin/env python
"""Fetch the MovieLens-100k posters the README's poster tables were made with, for a machine with internet.

    .venv/bin/python scripts/fetch_posters.py            # into ~/.cache/llmhyper/posters (used automatically)
    .venv/bin/python scripts/fetch_posters.py --out DIR  # elsewhere; then pass --posters DIR to llmhyper

Source: the public GitHub repository liangfgithub/liangfgithub.github.io at a pinned commit, which holds
MovieLens-1M posters as MovieImages/<ML-1M id>.jpg and the ML-1M id -> "Title (Year)" table as
MovieData/movies.dat. A MovieLens-100k movie gets the poster of the ML-1M movie with the same "Title (Year)"
(case and spacing ignored), as the team's poster folder was made. Every file must match its SHA-256 in
data/ml100k-posters.sha256 (committed: checksums only) or it is refused; verified files are written atomically
as OUT/images/<ML-100k id>.jpg with OUT/posters.csv (movie_id, movie_title, image). A rerun fetches only what
is missing. Nothing is written into the repository.

The posters are copyrighted studio artwork: use them for research with this project, do not redistribute.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from llmhyper.paths import cache_dir
from llmhyper.store import write_bytes_atomic, write_text_atomic

COMMIT = "518cc7193567b1e9ec1a2f5ac4fc237c5f884cf8"
SOURCE = f"https://raw.githubusercontent.com/liangfgithub/liangfgithub.github.io/{COMMIT}/"
CHECKSUMS = REPO / "data" / "ml100k-posters.sha256"
TERMS = ("MovieLens-100k posters fetched by llmhyper's scripts/fetch_posters.py from the public GitHub "
         f"repository liangfgithub/liangfgithub.github.io (commit {COMMIT}), each checked against its "
         "SHA-256.\n"
         "They are copyrighted studio artwork: use them for research with llmhyper only; do not redistribute "
         "them or commit them to a repository.\n")


class FetchError(Exception):
    """A one-line reason the fetch cannot go on."""


def norm_title(title: str) -> str:
    return " ".join(str(title).split()).casefold()


def read_checksums(path: Path) -> dict[str, str]:
    """ML-100k movie id -> expected SHA-256, from `sha256sum` lines "<hash>  images/<id>.jpg"."""
    out: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FetchError(f"cannot read the checksum list {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split()
        name = parts[-1] if len(parts) == 2 else ""
        if len(parts) != 2 or len(parts[0]) != 64 or not name.startswith("images/") or name[-4:] != ".jpg":
            raise FetchError(f"{path}, row {n}: expected '<sha256>  images/<id>.jpg', got {line[:80]!r}")
        out[name[len("images/"):-len(".jpg")]] = parts[0].lower()
    return out


def read_titles(path: Path | None) -> dict[str, str]:
    """ML-100k movie id -> title: from a CSV with movie_id and movie_title columns, else from the
    MovieLens-100k tables llmhyper downloads (fetched first if needed)."""
    if path is None:
        from llmhyper.data import movielens as ml  # pandas and the MovieLens tables only when needed

        items = ml.read_tables(ml.fetch())[1]
        return {str(int(m)): str(t) for m, t in zip(items["movie_id"], items["movie_title"], strict=True)}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise FetchError(f"cannot read the titles file {path}: {exc.strerror}") from None
    if not rows or not {"movie_id", "movie_title"} <= set(rows[0]):
        raise FetchError(f"{path}: needs the columns movie_id and movie_title")
    return {str(r["movie_id"]).strip(): r["movie_title"] for r in rows}


def get(url: str, *, tries: int = 3, timeout: float = 60.0) -> bytes | None:
    """The bytes at `url`; None for a 404 (no such poster); FetchError after `tries` other failures."""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(getattr(exc, "reason", None), FileNotFoundError):  # a file:// source lacks it
                return None
            reason = str(getattr(exc, "reason", exc))
        if attempt + 1 < tries:
            time.sleep(2 ** attempt)
    raise FetchError(f"cannot download {url} ({reason}); check the internet connection, or give --source")


def ml1m_ids_by_title(source: str) -> dict[str, list[str]]:
    """Normalised "Title (Year)" -> ML-1M ids, from MovieData/movies.dat at the source."""
    raw = get(source + "MovieData/movies.dat")
    if raw is None:
        raise FetchError(f"{source}MovieData/movies.dat does not exist; is --source right?")
    out: dict[str, list[str]] = {}
    for n, line in enumerate(io.StringIO(raw.decode("latin-1")), start=1):
        parts = line.rstrip("\r\n").split("::")
        if len(parts) < 2 or not parts[0].strip().isdigit():
            if line.strip():
                raise FetchError(f"{source}MovieData/movies.dat, row {n}: expected 'id::Title (Year)::...'")
            continue
        out.setdefault(norm_title(parts[1]), []).append(parts[0].strip())
    return out


def read_mapping(path: Path) -> dict[str, list[str]]:
    """ML-100k movie id -> [ML-1M id], from a CSV with columns movie_id and ml1m_id."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise FetchError(f"cannot read the mapping {path}: {exc.strerror}") from None
    if not rows or not {"movie_id", "ml1m_id"} <= set(rows[0]):
        raise FetchError(f"{path}: needs the columns movie_id and ml1m_id")
    return {str(r["movie_id"]).strip(): [str(r["ml1m_id"]).strip()] for r in rows}


def inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def fetch(out: Path, source: str, checksums: dict[str, str], titles: dict[str, str],
          candidates: dict[str, list[str]], workers: int = 8, log=print) -> dict[str, list[str]]:
    """Fetch every poster of `checksums` into `out`; returns the movie ids by outcome: ok (verified, new or
    already there), refused (a download did not match its checksum), missing (no ML-1M match or file)."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    downloads: dict[str, bytes | None] = {}  # ML-1M id -> bytes (ML-100k duplicates share a poster)

    def one(movie_id: str) -> tuple[str, str]:
        target, want = images / f"{movie_id}.jpg", checksums[movie_id]
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == want:
            return movie_id, "ok"
        outcome = "missing"
        for ml1m in candidates.get(movie_id, []):
            if ml1m not in downloads:
                downloads[ml1m] = get(f"{source}MovieImages/{ml1m}.jpg")
            data = downloads[ml1m]
            if data is None:
                continue
            if hashlib.sha256(data).hexdigest() != want:
                outcome = "refused"
                continue
            write_bytes_atomic(target, data)
            return movie_id, "ok"
        return movie_id, outcome

    result: dict[str, list[str]] = {"ok": [], "refused": [], "missing": []}
    ids = sorted(checksums, key=lambda m: (len(m), m))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for n, (movie_id, outcome) in enumerate(pool.map(one, ids), start=1):
            result[outcome].append(movie_id)
            if n % 200 == 0 or n == len(ids):
                log(f"fetch_posters: {n:,}/{len(ids):,} checked, {len(result['ok']):,} verified")
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["movie_id", "movie_title", "image"])
    for movie_id in sorted(result["ok"], key=lambda m: (len(m), m)):
        writer.writerow([movie_id, titles.get(movie_id, ""), f"images/{movie_id}.jpg"])
    write_text_atomic(out / "posters.csv", table.getvalue())
    write_text_atomic(out / "README.txt", TERMS)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Fetch the MovieLens-100k posters (checksum-verified) into a folder outside the repo.")
    p.add_argument("--out", type=Path, default=None,
                   help="poster folder (default: ~/.cache/llmhyper/posters, i.e. $LLMHYPER_CACHE/posters, "
                        "which llmhyper uses without --posters)")
    p.add_argument("--source", default=SOURCE,
                   help=f"root URL holding MovieData/movies.dat and MovieImages/<ML-1M id>.jpg "
                        f"(default: {SOURCE}); file:// works too")
    p.add_argument("--mapping", type=Path, default=None,
                   help="CSV with columns movie_id (ML-100k) and ml1m_id: use these ML-1M ids instead of "
                        "matching titles against MovieData/movies.dat")
    p.add_argument("--titles", type=Path, default=None,
                   help="CSV with columns movie_id and movie_title (default: the MovieLens-100k tables, "
                        "downloaded by llmhyper if needed)")
    p.add_argument("--checksums", type=Path, default=CHECKSUMS,
                   help=f"sha256sum list (default: {CHECKSUMS.relative_to(REPO)})")
    p.add_argument("--workers", type=int, default=8, help="downloads at once (default: 8)")
    args = p.parse_args(argv)
    out = args.out.expanduser() if args.out is not None else cache_dir() / "posters"
    source = args.source if args.source.endswith("/") else args.source + "/"
    try:
        if inside(out, REPO):
            raise FetchError(f"{out} is inside the repository; the posters must stay out of it (give --out)")
        checksums = read_checksums(args.checksums)
        titles = read_titles(args.titles)
        if args.mapping is not None:
            candidates = read_mapping(args.mapping)
        else:
            by_title = ml1m_ids_by_title(source)
            candidates = {m: by_title.get(norm_title(t), []) for m, t in titles.items()}
        print(f"fetch_posters: {len(checksums):,} posters from {source} into {out} (about 22 MB) ...",
              file=sys.stderr)
        result = fetch(out, source, checksums, titles, candidates, args.workers,
                       log=lambda s: print(s, file=sys.stderr))
    except FetchError as exc:
        print(f"fetch_posters: {exc}", file=sys.stderr)
        return 2
    ok, refused, missing = result["ok"], result["refused"], result["missing"]
    print(f"fetch_posters: {len(ok):,} of {len(checksums):,} posters verified in {out}", file=sys.stderr)
    if refused:
        print(f"fetch_posters: {len(refused)} refused: the download did not match its checksum "
              f"(ids {', '.join(refused[:10])}{' ...' if len(refused) > 10 else ''}); nothing was written "
              "for them", file=sys.stderr)
    if missing:
        print(f"fetch_posters: {len(missing)} not found at the source (ids {', '.join(missing[:10])}"
              f"{' ...' if len(missing) > 10 else ''})", file=sys.stderr)
    if refused or missing:
        print("fetch_posters: with fewer posters the numbers differ a little from the README's poster "
              "tables; run again to retry", file=sys.stderr)
        return 1
    default = cache_dir() / "posters"
    use = "" if out.resolve() == default.resolve() else f" (pass --posters {out})"
    print(f"fetch_posters: done; llmhyper uses them{use}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
