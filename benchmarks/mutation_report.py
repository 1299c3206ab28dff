"""The score of the last `make mutation` run per mutated file, from mutmut's results in mutants/ (docs/diffusion.md,
"Mutation testing").

    .venv/bin/python benchmarks/mutation_report.py [--survivors]

Counts each mutant by mutmut's exit code (mutmut.stats.status_by_exit_code): killed, survived, no covering test,
timeout (never counted as killed: a hung child is not a failing test), other (suspicious, segfault) and not run. The
killed share is killed / checked, checked being every mutant that ran or had no covering test. ``--survivors`` also
lists the survivors by name (``mutmut show NAME`` prints each one's diff).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from mutmut.stats import status_by_exit_code

COLUMNS = ("killed", "survived", "no tests", "timeout", "other", "not checked")


def status(code: int | None) -> str:
    s = status_by_exit_code[code]
    return s if s in COLUMNS else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants by name")
    parser.add_argument("--root", default="mutants", help="mutmut's working directory (default: mutants)")
    args = parser.parse_args()
    metas = sorted(Path(args.root).glob("**/*.py.meta"))
    if not metas:
        raise SystemExit(f"no mutmut results under {args.root}/; run `make mutation` first")
    total, survivors = collections.Counter(), []
    print(f"{'file':40s} {'mutants':>7s} " + " ".join(f"{c:>11s}" for c in COLUMNS) + "   killed/checked")
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        counts = collections.Counter(status(c) for c in codes.values())
        total.update(counts)
        survivors += sorted(k for k, c in codes.items() if status(c) == "survived")
        print(row(str(meta.relative_to(args.root))[: -len(".meta")], len(codes), counts))
    print(row("all", sum(total.values()), total))
    if args.survivors:
        print("\nsurvivors:", *survivors, sep="\n")


def row(name: str, n: int, counts: collections.Counter) -> str:
    checked = n - counts["not checked"]
    share = f"{100 * counts['killed'] / checked:6.1f}%" if checked else "      -"
    return f"{name:40s} {n:7d} " + " ".join(f"{counts[c]:11d}" for c in COLUMNS) + f"   {share}"


if __name__ == "__main__":
    main()
