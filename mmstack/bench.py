"""Kept for one release: `mmstack bench` moved to `mmstack.apps.bench` (command line and `run_suites`) and
`mmstack.apps.bench_measure` (cases, timing, tables). Import from there."""
from mmstack.apps.bench import add_arguments, main, run_suites
from mmstack.apps.bench_measure import (METRICS, SIZES, Case, Contender, GateError, environment, format_table, measure,
                                        timed)

__all__ = ["METRICS", "SIZES", "Case", "Contender", "GateError", "add_arguments", "environment", "format_table",
           "main", "measure", "run_suites", "timed"]
