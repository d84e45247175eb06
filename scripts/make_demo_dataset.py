"""Write the synthetic demo dataset (coloured shapes moving over backgrounds) to a folder.

    python scripts/make_demo_dataset.py --out data/demo [--count 8] [--seed 0] [--layout txt|json] [--validation 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cogtune.shared.demo import make_demo_dataset, make_validation_set


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the dataset into")
    parser.add_argument("--count", type=int, default=8, help="number of video clips (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same dataset (default 0)")
    parser.add_argument(
        "--layout",
        choices=("txt", "json"),
        default="txt",
        help="txt: prompts.txt + videos.txt; json: dataset.json with a few images mixed in (default txt)",
    )
    parser.add_argument(
        "--validation",
        type=int,
        default=2,
        help="validation prompts written to OUT/validation/, each with a first-frame image for I2V (0: none; "
        "default 2)",
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.validation < 0:
        parser.error("--validation must be 0 or more")
    samples = make_demo_dataset(args.out, count=args.count, seed=args.seed, layout=args.layout)
    videos = sum(s.type == "video" for s in samples)
    print(f"wrote {videos} videos and {len(samples) - videos} images to {args.out}")
    if args.validation:
        folder = make_validation_set(args.out, count=args.validation, seed=args.seed)
        print(f"wrote {args.validation} validation prompts and their first-frame images to {folder}")


if __name__ == "__main__":
    main()
