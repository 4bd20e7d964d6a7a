"""The Docker image, tested without a Docker engine.

The files the Dockerfile's COPY lines put into the image (with .dockerignore applied, as
``docker build`` does) are staged in a directory of their own, which plays the image's WORKDIR;
the image's CMD is started from there with the image's ENV, as the image's user, and must answer
/healthz, /dashboard and a miss then a hit. A file the app needs but the image lacks then fails
here, both by name (every file of the repository is either copied or ignored) and by the app not
starting.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from conftest import ROOT
from test_packaging import VENV_BIN, free_port, miss_then_hit, stop_with_sigterm, stored_hits, wait_healthy

IMAGE_UID = 10001  # the Dockerfile's USER (useradd --uid 10001)


# -- reading the Dockerfile and .dockerignore ------------------------------------------------------


@dataclass
class Copy:
    sources: list[str]
    destination: str
    workdir: str


@dataclass
class Dockerfile:
    """The instructions of a single-stage Dockerfile that decide what the image holds and runs."""

    base: str = ""
    env: dict[str, str] = field(default_factory=dict)
    copies: list[Copy] = field(default_factory=list)
    workdir: str = "/"
    user: str = "root"
    volumes: list[str] = field(default_factory=list)
    exposed: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comment lines dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        if whole:
            name, _, arguments = whole.partition(" ")
            result.append((name.upper(), arguments.strip()))
    assert not pending.strip(), "the Dockerfile ends inside a continued line"
    return result


def parse_dockerfile(text: str) -> Dockerfile:
    image = Dockerfile()
    for name, arguments in instructions(text):
        if name == "FROM":
            assert not image.base, "a multi-stage Dockerfile needs a test that knows its stages"
            image.base = arguments
        elif name == "ENV":
            if "=" in arguments.split()[0]:
                image.env.update(pair.split("=", 1) for pair in shlex.split(arguments))
            else:  # the legacy form: ENV NAME value
                key, _, value = arguments.partition(" ")
                image.env[key] = value.strip()
        elif name == "WORKDIR":
            image.workdir = posixpath.join(image.workdir, arguments)
        elif name == "COPY":
            words = json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)
            flags = [word for word in words if word.startswith("--")]
            assert not any(flag.startswith("--from") for flag in flags), "COPY --from is not staged here"
            paths = [word for word in words if not word.startswith("--")]
            image.copies.append(Copy(paths[:-1], paths[-1], image.workdir))
        elif name == "USER":
            image.user = arguments
        elif name == "VOLUME":
            image.volumes += json.loads(arguments) if arguments.startswith("[") else arguments.split()
        elif name == "EXPOSE":
            image.exposed += arguments.split()
        elif name == "CMD":
            assert arguments.startswith("["), "CMD must be in exec form (a JSON list): signals reach gunicorn"
            image.cmd = json.loads(arguments)
    return image


def pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex over context-relative paths (Go's filepath.Match:
    ``*`` and ``?`` stay within one path segment; ``**`` spans any number of segments)."""
    parts = []
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            parts.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            parts.append(".*")
            index += 2
        elif pattern[index] == "*":
            parts.append("[^/]*")
            index += 1
        elif pattern[index] == "?":
            parts.append("[^/]")
            index += 1
        else:
            parts.append(re.escape(pattern[index]))
            index += 1
    return re.compile("".join(parts))


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    """(is an exception, pattern) for each line, in order: the last rule that matches wins."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        line = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((exception, pattern_regex(line)))
    return rules


def is_ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether ``docker build`` leaves this context file out: a rule matching the file or any
    directory above it applies to it."""
    segments = path.split("/")
    candidates = ["/".join(segments[:end]) for end in range(1, len(segments) + 1)]
    ignored = False
    for exception, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


def build_context(root: Path) -> list[str]:
    """The files ``docker build .`` would send: the repository's files (tracked, and new ones
    not ignored by git) minus .dockerignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=root, capture_output=True)
    assert listed.returncode == 0, f"the image test lists the repository's files with git: {listed.stderr!r}"
    rules = dockerignore_rules((root / ".dockerignore").read_text())
    return sorted(path for path in set(listed.stdout.decode().split("\0"))
                  if path and (root / path).is_file() and not is_ignored(path, rules))


def image_files(image: Dockerfile, context: list[str]) -> dict[str, str]:
    """Where each copied file lands in the image (absolute path) -> its context path."""
    files: dict[str, str] = {}
    for copy in image.copies:
        destination = posixpath.normpath(posixpath.join(copy.workdir, copy.destination))
        into_directory = copy.destination.endswith("/") or copy.destination == "." or len(copy.sources) > 1
        for source in copy.sources:
            source = posixpath.normpath(source)
            if any(char in source for char in "*?["):
                matched = [path for path in context if fnmatch.fnmatchcase(path, source)
                           and path.count("/") == source.count("/")]
                assert matched, f"COPY {source}: no file of the build context matches"
                assert into_directory, f"COPY {source}: a wildcard source needs a directory destination"
                files.update({posixpath.join(destination, posixpath.basename(path)): path for path in matched})
            elif source in context:
                target = posixpath.join(destination, posixpath.basename(source)) if into_directory else destination
                files[target] = source
            else:
                below = [path for path in context if path.startswith(source.rstrip("/") + "/")]
                assert below, (f"COPY {source}: not in the build context (missing, or excluded by "
                               f".dockerignore); docker build would fail")
                for path in below:  # a directory: its contents go into the destination
                    files[posixpath.join(destination, path[len(source.rstrip('/')) + 1:])] = path
    return files


DOCKERFILE = parse_dockerfile((ROOT / "Dockerfile").read_text())


def app_files() -> dict[str, str]:
    """The image's files under its WORKDIR, relative to it -> their context paths."""
    workdir = DOCKERFILE.workdir.rstrip("/") + "/"
    files = image_files(DOCKERFILE, build_context(ROOT))
    outside = sorted(path for path in files if not path.startswith(workdir))
    assert not outside, f"files copied outside WORKDIR are not staged by this test: {outside}"
    return {path[len(workdir):]: source for path, source in files.items()}


# -- the parsers themselves ------------------------------------------------------------------------


def test_dockerignore__matches_as_docker_build_does():
    rules = dockerignore_rules("tests\n*.sqlite3*\n**/__pycache__\ndocs/*.md\n!docs/keep.md\n")
    assert is_ignored("tests/test_x.py", rules)
    assert is_ignored("cache.sqlite3-wal", rules)
    assert not is_ignored("data/cache.sqlite3", rules)  # * stays within one segment, from the root
    assert is_ignored("apis/__pycache__/chat.cpython-311.pyc", rules)
    assert is_ignored("docs/streaming.md", rules) and not is_ignored("docs/keep.md", rules)
    assert not is_ignored("server.py", rules) and not is_ignored("testsuite.py", rules)


def test_dockerfile_copy__files_directories_and_wildcards_land_where_docker_puts_them():
    image = parse_dockerfile("FROM python:3.11-slim\nWORKDIR /app\nCOPY requirements.txt .\n"
                             "# a comment\nCOPY a.py \\\n     b.html ./\nCOPY apis/ ./apis/\n"
                             "COPY stores ./backends\nCOPY conf/*.py ./\nCOPY one.py renamed.py\n")
    context = ["requirements.txt", "a.py", "b.html", "apis/__init__.py", "apis/chat.py",
               "stores/redis.py", "conf/x.py", "conf/deep/y.py", "one.py", "left_out.py"]
    assert image_files(image, context) == {
        "/app/requirements.txt": "requirements.txt", "/app/a.py": "a.py", "/app/b.html": "b.html",
        "/app/apis/__init__.py": "apis/__init__.py", "/app/apis/chat.py": "apis/chat.py",
        "/app/backends/redis.py": "stores/redis.py", "/app/x.py": "conf/x.py", "/app/renamed.py": "one.py",
    }
    with pytest.raises(AssertionError, match="missing, or excluded by .dockerignore"):
        image_files(parse_dockerfile("WORKDIR /app\nCOPY gone.py ./\n"), context)


# -- the image -------------------------------------------------------------------------------------


def test_docker_image__holds_every_file_of_the_repository_that_is_not_dockerignored():
    """A new module or data file (a package such as apis/, a page such as dashboard.html) must be
    named by a COPY line, or the image starts without it."""
    missing = sorted(set(build_context(ROOT)) - set(app_files().values()))
    assert not missing, (
        f"not in the Docker image: {', '.join(missing)}. Add each to a COPY line of the Dockerfile "
        f"(a package as a directory: COPY apis/ ./apis/), or to .dockerignore if the app never needs it.")


def test_docker_image__runs_as_non_root_with_a_data_volume_and_listens_on_all_interfaces():
    assert DOCKERFILE.base == "python:3.11-slim"
    assert DOCKERFILE.user == str(IMAGE_UID)
    assert DOCKERFILE.volumes == ["/data"]
    assert posixpath.dirname(DOCKERFILE.env["CACHE_DB_PATH"]) == "/data"
    assert DOCKERFILE.env["HOST"] == "0.0.0.0"  # reachable through docker run -p
    assert DOCKERFILE.exposed == [DOCKERFILE.env["PORT"]]
    assert DOCKERFILE.cmd[:3] == ["gunicorn", "-c", "gunicorn.conf.py"]


@pytest.fixture
def staged_image():
    """The image's WORKDIR (its copied files, owned by root, modes as in the build context) and
    an empty /data owned by the image's user, each a directory of its own."""
    workdir = Path(tempfile.mkdtemp(prefix="cuc-image-app-"))
    data = Path(tempfile.mkdtemp(prefix="cuc-image-data-"))
    try:
        workdir.chmod(0o755)
        for relative, source in app_files().items():
            target = workdir / relative
            for directory in reversed(target.relative_to(workdir).parents[:-1]):
                (workdir / directory).mkdir(mode=0o755, exist_ok=True)
            shutil.copy(ROOT / source, target)
        if os.geteuid() == 0:
            os.chown(data, IMAGE_UID, IMAGE_UID)
        data.chmod(0o755)
        yield workdir, data
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


def as_image_user_command(command: list[str]) -> list[str]:
    """Run ``command`` as the image's user (a root test run can switch; otherwise the tests
    already run unprivileged, as themselves).

    The venv's interpreter may live where that user cannot look (pyenv under /root, mode 0700):
    the command keeps the one capability to read and search any file (never to write one), so
    what the app may write is exactly what the image's user may. Whether the image's user can
    read the app's files is checked from their modes instead (not_readable_by_others)."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (Debian's util-linux) is needed to start the image's CMD as its user"
    return [setpriv, f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--", *command]


def not_readable_by_others(directory: Path) -> list[str]:
    """Copied files are root's in the image: the image's user reads them as "others"."""
    return [str(path.relative_to(directory)) for path in [directory, *directory.rglob("*")]
            if not path.stat().st_mode & (0o005 if path.is_dir() else 0o004)]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_docker_image__cmd_starts_from_exactly_the_image_files_and_serves(staged_image, fake_upstream):
    workdir, data = staged_image
    assert not not_readable_by_others(workdir), "the image's user could not read these files"
    before = snapshot(workdir)
    command = list(DOCKERFILE.cmd)
    command[0] = str(VENV_BIN / command[0])  # the image's pip-installed gunicorn: the venv's
    database = data / posixpath.basename(DOCKERFILE.env["CACHE_DB_PATH"])
    # A container's environment: the image's ENV and little else (no developer settings leak in).
    env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8",
           **DOCKERFILE.env,
           "HOST": "127.0.0.1", "PORT": str(free_port()), "CACHE_DB_PATH": str(database),
           "UPSTREAM_BASE_URL": fake_upstream.base_url}
    as_image_user = os.geteuid() == 0
    if as_image_user:
        command = as_image_user_command(command)
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        wait_healthy(url, process)
        page = requests.get(url + "/dashboard", timeout=10)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert page.content == (workdir / "dashboard.html").read_bytes()
        miss_then_hit(url, fake_upstream)
    finally:
        stderr = stop_with_sigterm(process)
    assert stored_hits(database) == 1
    if as_image_user:
        assert database.stat().st_uid == IMAGE_UID
    assert snapshot(workdir) == before, "the app wrote into its WORKDIR; only /data is the image user's"
    assert "Traceback" not in stderr and "[ERROR]" not in stderr, stderr
