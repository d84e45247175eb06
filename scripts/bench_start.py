"""Measure what ``cogtrain run`` imports before its first step, on a tiny model, with ``python -X importtime``.

    python scripts/bench_start.py [--rounds 3] [--work DIR] [--json PATH]

Each round runs four fresh processes, so that a slow spell of a shared machine hits all of them alike:

  torch       ``import torch`` alone: the floor every PyTorch trainer pays;
  floor       ``import torch``, diffusers' CogVideoX transformer module and peft: what any LoRA trainer built on
              diffusers and peft imports before its first step (diffusers' ``utils.torch_utils`` imports
              ``torch._dynamo`` at module level, and peft imports bitsandbytes where it is installed);
  cogtrain    ``cogtrain run --max-steps 1`` on the tiny CogVideoX-5b of `shared.zoo` and a 4-clip store, stopped
              at its first optimizer step (`FIRST_STEP_DRIVER`);
  pipelines   the same run with diffusers' CogVideoX pipeline module imported first, as cogtrain imported it
              before the pipelines were left to validation (``train.math`` took one helper from it): the baseline.

For each it reports the seconds of imports (the sum of ``-X importtime``'s self times, i.e. import work alone)
and the wall seconds from the driver's first line to the first step, the median over rounds, and whether the
pipeline module and ``torch._dynamo`` were loaded by then. ``torch._dynamo`` comes with diffusers' model code
itself (``diffusers.utils.torch_utils`` imports it), so no trainer on diffusers avoids it. Target: under 3 s of
imports before the first step; cogtrain's own share is its imports less the floor's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_report import print_json

PIPELINE_MODULE = "diffusers.pipelines.cogvideo.pipeline_cogvideox"
FLOOR_IMPORTS = "import torch, peft; import diffusers.models.transformers.cogvideox_transformer_3d"
MARKER = "COGTUNE-FIRST-STEP"
TARGET_IMPORT_S = 3.0

FIRST_STEP_DRIVER = f"""
import time
started = time.perf_counter()
import json, sys
if sys.argv[1] == "pipelines":
    import {PIPELINE_MODULE}
from cogtune.shared.cli import bitsandbytes_hidden

with bitsandbytes_hidden():  # as cogtrain run imports the trainer (unless --optimizer adamw8bit)
    from cogtune.train import trainer

first_step = trainer.Stepper.step

def step(self, *args, **kwargs):
    loaded = {{name: name in sys.modules for name in ("{PIPELINE_MODULE}", "torch._dynamo", "bitsandbytes")}}
    print("{MARKER} " + json.dumps({{"seconds": time.perf_counter() - started, "loaded": loaded}}), file=sys.stderr,
          flush=True)
    raise SystemExit(0)  # the first step is reached: what came before is what is measured

trainer.Stepper.step = step
from cogtune.train.cli import main

sys.argv = ["cogtrain", "run", *sys.argv[2:]]
main()
"""
"""Runs ``cogtrain run ARGS`` (argv: ``plain|pipelines ARGS``) and stops it at its first step, printing a JSON line
after `MARKER` on stderr: seconds since the driver's first line and which modules were loaded."""


def make_setup(work: Path) -> list[str]:
    """A tiny 5b model, a 4-clip demo dataset and its store under `work`; returns cogtrain run's arguments."""
    from cogtune.shared.demo import make_demo_dataset
    from cogtune.shared.zoo import make_tiny_model

    model, data, store = work / "model", work / "data", work / "store"
    if not (model / "model_index.json").exists():
        make_tiny_model("5b", model, seed=0)
    if not (data / "videos.txt").exists():
        make_demo_dataset(data, count=4, seed=1, layout="txt")
    buckets = Path(__file__).parent / "tiny_buckets.yaml"
    subprocess.run([sys.executable, "-m", "cogtune.preprocess.cli", "encode", str(data), "--model", str(model),
                    "--out", str(store), "--buckets", str(buckets), "--no-progress", "--workers", "0"],
                   check=True, capture_output=True)
    return ["--store", str(store), "--model", str(model), "--mixed-precision", "no", "--report-to", "none",
            "--no-progress", "--max-steps", "1", "--rank", "4"]


def import_seconds(importtime: str, until: str | None) -> float:
    """Sum of the self times of the ``-X importtime`` lines before the line starting with `until`."""
    total = 0
    for line in importtime.splitlines():
        if until is not None and line.startswith(until):
            break
        if line.startswith("import time:") and "|" in line:
            field = line[len("import time:"):].split("|")[0].strip()
            if field.isdigit():
                total += int(field)
    return total / 1e6


def measure(variant: str, args: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a run folder left by an earlier benchmark in the same --work
    if variant in ("torch", "floor"):
        code, argv, until = "import torch" if variant == "torch" else FLOOR_IMPORTS, [], None
    else:
        code, argv, until = FIRST_STEP_DRIVER, ["pipelines" if variant == "pipelines" else "plain", *args,
                                                "--out", str(out)], MARKER
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *argv], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{variant}: exit {done.returncode}\n{done.stderr[-3000:]}")
    result = {"import_s": import_seconds(done.stderr, until)}
    for line in done.stderr.splitlines():
        if line.startswith(MARKER):
            reached = json.loads(line[len(MARKER):])
            result.update(first_step_wall_s=reached["seconds"], loaded=reached["loaded"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four processes (default 3)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the tiny model and store (default: a "
                                                                "temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON printed to this file")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = options.work or Path(tmp)
        args = make_setup(work)
        rounds: dict[str, list[dict]] = {"torch": [], "floor": [], "cogtrain": [], "pipelines": []}
        for r in range(options.rounds):
            for variant in rounds:
                rounds[variant].append(measure(variant, args, work / f"run-{variant}-{r}"))
    summary = {}
    for variant, results in rounds.items():
        summary[variant] = {"import_s_median": round(statistics.median(x["import_s"] for x in results), 3),
                            "import_s": [round(x["import_s"], 3) for x in results]}
        if variant not in ("torch", "floor"):
            summary[variant]["first_step_wall_s_median"] = round(
                statistics.median(x["first_step_wall_s"] for x in results), 3)
            summary[variant]["loaded_at_first_step"] = results[-1]["loaded"]
    cogtrain_own_s = round(summary["cogtrain"]["import_s_median"] - summary["floor"]["import_s_median"], 3)
    report = {"rounds": options.rounds, "variants": summary, "cogtrain_over_floor_s": cogtrain_own_s,
              "pass": summary["cogtrain"]["import_s_median"] < TARGET_IMPORT_S}
    print(f"{'variant':<12}{'imports (median s)':>20}{'first step (wall s)':>22}  pipeline module loaded")
    for variant, figures in summary.items():
        wall = figures.get("first_step_wall_s_median")
        loaded = figures.get("loaded_at_first_step", {}).get(PIPELINE_MODULE, "")
        print(f"{variant:<12}{figures['import_s_median']:>20.2f}{wall if wall is not None else '':>22}  {loaded}")
    print(f"cogtrain's own imports (cogtrain less floor): {cogtrain_own_s:.2f} s")
    print(f"target: cogtrain under {TARGET_IMPORT_S} s of imports before its first step: "
          f"{'met' if report['pass'] else 'not met'}")
    print_json(report, options.json)


if __name__ == "__main__":
    main()
