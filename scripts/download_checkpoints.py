"""Download the released Res2Net checkpoints (all, or the named models) into the cache and verify them.

Usage: python scripts/download_checkpoints.py [MODEL ...] [--cache DIR] [--quiet]

Each file is checked against the sha256 prefix in its name (an already cached file too). Locations: the two public
ones, or $RES2NET_MIRRORS when set. Exit status: 0 all files present and verified, 1 some failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from res2net.errors import run_script
from res2net.models import RELEASED
from res2net.models.download import cache_dir, download_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", help=f"released models (default: all): {', '.join(sorted(RELEASED))}"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache directory (default: $RES2NET_CACHE or ~/.cache/res2net)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(RELEASED))
    if unknown:
        parser.error(f"no released checkpoint for {unknown}; released models: {', '.join(sorted(RELEASED))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.models or sorted(RELEASED)
    failed = []
    for name in names:
        try:
            path = download_checkpoint(name, cache=args.cache, progress=not args.quiet)
        except (RuntimeError, OSError, ValueError) as err:
            failed.append(name)
            print(f"FAILED   {name}: {err}", file=sys.stderr)
        else:
            print(f"verified {name}: {path}")
    print(f"{len(names) - len(failed)} of {len(names)} checkpoints verified in {args.cache or cache_dir()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_script(main))
