"""Server settings are declared once: flags, environment variables, validation and
README's configuration table all come from the declarations in server/config.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from histohelper.cli import build_parser
from histohelper.cli import main as cli_main
from histohelper.server import config as cfg
from histohelper.server.config import GIB, MIB, MPX, ServerConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ["--model", "m.pt", "--slide-root", "."]


def _resolve(
    argv: list[str], environ: dict[str, str] | None = None
) -> tuple[ServerConfig, list[str]]:
    args = build_parser().parse_args(["serve", *argv])
    return cfg.config_from(args, environ or {})


def test_readme_table_is_generated_from_the_declarations() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    begin = readme.index(cfg.TABLE_BEGIN) + len(cfg.TABLE_BEGIN) + 1
    end = readme.index(cfg.TABLE_END)
    assert readme[begin:end] == cfg.markdown_table(), (
        "README's configuration table is out of date: run `make config-table`"
    )


def test_every_field_is_a_declared_setting() -> None:
    declared = {s.field_name: s for s in cfg.settings()}
    assert {f.name for f in dataclasses.fields(ServerConfig)} - set(declared) == {"extra"}
    flags = [s.flag for s in cfg.settings()] + [f"--{a}" for s in cfg.settings() for a in s.aliases]
    envs = [s.env for s in cfg.settings()]
    assert len(set(flags)) == len(flags) and len(set(envs)) == len(envs)
    for s in cfg.settings():
        assert s.help and s.flag.startswith("--") and s.env.startswith("HISTOHELPER_")
        # named after the field, but for a unit the flag takes in other terms
        assert s.name == s.field_name or s.scale != 1 or s.field_name == "model_path", s
        if s.scale != 1:
            assert s.unit and s.name.endswith("_" + s.unit.lower()), s


def test_defaults_and_new_fields() -> None:
    config, deprecated = _resolve(REQUIRED)
    assert config == ServerConfig(model_path=Path("m.pt"), slide_root=Path("."))
    assert deprecated == []
    assert config.stalled_stream_s == 30.0
    assert config.classify_request_max_px == 128 * MPX
    assert config.classify_stream_max_px == 4096 * MPX
    assert config.max_images_per_request == 1024
    assert config.upload_max_bytes == 4 * GIB and config.max_message_bytes == 16 * MIB


def test_environment_values_are_read_in_their_units() -> None:
    environ = {
        "HISTOHELPER_MODEL": "env.pt",
        "HISTOHELPER_SLIDE_ROOT": "/slides",
        "HISTOHELPER_NUM_READERS": "3",
        "HISTOHELPER_UPLOAD_MAX_MIB": "1.5",
        "HISTOHELPER_MAX_MESSAGE_MIB": "8",
        "HISTOHELPER_CLASSIFY_REQUEST_MAX_MPX": "2",
        "HISTOHELPER_STALLED_STREAM_S": "0",
        "HISTOHELPER_ALLOW_INSECURE": "yes",
        "HISTOHELPER_NUM_THREADS": "0",
        "HISTOHELPER_HEALTH_PORT": "50052",
        "HISTOHELPER_PRECISION": "fp32",
    }
    config, _ = _resolve([], environ)
    assert config.model_path == Path("env.pt") and config.slide_root == Path("/slides")
    assert config.num_readers == 3
    assert config.upload_max_bytes == int(1.5 * MIB)
    assert config.max_message_bytes == 8 * MIB
    assert config.classify_request_max_px == 2 * MPX
    assert config.stalled_stream_s == 0.0
    assert config.allow_insecure is True
    assert config.num_threads is None
    assert config.health_port == 50052
    assert config.precision == "fp32"


def test_flags_beat_the_environment() -> None:
    environ = {"HISTOHELPER_NUM_READERS": "3", "HISTOHELPER_MODEL": "env.pt"}
    config, _ = _resolve([*REQUIRED, "--num-readers", "5", "--max-message-mib", "4"], environ)
    assert config.num_readers == 5
    assert config.model_path == Path("m.pt")
    assert config.max_message_bytes == 4 * MIB


@pytest.mark.parametrize(
    ("argv", "environ", "field", "value", "used"),
    [
        (["--readers", "3"], {}, "num_readers", 3, "--readers -> --num-readers"),
        (["--max-concurrent", "4"], {}, "max_concurrent_analyses", 4, "--max-concurrent"),
        (["--max-patches", "10"], {}, "max_patches_per_slide", 10, "--max-patches"),
        (["--threads", "2"], {}, "num_threads", 2, "--threads -> --num-threads"),
        (["--insecure"], {}, "allow_insecure", True, "--insecure -> --allow-insecure"),
        ([], {"HISTOHELPER_READERS": "6"}, "num_readers", 6, "HISTOHELPER_READERS"),
        ([], {"HISTOHELPER_INSECURE": "1"}, "allow_insecure", True, "HISTOHELPER_INSECURE"),
        ([], {"HISTOHELPER_MAX_CONCURRENT": "3"}, "max_concurrent_analyses", 3, "_MAX_CONCURRENT"),
    ],
    ids=["readers", "max-concurrent", "max-patches", "threads", "insecure",
         "env-readers", "env-insecure", "env-max-concurrent"],
)  # fmt: skip
def test_old_spellings_still_work(
    argv: list[str], environ: dict[str, str], field: str, value: object, used: str
) -> None:
    config, deprecated = _resolve([*REQUIRED, *argv], environ)
    assert getattr(config, field) == value
    assert len(deprecated) == 1 and used in deprecated[0]


def test_new_names_beat_old_ones() -> None:
    environ = {"HISTOHELPER_NUM_READERS": "4", "HISTOHELPER_READERS": "9"}
    assert _resolve(REQUIRED, environ)[0].num_readers == 4
    assert _resolve([*REQUIRED, "--readers", "7"], environ)[0].num_readers == 7  # any flag wins
    assert _resolve([*REQUIRED, "--num-readers", "2", "--readers", "7"])[0].num_readers == 2


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--num-readers", "0"], {}, "--num-readers must be >= 1"),
        (["--readers", "0"], {}, "--num-readers must be >= 1"),
        (["--upload-max-mib", "0"], {}, "--upload-max-mib must be > 0"),
        (["--upload-max-mib", "20", "--upload-quota-mib", "10"], {}, "--upload-max-mib must be <="),
        (["--max-failed-fraction", "2"], {}, "--max-failed-fraction must be <= 1"),
        (["--tls-cert", "c.pem"], {}, "--tls-cert and --tls-key go together"),
        ([], {"HISTOHELPER_NUM_READERS": "many"}, "HISTOHELPER_NUM_READERS: expected a number"),
        ([], {"HISTOHELPER_ALLOW_INSECURE": "perhaps"}, "HISTOHELPER_ALLOW_INSECURE: expected"),
        ([], {"HISTOHELPER_PRECISION": "fp8"}, "HISTOHELPER_PRECISION: expected one of"),
    ],
    ids=["readers-0", "old-readers-0", "upload-0", "upload-over-quota", "fraction",
         "tls-half", "env-not-a-number", "env-not-a-bool", "env-choice"],
)  # fmt: skip
def test_bad_values_stop_serve_with_a_message_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], environ: dict[str, str], message: str
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        cli_main(["serve", *REQUIRED, *argv])
    assert str(exc.value).startswith("histohelper serve: ")
    assert message in str(exc.value)


@pytest.mark.parametrize(
    "argv",
    [["--num-readers", "two"], ["--max-message-mib", "nan"], ["--precision", "fp8"]],
    ids=["not-a-number", "not-finite", "not-a-choice"],
)
def test_bad_flag_values_are_usage_errors_naming_the_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", *REQUIRED, *argv])
    assert exc.value.code == 2
    assert f"argument {argv[0]}" in capsys.readouterr().err


def test_a_missing_required_setting_names_the_flag_and_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HISTOHELPER_MODEL", raising=False)
    with pytest.raises(SystemExit, match=r"--model \(or HISTOHELPER_MODEL\) is required"):
        cli_main(["serve", "--slide-root", "."])


def test_building_the_parser_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only config_from reads the environment: a bad variable cannot break other commands
    or ``serve --help``."""
    monkeypatch.setenv("HISTOHELPER_PORT", "not-a-port")
    monkeypatch.setenv("HISTOHELPER_READERS", "not-a-number")
    args = build_parser().parse_args(["serve", *REQUIRED])
    assert all(getattr(args, s.field_name) is None for s in cfg.settings() if s.field_name not in
               ("model_path", "slide_root"))  # fmt: skip


def test_serve_help_lists_flags_variables_and_deprecated_aliases(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["serve", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for s in cfg.settings():
        assert s.flag in text and f"[{s.env}]" in text
    assert "deprecated alias --readers / HISTOHELPER_READERS" in text
    assert "--stalled-stream-s SECONDS" in text and "--classify-request-max-mpx MPX" in text


def test_direct_construction_validates_with_flag_names() -> None:
    with pytest.raises(ValueError, match="--max-concurrent-analyses must be >= 1"):
        ServerConfig(model_path=Path("m"), slide_root=Path("."), max_concurrent_analyses=0)
    with pytest.raises(ValueError, match="--classify-stream-max-mpx must be > 0"):
        ServerConfig(model_path=Path("m"), slide_root=Path("."), classify_stream_max_px=0)


def test_update_rewrites_only_the_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{cfg.TABLE_BEGIN}\n| old |\n{cfg.TABLE_END}\n\nafter\n")
    assert cfg.main(["--update", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\n") and text.endswith(f"{cfg.TABLE_END}\n\nafter\n")
    assert cfg.markdown_table() in text and "| old |" not in text
