#!/usr/bin/env python3
"""``make demo``: export a model, serve it on loopback, analyse one slide, stop.

Steps (each printed as the command a person would type):
1. ``histohelper export`` -> ``artifacts/`` (skipped when an artifact for the same
   weights already exists: a second run is fast);
2. ``histohelper serve`` on a free 127.0.0.1 port with the slide's folder as slide root;
3. ``histohelper analyze`` writes overlay, heatmap, GeoJSON and summary to ``--out``;
4. the server is stopped with SIGTERM (graceful shutdown).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "histohelper"


def sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def run(cmd: list[str]) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, required=True, help="whole-slide image to analyse")
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    parser.add_argument("--weights", type=Path, help="torchvision resnet18 checkpoint (optional)")
    parser.add_argument("--mil-weights", type=Path, help="MIL head checkpoint (optional)")
    args = parser.parse_args()

    slide = args.slide.resolve()
    if not slide.is_file():
        print(f"demo: slide not found: {args.slide}", file=sys.stderr)
        return 2
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    # One artifact per (patch weights, MIL head) pair: MIL_WEIGHTS alone must not reuse
    # the fully untrained artifact.
    key = sha256_prefix(args.weights) if args.weights else "untrained"
    if args.mil_weights:
        key += "-mil-" + sha256_prefix(args.mil_weights)
    model = artifacts / f"model-{key}.pt"
    if model.exists():
        print(f"model artifact up to date: {model.relative_to(ROOT)}")
    else:
        cmd = [str(BIN), "export", str(model), "--calibration-slide", str(slide)]
        if args.weights:
            cmd += ["--weights", str(args.weights)]
        if args.mil_weights:
            cmd += ["--mil-weights", str(args.mil_weights)]
        run(cmd)

    with tempfile.TemporaryDirectory(prefix="histohelper-demo-") as tmp:
        ready = Path(tmp) / "ready.json"
        log_path = Path(tmp) / "server.log"
        serve = [
            str(BIN), "serve", "--model", str(model), "--slide-root", str(slide.parent),
            "--port", "0", "--ready-file", str(ready),
        ]  # fmt: skip
        print("$", shlex.join(serve), "&", flush=True)
        with log_path.open("wb") as log:
            server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not ready.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.stderr.write(log_path.read_text(errors="replace"))
                    print("demo: the server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            port = json.loads(ready.read_text())["port"]
            analyze = [str(BIN), "analyze", slide.name, "--server", f"127.0.0.1:{port}"]
            run([*analyze, "--out", str(args.out)])
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(60)
                except subprocess.TimeoutExpired:
                    server.kill()
    out = args.out.resolve()
    print(f"\nOutputs in {out}:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:28s} {path.stat().st_size:>10,d} bytes")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
