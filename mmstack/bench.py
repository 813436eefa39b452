"""Kept for one release: `mmstack bench` moved to `mmstack.apps.bench` (command line and `run_suites`) and
`mmstack.apps.bench_measure` (cases, timing, tables). Import from there."""
from mmstack.apps.bench import add_arguments, main, run_suites  # noqa: F401
from mmstack.apps.bench_measure import (METRICS, SIZES, Case, Contender, GateError, environment,  # noqa: F401
                                        format_table, measure, timed)
