"""Render the README figure: the dependency groups of ResNet-18, as headless Chromium shows the HTML page.

    python tools/render_readme_figure.py            # writes docs/resnet18-groups.png

It traces ``examples/resnet18.py``, draws it with an L1 pruner at 50 %
sparsity (``fxcompress.viz``), opens the self-contained HTML page in headless
Chromium and saves a screenshot, reduced to a 256-colour palette so the
committed PNG stays small. Without Chromium it falls back to Graphviz's own
PNG of the whole graph (tall, but the same picture).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxcompress.cli import load_model_file  # noqa: E402
from fxcompress.prune import L1Norm  # noqa: E402
from fxcompress.trace import trace  # noqa: E402
from fxcompress.viz import render, view_graph  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def screenshot(page: Path, out: Path, size: tuple[int, int]) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--window-size={size[0]},{size[1]}", f"--screenshot={out}",
                    "--virtual-time-budget=2000", page.as_uri()], check=True, capture_output=True, timeout=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "examples" / "resnet18.py"), help="model file to draw")
    parser.add_argument("--sparsity", type=float, default=0.5, help="L1 pruner sparsity shown on edges")
    parser.add_argument("--out", default=str(ROOT / "docs" / "resnet18-groups.png"), help="PNG to write")
    parser.add_argument("--size", default="1100x720", help="browser window, WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    loaded = load_model_file(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = trace(loaded.model, loaded.example_inputs)
    view = view_graph(gm, pruner=L1Norm(args.sparsity), title=f"ResNet-18, L1 pruner at {args.sparsity:.0%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = render(view, Path(tmp) / "resnet18", ("html", "png"))
        raw = Path(tmp) / "shot.png"
        if shutil.which("chromium") or shutil.which("chromium-browser"):
            screenshot(paths["html"], raw, tuple(int(v) for v in args.size.split("x")))
        else:
            print("chromium not found: using Graphviz's PNG of the whole graph instead", file=sys.stderr)
            raw = paths["png"]
        Image.open(raw).convert("RGB").quantize(colors=256).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
