"""``histohelper certs`` and ``histohelper token`` against a real server: the files they
write start a TLS / mutual-TLS server with a tokens file, and the SDK and the CLI reach
it with them."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from histohelper.cli import main
from histohelper.client import SlideClient
from histohelper.errors import ServerUnavailableError, UnauthenticatedError


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    assert main(["certs", str(out), "--host", "histo.example.org"]) == 0
    return out


def test_certs_writes_the_files_the_flags_expect(
    certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography import x509

    for name in ("ca.pem", "server.pem", "client.pem"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o644, name
    for name in ("ca.key", "server.key", "client.key"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600, name
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "histo.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    # A second run refuses to replace the CA (its key signs everything else).
    assert main(["certs", str(certs)]) == 2
    assert "--force" in capsys.readouterr().err


def test_token_helper_adds_entries_to_one_whole_file(tmp_path: Path, capsys) -> None:
    tokens = tmp_path / "tokens.json"
    argv = ["token", "--identity", "lis-prod", "--roles", "analyze,upload", "--file", str(tokens)]
    assert main(argv) == 0
    first = capsys.readouterr().out.strip()
    assert main(["token", "--identity", "qa", "--file", str(tokens)]) == 0
    second = capsys.readouterr().out.strip()
    doc = json.loads(tokens.read_text())
    assert [e["identity"] for e in doc["tokens"]] == ["lis-prod", "qa"]
    assert [e["roles"] for e in doc["tokens"]] == [["analyze", "upload"], ["analyze"]]
    assert first != second and first not in tokens.read_text()  # only hashes are stored
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    # A file the server would refuse is left untouched.
    bad = tmp_path / "bad.json"
    bad.write_text('{"tokens": [{"token": "raw"}]}')
    assert main(["token", "--identity", "x", "--file", str(bad)]) == 2
    assert bad.read_text() == '{"tokens": [{"token": "raw"}]}'


def test_mutual_tls_server_with_tokens_from_the_helpers(
    certs: Path, tmp_path: Path, start_inprocess_server, capsys, monkeypatch
) -> None:
    tokens = tmp_path / "tokens.json"
    assert main(["token", "--identity", "lis-prod", "--file", str(tokens)]) == 0
    token = capsys.readouterr().out.strip()
    running = start_inprocess_server(
        tls_cert=certs / "server.pem",
        tls_key=certs / "server.key",
        tls_client_ca=certs / "ca.pem",
        tokens_file=tokens,
    )
    ca = (certs / "ca.pem").read_bytes()
    mtls = {
        "root_certificates": ca,
        "certificate_chain": (certs / "client.pem").read_bytes(),
        "private_key": (certs / "client.key").read_bytes(),
    }
    for host in ("127.0.0.1", "localhost"):  # both are SANs of the server certificate
        target = f"{host}:{running.port}"
        with SlideClient(target, token=token, timeout=30, **mtls) as client:
            assert client.get_model_info().model.patch_classes
    target = f"localhost:{running.port}"
    with (
        SlideClient(target, token="not-a-token", timeout=30, **mtls) as client,
        pytest.raises(UnauthenticatedError),
    ):
        client.get_model_info()
    # Without the client certificate the handshake fails (mutual TLS).
    with (
        SlideClient(target, root_certificates=ca, token=token, retry=None, timeout=5) as client,
        pytest.raises(ServerUnavailableError),
    ):
        client.get_model_info()
    # The CLI with the files as the README names them.
    monkeypatch.setenv("HISTOHELPER_TOKEN", token)
    rc = main(
        ["info", "--server", target, "--ca", str(certs / "ca.pem"),
         "--cert", str(certs / "client.pem"), "--key", str(certs / "client.key")]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith("model: ")


def test_certs_without_the_extra_says_what_to_install(tmp_path: Path) -> None:
    """Where cryptography is not installed (blocked here), one line names the extra."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "cryptography":
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, Blocker())
        from histohelper.cli import main
        sys.exit(main(["certs", {str(tmp_path / "tls")!r}]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "'cryptography'" in proc.stderr and "histohelper[certs]" in proc.stderr
    assert not (tmp_path / "tls").exists()  # refused before writing anything
