"""The `mmstack` console script through its real entry point (subprocess): commands, exit codes
(0 ok, 2 usage, 1 runtime with a one-line message), outputs written."""
from __future__ import annotations

import json
import subprocess
import sys


from golden import golden_dir, tokenizer_for

VL2 = golden_dir() / "vl2_tiny_mla_moe"
JANUS = golden_dir() / "janus_pro_tiny"


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mmstack.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0
    for name in ("describe", "chat", "ground", "generate", "convert", "info"):
        assert name in r.stdout
    assert run("describe", "--help").returncode == 0


def test_usage_error_exits_2_and_runtime_error_exits_1_with_one_line():
    assert run("describe").returncode == 2  # no IMAGE
    r = run("describe", "--model", VL2, "--tokenizer", golden_dir() / "vl2_tokenizer", "--device", "cpu", "/nonexistent.png")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nonexistent.png" in r.stderr
    assert "Traceback" not in r.stderr


def test_describe_and_ground(tmp_path):
    common = ["--model", VL2, "--tokenizer", golden_dir() / "vl2_tokenizer", "--device", "cpu"]
    r = run("describe", *common, VL2 / "image.png", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "boxed.png"
    r = run("ground", *common, VL2 / "image.png", "the cat", "--out", out, "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list) and out.exists()


def test_generate_writes_png_files(tmp_path):
    r = run("generate", "--model", JANUS, "--tokenizer", tokenizer_for(JANUS), "--device", "cpu", "a red circle",
            "-n", "2", "--seed", "3", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 2 and [str(f) for f in files] == sorted(r.stdout.split())


def test_chat_reads_turns_from_stdin():
    stdin = f"/image {VL2 / 'image.png'}\nWhat is it?\n/quit\n"
    r = run("chat", "--model", VL2, "--tokenizer", golden_dir() / "vl2_tokenizer", "--device", "cpu",
            "--max-new-tokens", "3", stdin=stdin)
    assert r.returncode == 0, r.stderr


def test_convert_to_native_and_reload(tmp_path):
    r = run("convert", JANUS, tmp_path / "native", "--tokenizer", tokenizer_for(JANUS))
    assert r.returncode == 0, r.stderr
    info = json.loads(run("info", tmp_path / "native").stdout)
    assert info["source_format"] == "mmstack" and "vq_head" in info["parts"]
