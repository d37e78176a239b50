"""The README block extractor on small Markdown samples (no server)."""

from __future__ import annotations

import readme_blocks as rb

SAMPLE = """# Title

```bash
histohelper info --server 127.0.0.1:50051
```

## Serve
<!-- illustrative: needs a GPU -->
```python
print(1)
```

1. In a list:

   ```console
   $ histohelper analyze a.svs \\
       --out x
   printed output
   $ echo done
   ```

```text
a diagram
```
"""


def test_blocks_carry_language_heading_reason_and_dedented_code() -> None:
    blocks, problems = rb.extract(SAMPLE)
    assert problems == []
    assert [(b.line, b.lang, b.heading, b.reason) for b in blocks] == [
        (3, "bash", "Title", None),
        (9, "python", "Serve", "needs a GPU"),
        (15, "console", "Serve", None),
        (22, "text", "Serve", None),
    ]
    assert [b.run_by_test for b in blocks] == [True, False, True, False]
    assert blocks[2].code.startswith("$ histohelper analyze a.svs \\\n    --out x\n")
    assert blocks[0].id == "L3-bash-title"


def test_console_keeps_commands_and_their_continuations_only() -> None:
    blocks, _ = rb.extract(SAMPLE)
    assert rb.console_commands(blocks[2].code) == (
        "histohelper analyze a.svs \\\n    --out x\necho done\n"
    )


def test_shell_commands_join_continuations_and_drop_comments() -> None:
    script = "# comment\nhistohelper serve --model m.pt \\\n    --port 50051   # why\n\nls\n"
    assert rb.shell_commands(script) == [
        "histohelper serve --model m.pt --port 50051   # why",
        "ls",
    ]


def test_defects_are_reported_with_their_lines() -> None:
    text = (
        "<!-- illustrative: -->\n```bash\nls\n```\n"  # empty reason
        "<!-- illustrative -->\n```bash\nls\n```\n"  # no colon, no reason
        "<!-- illustrative: stray -->\n\n```bash\nls\n```\n"  # not right before
        "```\nno language\n```\n"
        "```zsh\nls\n```\n"  # neither run nor data
        "<!-- illustrative: zsh -->\n```zsh\nls\n```\n"  # marked: fine
        "```python\nunclosed\n"
    )
    _, problems = rb.extract(text)
    assert [(p.line, p.message.split(" ")[0]) for p in problems] == [
        (1, "illustrative"),
        (5, "illustrative"),
        (9, "illustrative"),
        (14, "fence"),
        (17, "'zsh'"),
        (24, "unclosed"),
    ]


def test_substitution_touches_only_the_documented_names() -> None:
    code = "histohelper serve --slide-root /data/slides --port 50051\nc('127.0.0.1:50051')\n"
    values = {"server": "127.0.0.1:4242", "port": "--port 4242", "slide_root": "/tmp/s"}
    assert rb.substitute(code, values) == (
        "histohelper serve --slide-root /tmp/s --port 4242\nc('127.0.0.1:4242')\n"
    )
