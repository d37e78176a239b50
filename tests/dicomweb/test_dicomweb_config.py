"""Configuring DICOMweb servers: names, URLs and credentials files, refused clearly and
never echoing a URL or a credential."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from histohelper.errors import DicomWebNotConfiguredError
from histohelper.server.certs import make_certificates
from histohelper.server.config import add_arguments, config_from
from histohelper.server.dicomweb import DicomWebServers, parse_endpoints


def test_repeated_flag_and_environment_give_every_server(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--slide-root", str(tmp_path), "--model", "m.pt"]
    args = parser.parse_args(
        [*base, "--dicomweb", "a=http://127.0.0.1:1/dw", "--dicomweb", "b=https://pacs.test/dw"]
    )
    config, _ = config_from(args, {})
    assert sorted(parse_endpoints(config.dicomweb)) == ["a", "b"]
    config, _ = config_from(
        parser.parse_args(base), {"HISTOHELPER_DICOMWEB": "a=http://x/dw,b=http://y/dw"}
    )
    assert sorted(parse_endpoints(config.dicomweb)) == ["a", "b"]


def test_credentials_files(tmp_path: Path) -> None:
    (tmp_path / "tok.token").write_text("s3cret-token\n")
    (tmp_path / "usr.basic").write_text("alice:pa:ss")
    ca = make_certificates(tmp_path / "pki").ca_cert  # a CA file must hold a certificate
    (tmp_path / "usr.ca.pem").write_bytes(ca.read_bytes())
    found = parse_endpoints("tok=https://a.test/dw,usr=https://b.test/dw", tmp_path)
    assert found["tok"].bearer_token == "s3cret-token" and found["tok"].basic is None
    assert found["usr"].basic == ("alice", "pa:ss")
    assert found["usr"].ca_bundle == tmp_path / "usr.ca.pem"
    assert "s3cret" not in repr(found) and "pa:ss" not in repr(found)
    assert "a.test" not in repr(found)


@pytest.mark.parametrize(
    ("text", "files", "needle"),
    [
        ("no-equals-sign", {}, "NAME=URL"),
        ("a=ftp://host/dw", {}, "http"),
        ("a=https://user:pw@host/dw", {}, "secrets-dir"),
        ("a=http://h/dw,a=http://k/dw", {}, "twice"),
        ("a=http://h/dw", {"a.basic": "no-colon"}, "user:password"),
        ("a=http://h/dw", {"a.basic": "u:p", "a.token": "t"}, "not both"),
        ("pa cs=http://h/dw", {}, "NAME=URL"),
        ("a=http://h:port/dw", {}, "malformed"),
    ],
    ids=[
        "malformed",
        "scheme",
        "credentials-in-url",
        "duplicate",
        "basic-format",
        "both",
        "space-in-name",
        "bad-port",
    ],
)
def test_bad_configuration_is_refused_without_echoing_secrets(
    tmp_path: Path, text: str, files: dict[str, str], needle: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(ValueError) as info:
        parse_endpoints(text, tmp_path)
    assert needle in str(info.value)
    assert "pw@" not in str(info.value) and "u:p" not in str(info.value)


def test_unconfigured_names_are_refused() -> None:
    with pytest.raises(DicomWebNotConfiguredError, match="no DICOMweb server"):
        DicomWebServers({}).endpoint("pacs")


def test_missing_secrets_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--dicomweb-secrets-dir is not a directory"):
        parse_endpoints("a=http://h/dw", tmp_path / "nonexistent")


@pytest.mark.parametrize(
    ("flags", "files", "needle"),
    [
        (["--dicomweb", "pacs=http://user:pw@h/dw"], {}, "--dicomweb pacs: put credentials"),
        (["--dicomweb", "pacs=ftp://h/dw"], {}, "--dicomweb pacs: the URL must be http"),
        (["--dicomweb", "pacs=http://h/dw"], {"pacs.basic": "u:pw", "pacs.token": "t"}, "not both"),
        (
            ["--dicomweb", "pacs=http://h/dw", "--dicomweb-secrets-dir", "/nonexistent"],
            None,
            "is not",
        ),
    ],
    ids=["credentials-in-url", "scheme", "token-and-basic", "missing-secrets-dir"],
)
def test_serve_stops_with_one_line_before_the_model_loads(
    tmp_path: Path, flags: list[str], files: dict[str, str] | None, needle: str
) -> None:
    """A bad --dicomweb setting ends ``histohelper serve`` with one clean line (as other
    configuration errors), before the model is even looked for (the artifact given here
    does not exist), never echoing a credential."""
    if files is not None:
        for name, content in files.items():
            (tmp_path / name).write_text(content)
        flags = [*flags, "--dicomweb-secrets-dir", str(tmp_path)]
    cmd = [sys.executable, "-m", "histohelper.cli", "serve", "--model", str(tmp_path / "no.pt")]
    res = subprocess.run(
        [*cmd, "--slide-root", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("histohelper serve: ") and needle in lines[0], lines[0]
    assert "pw" not in lines[0] and "Traceback" not in res.stderr
