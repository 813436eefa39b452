"""Import paths that moved in the architecture split keep working for one release: the old module gives the
very objects of the new one (so monkeypatching either affects both), and `python -m mmstack.cli` still runs."""
from __future__ import annotations

import subprocess
import sys


def test_old_bench_and_cli_paths_re_export_the_moved_objects():
    from mmstack import bench, bench_suites, cli
    from mmstack.apps import bench as new_bench
    from mmstack.apps import bench_measure, cli as new_cli
    from mmstack.apps import bench_suites as new_suites

    assert cli.main is new_cli.main and cli.build_parser is new_cli.build_parser
    assert cli.LAZY_COMMANDS["bench"][0] == "mmstack.apps.bench"
    assert bench.run_suites is new_bench.run_suites and bench.Case is bench_measure.Case
    assert bench.GateError is bench_measure.GateError and bench.measure is bench_measure.measure
    assert bench_suites.SUITES is new_suites.SUITES and bench_suites.MLA_SIZES is new_suites.MLA_SIZES


def test_python_dash_m_mmstack_cli_still_runs():
    r = subprocess.run([sys.executable, "-m", "mmstack.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("mmstack ")
