"""Standalone fuzzer: the reliability targets (`tests/reliability/hostile.py`) for a time budget.

    python tests/fuzz/fuzz_inputs.py --seconds 600                   # every target, round robin
    python tests/fuzz/fuzz_inputs.py --seconds 60 --targets load_image,read_config
    python tests/fuzz/fuzz_inputs.py --targets load_image --seed 1234 --rounds 1   # replay one logged round

Each round runs one target for `--examples` hypothesis examples from a fresh seed, which is logged first,
so a failure or a hang is replayed with `--targets NAME --seed SEED --rounds 1`. A case may take at most
`--deadline-ms` (hypothesis deadline); one stuck past `--hang-seconds` (even inside C code) makes the
process dump every thread's stack and exit 3. The process runs under an address-space cap
(`--max-memory-mb`), so an allocation a limit should have prevented fails loudly. Exit status: 0 when no
target failed, 1 otherwise. No pytest: this runs where the test suite does not.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import random
import resource
import sys
import time
import traceback
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "reliability")]

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

import hostile  # noqa: E402


def counted(target, stats: dict, hang_seconds: float):
    """`target.run` that counts cases and arms the hang watchdog around each one."""

    def run(case):
        stats["examples"] += 1
        faulthandler.dump_traceback_later(hang_seconds, exit=True)
        try:
            target.run(case)
        finally:
            faulthandler.cancel_dump_traceback_later()

    return run


def fuzz_round(target, stats: dict, examples: int, round_seed: int, deadline_ms: int, hang_seconds: float) -> bool:
    """One hypothesis run; True when it found no failure (the failure is printed, shrunk)."""
    test = settings(max_examples=examples, deadline=deadline_ms, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))(
        seed(round_seed)(given(target.strategy)(counted(target, stats, hang_seconds))))
    try:
        test()
        return True
    except Exception as e:  # a failure: shrunk by hypothesis, the falsifying example is in the notes
        stats["failures"].append({"seed": round_seed, "error": f"{type(e).__name__}: {e}"[:2000],
                                  "notes": list(getattr(e, "__notes__", []))[:20]})
        print(f"FAILED {target.name} (seed {round_seed}):", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fuzz_inputs.py", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600, help="total time budget (default 600)")
    p.add_argument("--targets", default="all", help="comma-separated names (default all): "
                   + ", ".join(t.name for t in hostile.TARGETS))
    p.add_argument("--examples", type=int, default=200, help="hypothesis examples per round")
    p.add_argument("--rounds", type=int, default=None, help="stop after this many rounds")
    p.add_argument("--seed", type=int, default=None, help="seed of the first round (default random)")
    p.add_argument("--deadline-ms", type=int, default=3000, help="per-case time limit")
    p.add_argument("--hang-seconds", type=float, default=60, help="a case running this long is a hang: dump, exit 3")
    p.add_argument("--max-memory-mb", type=int, default=4096, help="address-space cap of this process")
    p.add_argument("--report", default=None, help="write the per-target figures as JSON here")
    args = p.parse_args(argv)

    names = [t.name for t in hostile.TARGETS] if args.targets == "all" else args.targets.split(",")
    unknown = sorted(set(names) - {t.name for t in hostile.TARGETS})
    if unknown:
        p.error(f"unknown targets {unknown}")
    targets = [t for t in hostile.TARGETS if t.name in names]
    warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data" and the like: expected, and noise here
    hostile.vl2_processor(), hostile.janus_processor(), hostile.image_seeds()  # load before the cap
    resource.setrlimit(resource.RLIMIT_AS, (args.max_memory_mb << 20, args.max_memory_mb << 20))

    rng = random.Random(args.seed)
    stats = {t.name: {"examples": 0, "rounds": 0, "seconds": 0.0, "failures": []} for t in targets}
    failed: set[str] = set()
    start, rounds = time.monotonic(), 0
    while time.monotonic() - start < args.seconds and (args.rounds is None or rounds < args.rounds):
        live = [t for t in targets if t.name not in failed]
        if not live:
            break
        target = live[rounds % len(live)]
        round_seed = args.seed if rounds == 0 and args.seed is not None else rng.randrange(1 << 32)
        print(f"[{time.monotonic() - start:7.1f}s] round {rounds}: {target.name} seed {round_seed}", flush=True)
        s, t0 = stats[target.name], time.monotonic()
        if not fuzz_round(target, s, args.examples, round_seed, args.deadline_ms, args.hang_seconds):
            failed.add(target.name)
        s["rounds"] += 1
        s["seconds"] = round(s["seconds"] + time.monotonic() - t0, 1)
        rounds += 1

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{'target':20s} {'examples':>9s} {'rounds':>6s} {'seconds':>8s}  result")
    for name, s in stats.items():
        print(f"{name:20s} {s['examples']:9d} {s['rounds']:6d} {s['seconds']:8.1f}  "
              f"{'FAILED' if s['failures'] else 'ok'}")
    print(f"wall {time.monotonic() - start:.0f} s, peak resident set {peak_mb:.0f} MiB")
    if args.report:
        report = {"seconds": round(time.monotonic() - start, 1), "peak_rss_mb": round(peak_mb), "targets": stats}
        Path(args.report).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
