"""The revision every benchmark records (bench/revision.py): a clean tree
gives its commit, a dirty one the commit and a hash of the change (a new hash
for a new change), a tree without git a fingerprint of its files and the word
untied; a copy of the tree over a stale .git (the device tool's machine)
records the revision its caller passes, or untied when the files do not
match what the caller described."""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _load():
    spec = importlib.util.spec_from_file_location("fastedge_bench_revision",
                                                  REPO / "bench" / "revision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rc = _load()


@pytest.fixture(autouse=True)
def _no_caller_revision(monkeypatch):
    monkeypatch.delenv(rc.REV_VAR, raising=False)
    monkeypatch.delenv(rc.SOURCE_VAR, raising=False)


def git(repo, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


def write(repo: Path, rel: str, text: str) -> None:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A small git repo laid out like fastedge: code, bench/results, ignored build output."""
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q")
    write(r, ".gitignore", "__pycache__/\n*.egg-info/\nbuild/\n")
    write(r, "pkg/op.py", "def f(x):\n    return x + 1\n")
    write(r, "bench/run.py", "print('bench')\n")
    write(r, "bench/results/ops.csv", "a,b\n1,2\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "first")
    return r


def head(repo) -> str:
    return git(repo, "rev-parse", "HEAD")


def test_clean_tree_records_its_commit(repo):
    rev = rc.git_revision(repo)
    assert "+" not in rev and len(rev) >= 7 and head(repo).startswith(rev)
    # benchmark output, ignored build output and caches leave it clean
    write(repo, "bench/results/ops.csv", "a,b\n1,2\n3,4\n")
    write(repo, "bench/results/new.md", "# a new result\n")
    write(repo, "pkg/__pycache__/op.cpython-311.pyc", "junk")
    write(repo, "pkg.egg-info/PKG-INFO", "junk")
    assert rc.git_revision(repo) == rev


def test_dirty_tree_records_a_hash_of_its_change(repo):
    clean = rc.git_revision(repo)
    write(repo, "pkg/op.py", "def f(x):\n    return x + 2\n")
    first = rc.git_revision(repo)
    assert first.startswith(clean + "+diff.") and len(first.split("+diff.")[1]) == rc.HASH_CHARS
    # the hash is that of the bytes `--diff` writes, which are the change itself
    diff = rc.working_tree_diff(repo)
    assert first == f"{clean}+diff.{hashlib.sha256(diff).hexdigest()[:rc.HASH_CHARS]}"
    assert b"-    return x + 1" in diff and b"+    return x + 2" in diff
    assert rc.git_revision(repo) == first, "the same change, the same hash"

    write(repo, "pkg/op.py", "def f(x):\n    return x + 3\n")
    second = rc.git_revision(repo)
    assert second.startswith(clean + "+diff.") and second != first

    write(repo, "pkg/op.py", "def f(x):\n    return x + 2\n")
    assert rc.git_revision(repo) == first

    # a new file that git does not ignore changes what runs: it counts, content included
    write(repo, "pkg/extra.py", "A = 1\n")
    with_new = rc.git_revision(repo)
    assert with_new not in (first, second)
    write(repo, "pkg/extra.py", "A = 2\n")
    assert rc.git_revision(repo) not in (first, second, with_new)

    (repo / "pkg" / "extra.py").unlink()
    write(repo, "pkg/op.py", "def f(x):\n    return x + 1\n")
    assert rc.git_revision(repo) == clean


def test_staged_and_deleted_changes_count(repo):
    clean = rc.git_revision(repo)
    write(repo, "pkg/op.py", "def f(x):\n    return x - 1\n")
    git(repo, "add", "pkg/op.py")  # staged only: still not the commit
    staged = rc.git_revision(repo)
    assert staged.startswith(clean + "+diff.")
    git(repo, "checkout", "-q", "HEAD", "--", "pkg/op.py")
    (repo / "bench" / "run.py").unlink()
    assert rc.git_revision(repo) not in (clean, staged)


def test_the_hash_ignores_the_users_git_settings(repo):
    write(repo, "pkg/données.py", "A = 1\n")  # a path git quotes, or not, as configured
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a path outside ASCII")
    write(repo, "pkg/op.py", "def f(x):\n    return x * 2\n")
    write(repo, "pkg/données.py", "A = 2\n")
    before = rc.git_revision(repo)
    for key, value in [("diff.noprefix", "true"), ("color.ui", "always"), ("diff.mnemonicPrefix", "true"),
                       ("core.quotePath", "false"), ("diff.renames", "copies")]:
        git(repo, "config", key, value)
    assert rc.git_revision(repo) == before


def test_no_git_records_untied_with_a_fingerprint(repo, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repo above the copy either
    rev = rc.git_revision(copy)
    fp = rc.source_fingerprint(repo)
    assert rev == f"untied+src.{fp}"
    # no git program at all: the same answer
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert rc.git_revision(repo) == f"untied+src.{fp}"


def test_fingerprint_sees_the_source_and_nothing_else(repo):
    fp = rc.source_fingerprint(repo)
    assert rc.source_fingerprint(repo, use_git=False) == fp
    # what a copy of the tree gains on a device, and benchmark output: not source
    for rel in ("pkg/__pycache__/op.cpython-312.pyc", "fastedge.egg-info/PKG-INFO", "build/lib/x.py",
                ".whl/torch.whl", "bench/results/gpu-run.log", "pkg/_ext.so"):
        write(repo, rel, "junk")
    assert rc.source_fingerprint(repo, use_git=False) == rc.source_fingerprint(repo, use_git=True) == fp
    write(repo, "pkg/op.py", "def f(x):\n    return x + 9\n")
    changed = rc.source_fingerprint(repo)
    assert changed != fp and rc.source_fingerprint(repo, use_git=False) == changed
    (repo / "pkg" / "op.py").rename(repo / "pkg" / "op2.py")  # same bytes, another path
    assert rc.source_fingerprint(repo, use_git=False) not in (fp, changed)


def test_a_copy_over_a_stale_git_takes_the_callers_revision(repo, tmp_path, monkeypatch):
    """The device tool's machine: the caller's files over the .git of an older
    commit. Git there names the old commit; the caller's revision, checked
    against the files, names the right one."""
    stale_git = tmp_path / "stale.git"
    shutil.copytree(repo / ".git", stale_git)
    write(repo, "pkg/op.py", "def f(x):\n    return 2 * x\n")
    git(repo, "commit", "-qam", "second")
    caller = subprocess.run([sys.executable, str(REPO / "bench" / "revision.py"), "--env", "--repo",
                             str(repo)], check=True, capture_output=True, text=True).stdout.split()
    env = dict(kv.split("=", 1) for kv in caller)
    assert env[rc.REV_VAR] == rc.git_revision(repo) and head(repo).startswith(env[rc.REV_VAR])

    device = tmp_path / "device"
    shutil.copytree(repo, device, ignore=shutil.ignore_patterns(".git"))
    shutil.copytree(stale_git, device / ".git")
    stale = rc.git_revision(device)
    assert stale.split("+")[0] != env[rc.REV_VAR] and "+diff." in stale  # what went wrong before

    monkeypatch.setenv(rc.REV_VAR, env[rc.REV_VAR])
    monkeypatch.setenv(rc.SOURCE_VAR, env[rc.SOURCE_VAR])
    assert rc.git_revision(device) == env[rc.REV_VAR]
    # files that are not the ones the caller described: not tied to its commit
    write(device, "pkg/op.py", "def f(x):\n    return 3 * x\n")
    assert rc.git_revision(device) == f"untied+src.{rc.source_fingerprint(device, use_git=False)}"
    # no revision from the caller at all (what gpu.sh sets then)
    monkeypatch.delenv(rc.SOURCE_VAR)
    monkeypatch.setenv(rc.REV_VAR, "untied")
    assert rc.git_revision(device) == f"untied+src.{rc.source_fingerprint(device, use_git=False)}"
    # the caller may ask for the tree's own git
    monkeypatch.setenv(rc.REV_VAR, "git")
    assert rc.git_revision(device) == rc.revision_from_git(device)


def test_every_recording_benchmark_takes_its_revision_from_results_csv():
    """ops.py, step.py and memory.py record `results_csv.git_revision()` and
    nothing else; tune.py prints it."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import results_csv
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert results_csv.git_revision.__module__ == "revision"
    for name in ("ops.py", "step.py", "memory.py", "tune.py"):
        text = (REPO / "bench" / name).read_text()
        assert "results_csv.git_revision" in text, name
        assert "rev-parse" not in text and "subprocess" not in text, name


def test_the_command_line_prints_the_recorded_revision(repo, monkeypatch):
    script = str(REPO / "bench" / "revision.py")
    out = subprocess.run([sys.executable, script, "--repo", str(repo)], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == rc.git_revision(repo)
    write(repo, "pkg/op.py", "X = 1\n")
    diff = subprocess.run([sys.executable, script, "--diff", "--repo", str(repo)], check=True,
                          capture_output=True).stdout
    assert rc.git_revision(repo).endswith(hashlib.sha256(diff).hexdigest()[:rc.HASH_CHARS])
    env = dict(os.environ, **{rc.REV_VAR: "abc1234"})
    out = subprocess.run([sys.executable, script, "--repo", str(repo)], check=True, capture_output=True,
                         text=True, env=env).stdout.strip()
    assert out == "abc1234"
