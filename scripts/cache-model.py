#!/usr/bin/env python3
"""The relay's work per document as the documents it holds grow, counted rather than timed.

Runs the versus benchmark's `alone` section once (500, 2,000 and 8,000 new documents pushed to a
fresh relay each) with every tandem relay under cachegrind, and prints per document, at each
size: instructions, first-level data cache misses, and misses of a simulated last-level cache
the size of one core's L2 (2 MiB here; `--ll-bytes`). CPU time on a shared 2-core host moves by
a tenth or more from run to run; these counts move by a few percent at most (thread timing), so
they show whether the cost per document grows with the data held, and where (cg_annotate on the
files kept in the output folder).

A relay starts itself again to turn glibc's thread caches off; under valgrind it must not (the
new process would run outside the tool), and setting the tunable in the environment, as this
does, stops it.

Usage: scripts/cache-model.py [--ll-bytes N] [--keep DIR]   (needs valgrind; ~2 minutes after
the release build; honours CARGO_TARGET_DIR and TANDEM_BENCH_SCALE)
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

SIZES = [500, 2_000, 8_000]


def summary(path):
    """(instructions, D1 misses, LL data misses) of one cachegrind output file."""
    events, totals = None, None
    with open(path) as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("summary:"):
                totals = [int(x) for x in line.split()[1:]]
    if not events or not totals:
        raise SystemExit(f"{path}: not a finished cachegrind output")
    got = dict(zip(events, totals))
    return (
        got["Ir"],
        got["D1mr"] + got["D1mw"],
        got["DLmr"] + got["DLmw"],
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--ll-bytes", type=int, default=2 << 20, help="a power of two (valgrind's rule)"
    )
    p.add_argument("--keep", help="keep cachegrind's files in this folder")
    args = p.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("cache-model.py: valgrind is not installed")
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    out = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="tandem-cache-model-")
    try:
        run(args, out)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


def run(args, out):
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "relay.*.out")):
        os.remove(old)
    # As the bench sizes them (it truncates).
    scale = float(os.environ.get("TANDEM_BENCH_SCALE", "1"))
    sizes = [max(1, int(d * scale)) for d in SIZES]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count" not in tunables:
        tunables = ":".join(t for t in [tunables, "glibc.malloc.tcache_count=0"] if t)
    env = dict(
        os.environ,
        TANDEM_BENCH_ONLY="alone",
        TANDEM_VERSUS_REPEAT="1",
        GLIBC_TUNABLES=tunables,
        TANDEM_VERSUS_RELAY_WRAP=(
            f"valgrind --tool=cachegrind --cache-sim=yes --LL={args.ll_bytes},16,64 "
            f"--cachegrind-out-file={out}/relay.%p.out"
        ),
    )
    subprocess.run(
        ["cargo", "bench", "--bench", "versus"], env=env, check=True, stdout=subprocess.DEVNULL
    )
    files = glob.glob(os.path.join(out, "relay.*.out"))
    if len(files) != len(sizes):
        sys.exit(f"cache-model.py: {len(files)} relay profiles in {out}, expected {len(sizes)}")
    # One relay per size, each started fresh, the sizes in turn: in the order of their pids.
    pid = lambda f: int(os.path.basename(f).split(".")[1])
    runs = [summary(f) for f in sorted(files, key=pid)]
    print(f"| documents | instructions/doc | L1 data misses/doc | {args.ll_bytes >> 10} KiB LL misses/doc |")
    print("|---|---|---|---|")
    for d, (ir, d1, ll) in zip(sizes, runs):
        print(f"| {d} | {ir / d:,.0f} | {d1 / d:,.0f} | {ll / d:,.0f} |")
    first, last = runs[0], runs[-1]
    ratio = [(b / sizes[-1]) / (a / sizes[0]) for a, b in zip(first, last)]
    print(
        f"| {sizes[0]} → {sizes[-1]} | {ratio[0]:.2f}× | {ratio[1]:.2f}× | {ratio[2]:.2f}× |"
    )


if __name__ == "__main__":
    main()
