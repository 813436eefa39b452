"""Hostile inputs through every parser, in CI: only the documented exceptions escape, no case runs past
the deadline, and the image intake never allocates past its pixel limit (checked under an address-space
cap). The same targets run for as long as you like with `python tests/fuzz/fuzz_inputs.py --seconds 600`."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import hostile

DEADLINE_MS = 3000  # per case; a parser that hangs (a regex backtracking, a loop) fails here
HERE = Path(__file__).resolve().parent
# PIL reports damage it works around ("Truncated File Read", "Corrupt EXIF data") as warnings: expected here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")


@pytest.mark.parametrize("target", hostile.TARGETS, ids=lambda t: t.name)
def test_hostile_inputs_raise_only_documented_errors(target):
    run = settings(max_examples=target.ci_examples, deadline=DEADLINE_MS, database=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.large_base_example])(given(target.strategy)(target.run))
    run()


def test_webp_sizes_are_read_from_the_riff_header_of_every_kind():
    """Lossy (VP8), lossless (VP8L) and extended (VP8X: animation, alpha, EXIF) files: the size the intake
    checks before PIL opens them is the size they decode to."""
    from PIL import Image

    from mmstack.vision.image_io import _webp_size, load_image

    frames = [Image.new("RGBA", (53, 37), colour) for colour in ("red", "blue")]
    for options in [{}, {"lossless": True}, {"save_all": True, "append_images": frames[1:]}, {"exif": b"Exif\0\0"}]:
        buf = io.BytesIO()
        frames[0].save(buf, "WEBP", **options)
        assert _webp_size(buf.getvalue()[:30]) == (53, 37) == load_image(buf.getvalue()).size, options


def test_declared_sizes_are_refused_before_any_pixel_is_allocated():
    """Headers declaring 65535 x 65535 (PNG, BMP, GIF, JPEG, TIFF; WebP 16384 x 16384) or 10000 x 10000
    (past `max_pixels` but under PIL's own guard) are refused with no growth of the resident set; then the
    mutated seeds decode in a process capped at 1 GiB of address space, where a decoder allocating what a
    header claims (up to 12 GiB) would die with MemoryError instead of raising ImageError."""
    script = textwrap.dedent(f"""
        import random, resource, sys
        sys.path[:0] = [{str(HERE.parent)!r}, {str(HERE)!r}]
        import hostile
        from mmstack.vision.image_io import ImageError, load_image

        def refused(data):
            try:
                load_image(data)
            except ImageError as e:
                return str(e)
            raise AssertionError("loaded")

        headers = [(name, size, data) for size in [(65535, 65535), (10000, 10000)]
                   for name, data in hostile.huge_headers(*size).items()]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for name, size, data in headers:
            assert "pixel limit" in refused(data), (name, size)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown < 32 * 1024, f"resident set grew by {{grown}} KiB"
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        for name, size, data in headers:  # (libwebp would allocate the canvas as PIL opens the file)
            assert "pixel limit" in refused(data), (name, size)
        rng = random.Random(0)
        for _ in range(300):
            seed = rng.choice(hostile.image_seeds())
            ops = [(rng.choice(hostile.MUTATIONS), rng.randrange(1 << 20), rng.randbytes(4)) for _ in range(3)]
            try:
                load_image(hostile.mutate(seed, ops))
            except ImageError:
                pass
        print("ok")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
