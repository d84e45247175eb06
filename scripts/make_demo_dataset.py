"""Write the synthetic demo dataset (coloured shapes moving over backgrounds) to a folder.

    python scripts/make_demo_dataset.py --out data/demo [--count 8] [--seed 0] [--layout txt|json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cogtune.shared.demo import make_demo_dataset


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
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    samples = make_demo_dataset(args.out, count=args.count, seed=args.seed, layout=args.layout)
    videos = sum(s.type == "video" for s in samples)
    print(f"wrote {videos} videos and {len(samples) - videos} images to {args.out}")


if __name__ == "__main__":
    main()
