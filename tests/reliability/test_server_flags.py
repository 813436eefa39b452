"""Server sizes from the command line (round 3 of the adversarial cases, docs/limits.md): `mmstack serve` and
`mmstack demo` refuse a batch, queue, body or upload limit no server could run with as a usage error naming the
flag, before any model loads (they used to start, then fail every request, or crash on a NaN)."""
from __future__ import annotations

import argparse

import pytest

from mmstack.apps import serve


def _parser(module) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmstack")
    module.add_arguments(p)
    return p


@pytest.mark.parametrize("argv, flag", [(["--max-batch", "0"], "--max-batch"), (["--max-waiting", "-1"], "--max-waiting"),
                                        (["--max-body-mb", "nan"], "--max-body-mb"), (["--max-body-mb", "-1"], "--max-body-mb"),
                                        (["--max-body-mb", "inf"], "--max-body-mb"), (["--port", "99999"], "--port")])
def test_serve_refuses_sizes_no_server_could_run_with(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        _parser(serve).parse_args(argv)
    assert e.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [(["--max-queue", "-1"], "--max-queue"), (["--max-upload-mb", "-5"], "--max-upload-mb"),
                                        (["--max-batch", "0"], "--max-batch"), (["--port", "-3"], "--port"),
                                        (["--port", "0"], "--port")])  # gradio cannot bind port 0
def test_demo_refuses_sizes_no_server_could_run_with(argv, flag, capsys):
    from mmstack.apps import demo

    with pytest.raises(SystemExit) as e:
        _parser(demo).parse_args(argv)
    assert e.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_sound_sizes_still_parse():
    args = _parser(serve).parse_args(["--max-batch", "1", "--max-waiting", "0", "--max-body-mb", "0.5", "--port", "0"])
    assert (args.max_batch, args.max_waiting, args.max_body_mb, args.port) == (1, 0, 0.5, 0)
