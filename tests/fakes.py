"""Test doubles shared by several test files."""

from __future__ import annotations

import hashlib
import re

import numpy as np

from llmhyper.retrieval.encoders import Encoder, l2_normalize


class HashEncoder(Encoder):
    """Bag-of-words hashing into 64 dims: deterministic, instant, no model files."""

    name = "test-hash"
    dim = 64

    def encode_texts(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", str(t).lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        return l2_normalize(out + 1e-6)

    def encode_images(self, image_paths):
        from PIL import Image

        out = []
        for p in image_paths:
            rgb = np.asarray(Image.open(p).convert("RGB"), np.float32).mean((0, 1))
            v = np.zeros(self.dim, np.float32)
            v[:3] = rgb / 255.0
            out.append(v + 1e-6)
        return l2_normalize(np.array(out))

    def caption(self, image_path, top=3):
        return "poster image tags: test pattern"


def chromium() -> str | None:
    """A headless-capable Chromium on PATH (CI installs Debian's `chromium`), or None."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def dump_dom(page, profile_dir) -> str:
    """Load a local HTML file in headless Chromium and return the DOM after scripts ran."""
    import subprocess

    proc = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile_dir}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


NO_CHROMIUM = (
    "no headless Chromium on PATH (CI: apt-get install -y chromium); the HTML is parsed with html.parser"
)
