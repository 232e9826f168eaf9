"""The revision a benchmark result records (`git_revision`), shared by every
benchmark through `bench/results_csv.py`.

A result is tied to the exact code that made it, or says it is not:

* ``abc1234``: a clean work tree at commit ``abc1234``;
* ``abc1234+diff.5f3e9a1c``: commit ``abc1234`` plus local changes;
  ``5f3e9a1c`` is the start of the SHA-256 of `working_tree_diff` (``git diff
  HEAD`` of the tracked files, then every untracked, not-ignored file, all
  outside bench/results). A dirty tree is recorded, not refused, so that a
  measurement is never lost; ``python bench/revision.py --diff`` writes the
  exact bytes hashed, to keep the change beside the result;
* ``untied+src.1a2b3c4d``: no commit could be trusted (no git, or the claimed
  revision did not match the files); ``1a2b3c4d`` is `source_fingerprint`,
  a hash of the source files themselves, so the result can still be matched
  to a tree later (``python bench/revision.py --source-hash`` at a
  candidate commit).

A copy of the tree without a trustworthy ``.git`` (the device tool's machine
gets the work tree over a stale ``.git``, see the README's Benchmarks
section) is told its revision by the caller: ``$FASTEDGE_GIT_REV`` wins over
git, and when ``$FASTEDGE_SOURCE_HASH`` is also set, the copy's own
`source_fingerprint` must equal it, or the result is recorded as
``untied+src.<the copy's fingerprint>``. ``python bench/revision.py
--env`` prints both assignments for the tree it is run in.
``FASTEDGE_GIT_REV=untied`` records ``untied+src.<fingerprint>``;
``FASTEDGE_GIT_REV=git`` asks git, as if unset. The copy hashes what it
finds on disk, less hidden and ignored-by-default paths: a folder carried
beside the tree that is neither (say ``venv/``) makes it differ, so carry
hidden ones (``.whl``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO_DIR = Path(__file__).resolve().parents[1]

REV_VAR = "FASTEDGE_GIT_REV"          # the revision, as the caller knows it
SOURCE_VAR = "FASTEDGE_SOURCE_HASH"   # the caller's `source_fingerprint`, checked here
UNTIED = "untied"
HASH_CHARS = 8
RESULTS = "bench/results"             # benchmark output: never part of a revision
# Paths the fingerprint leaves out: what .gitignore ignores (build output,
# caches) and hidden paths (.git, carried folders such as .whl), so that a
# copy of the tree and its checkout hash the same files.
# ignored by git, so never carried to the device: the build's outputs and
# the main job's default output folder (.gitignore)
_SKIP_DIRS = {"__pycache__", "build", "dist", "fastedge-out"}
_SKIP_SUFFIXES = (".pyc", ".so", ".tmp", ".egg-info")


def git_revision(repo: Path = REPO_DIR) -> str:
    """The revision recorded with a result (module docstring): the caller's
    $FASTEDGE_GIT_REV, checked against $FASTEDGE_SOURCE_HASH when given; else
    git's commit, with the hash of any local changes; else untied."""
    claimed = os.environ.get(REV_VAR, "").strip()
    if claimed == UNTIED:
        return untied(repo)
    if claimed and claimed != "git":
        want = os.environ.get(SOURCE_VAR, "").strip()
        if want:
            have = source_fingerprint(repo, use_git=False)
            if have != want:
                print(f"revision: ${REV_VAR}={claimed} was claimed for source {want}, but these "
                      f"files hash to {have}: recording {UNTIED}+src.{have}", file=sys.stderr)
                return f"{UNTIED}+src.{have}"
        return claimed
    return revision_from_git(repo)


def revision_from_git(repo: Path = REPO_DIR) -> str:
    """``abc1234`` or ``abc1234+diff.<hash>`` from git alone; untied without git."""
    try:
        rev = _git(repo, "rev-parse", "--short=7", "HEAD").decode().strip()
        diff = working_tree_diff(repo)
    except (OSError, subprocess.SubprocessError):
        return untied(repo)
    return rev + (f"+diff.{_sha(diff)}" if diff else "")


def untied(repo: Path = REPO_DIR) -> str:
    return f"{UNTIED}+src.{source_fingerprint(repo, use_git=False)}"


def working_tree_diff(repo: Path = REPO_DIR) -> bytes:
    """What the work tree changes against HEAD, outside bench/results: ``git
    diff HEAD`` in a fixed format (binary patches, full blob ids, a/ b/
    prefixes, whatever the user's git config says), then, per untracked file
    that git does not ignore, its path and content. Empty when clean."""
    diff = _git(repo, "-c", "core.quotepath=on", "diff", "HEAD", "--binary", "--full-index",
                "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames", "--no-relative",
                "--src-prefix=a/", "--dst-prefix=b/", "--", ".", f":(exclude){RESULTS}")
    listed = _git(repo, "ls-files", "-z", "--others", "--exclude-standard", "--", ".",
                  f":(exclude){RESULTS}")
    parts = [diff]
    for rel in sorted(p for p in listed.decode("utf-8", "surrogateescape").split("\0") if p):
        parts.append(b"untracked " + os.fsencode(rel) + b"\0" + _file_bytes(repo / rel) + b"\n")
    return b"".join(parts) if any(parts) else b""


def source_fingerprint(repo: Path = REPO_DIR, use_git: Optional[bool] = None) -> str:
    """A hash of the tree's source files (paths and contents), without the
    paths git ignores, hidden paths and bench/results. `use_git`: list the
    files with git (tracked, and untracked but not ignored: what the device
    tool copies); False: walk the folder (a copy whose .git is stale or
    absent); None: git if it answers, else the walk."""
    files = None
    if use_git is not False:
        try:
            out = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
            files = [p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
        except (OSError, subprocess.SubprocessError):
            if use_git:
                raise
    if files is None:
        files = _walk(repo)
    h = hashlib.sha256()
    for rel in sorted(set(f for f in files if _fingerprinted(f))):
        path = repo / rel
        if not (path.is_file() or path.is_symlink()):
            continue  # a tracked file deleted in the work tree
        h.update(os.fsencode(rel) + b"\0" + hashlib.sha256(_file_bytes(path)).digest())
    return h.hexdigest()[:HASH_CHARS]


def _fingerprinted(rel: str) -> bool:
    parts = rel.split("/")
    if rel == RESULTS or rel.startswith(RESULTS + "/"):
        return False
    return not any(p.startswith(".") or p in _SKIP_DIRS or p.endswith(_SKIP_SUFFIXES) for p in parts)


def _walk(repo: Path) -> list[str]:
    found = []
    for top, dirs, names in os.walk(repo):
        rel_top = os.path.relpath(top, repo)
        dirs[:] = [d for d in dirs if _fingerprinted(os.path.normpath(os.path.join(rel_top, d)))]
        for name in names:
            found.append(os.path.normpath(os.path.join(rel_top, name)).replace(os.sep, "/"))
    return found


def _file_bytes(path: Path) -> bytes:
    if path.is_symlink():
        return b"symlink " + os.fsencode(os.readlink(path))
    return path.read_bytes()


def _git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True, timeout=30).stdout


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:HASH_CHARS]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Print the revision a benchmark run here would record (bench/revision.py).")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--env", action="store_true",
                      help=f"print '{REV_VAR}=... {SOURCE_VAR}=...' from this tree's git, to prefix a "
                           "command that runs in a copy of this tree (bench/gpu.sh on the device tool)")
    what.add_argument("--diff", action="store_true",
                      help="write the bytes whose hash is the +diff part of the revision")
    what.add_argument("--source-hash", action="store_true", help="print the source fingerprint")
    ap.add_argument("--repo", type=Path, default=REPO_DIR, help="the tree (default: this checkout)")
    args = ap.parse_args(argv)
    if args.env:
        rev = revision_from_git(args.repo)
        if rev.startswith(UNTIED):
            print(f"revision: {args.repo} is not a git work tree; its results cannot be tied to a "
                  "commit", file=sys.stderr)
        elif "+diff." in rev:
            print(f"revision: uncommitted changes in {args.repo}: results will name {rev}; commit "
                  "first to tie them to a commit alone", file=sys.stderr)
        print(f"{REV_VAR}={rev} {SOURCE_VAR}={source_fingerprint(args.repo, use_git=None)}")
    elif args.diff:
        sys.stdout.buffer.write(working_tree_diff(args.repo))
    elif args.source_hash:
        print(source_fingerprint(args.repo))
    else:
        print(git_revision(args.repo))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
