"""Secrets stay secret: URLs are redacted wherever they are printed, ``up``'s credentials are
files only their owner reads and are kept across restarts, and a shell that loaded them
still starts the stack's own Redis."""

from __future__ import annotations

import stat

import pytest

from taskmesh.core.redact import redacted
from taskmesh.run.credentials import CREDENTIALS_FILE, read_credentials, stack_secrets, write_private, write_secrets
from taskmesh.run.stack import Stack, StackError, StackOptions, free_port, wait_for_redis


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:**@127.0.0.1:6379/0"),
    ("redis://taskmesh:s3cret@redis:6379/0", "redis://taskmesh:**@redis:6379/0"),
    ("rediss://u:s3cret@h:6380/0?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=/etc/ca.pem",
     "rediss://u:**@h:6380/0?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=/etc/ca.pem"),
    ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=**"),
    ("redis://a:s3cret@h1:1/0;redis://b:s3cret@h2:2/0", "redis://a:**@h1:1/0;redis://b:**@h2:2/0"),
    (["redis://a:s3cret@h1:1/0"], "redis://a:**@h1:1/0"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    (None, ""),
])
def test_a_url_is_printed_without_its_password(url, shown):
    assert redacted(url) == shown


def test_up_s_credentials_are_private_files_and_are_kept_for_the_next_start(tmp_path):
    first = stack_secrets(tmp_path, None)
    path = write_secrets(tmp_path, first, first.broker_url(6380), owns_redis=True)
    assert path == tmp_path / CREDENTIALS_FILE
    for name in (CREDENTIALS_FILE, "redis-users.conf"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert first.redis_password not in (tmp_path / "redis-users.conf").read_text()  # only its hash
    again = stack_secrets(tmp_path, None)
    assert again == first  # the append-only file keeps the tasks; the producers keep their URL
    assert stack_secrets(tmp_path, "ops:s3cret").flower_auth == "ops:s3cret"  # given wins
    assert read_credentials(tmp_path)["TASKMESH_BROKER_URL"] == f"redis://taskmesh:{first.redis_password}@127.0.0.1:6380/0"


def test_a_private_file_that_existed_readable_by_all_becomes_private(tmp_path):
    path = tmp_path / "credentials.env"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, "new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "new"


def test_a_shell_that_loaded_the_credentials_still_starts_the_stack_s_own_redis(tmp_path, monkeypatch):
    data, port = tmp_path / "redis", free_port()
    found = stack_secrets(data, None)
    write_secrets(data, found, found.broker_url(port), owns_redis=True)
    monkeypatch.setenv("TASKMESH_BROKER_URL", found.broker_url(port))
    options = StackOptions(app_path="tests.apps.e2e_app", redis_port=port, flower=False, logdir=tmp_path / "logs",
                           data_dir=data)
    assert Stack(options).owns_redis
    monkeypatch.setenv("TASKMESH_BROKER_URL", "redis://elsewhere:6379/0")
    assert not Stack(options).owns_redis


def test_a_redis_that_does_not_answer_is_named_without_its_password():
    with pytest.raises(StackError) as raised:
        wait_for_redis(f"redis://taskmesh:s3cret@127.0.0.1:{free_port()}/0", timeout=0.3)
    assert "redis://taskmesh:**@127.0.0.1:" in str(raised.value) and "s3cret" not in str(raised.value)
