"""Seeing what training does: the held-out set, a held-out loss that moves only with the weights, the loss plot,
the validation contact sheets, and the best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cogtune.train.data import StoreLoader
from cogtune.train.evaluation import eval_generator, eval_timesteps, holdout_rows
from PIL import Image
from train_helpers import cogtrain, cogtrain_command, launch, losses, one_thread

EVAL = ("--eval-holdout", "2", "--eval-every", "2")


def logged(run: Path) -> dict[int, dict]:
    return {entry["step"]: entry for entry in map(json.loads, (run / "losses.jsonl").read_text().splitlines())}


def test_the_held_out_set_is_fixed_by_the_store_and_k_and_never_trained_on(train_store):
    held = holdout_rows(train_store, 2)
    assert held == holdout_rows(train_store, 2) and len(held) == 2
    assert holdout_rows(train_store, 0.5) == held  # half of 4 samples: the same 2
    loader = StoreLoader.from_store(train_store, 1, prefetch=0, held_out=held)
    yielded = set()
    for batch, _ in (pair for pair, _ in zip(loader, range(3 * loader.steps_per_epoch))):
        yielded |= set(batch["rows"].tolist())
    assert yielded == set(range(4)) - set(held)


def test_the_eval_loss_is_the_mean_of_training_steps_at_the_fixed_timesteps(train_store, tiny_models):
    """By hand: training_step on each held-out sample at each of the 8 timesteps, with the evaluator's draws."""
    from types import SimpleNamespace

    from cogtune.shared import store as S
    from cogtune.shared.models import open_model
    from cogtune.train.data import PlannedBatch, SamplerPosition, StoreDataset
    from cogtune.train.evaluation import Evaluator
    from cogtune.train.math import TrainBatch, training_step

    model = open_model(tiny_models["5b"])
    transformer, scheduler, vae = model.load_transformer(torch.float32), model.load_scheduler(), model.config("vae")
    held = holdout_rows(train_store, 2)
    stepper = SimpleNamespace(model=transformer, noise_scheduler=scheduler, vae_config=vae, embed_dtype=torch.float32,
                              transformer_config=dict(transformer.config))
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, process_index=0, num_processes=1,
                                  device=torch.device("cpu"), gather=lambda t: t)
    dataset = StoreDataset(train_store)
    figures = Evaluator(dataset, held, seed=5).evaluate(stepper, accelerator)

    timesteps = eval_timesteps(scheduler.config.num_train_timesteps)
    assert timesteps == [62, 187, 312, 437, 562, 687, 812, 937]
    by_hand = torch.zeros(len(held), len(timesteps))
    for n, row in enumerate(held):
        tensors = dataset.read_batch(PlannedBatch([row], 0, 0, SamplerPosition(0, 0)))
        batch = TrainBatch(tensors[S.MEAN], tensors[S.LOGVAR], tensors[S.EMBEDDING].float())
        for i, t in enumerate(timesteps):
            with torch.no_grad():
                by_hand[n, i] = training_step(transformer, scheduler, batch, generator=eval_generator(5, row, i, "cpu"),
                                              vae_scaling_factor=vae["scaling_factor"], invert_scale_latents=False,
                                              timesteps=torch.tensor([t]))
    assert figures["eval_loss"] == pytest.approx(by_hand.double().mean().item(), rel=1e-6)
    for i, t in enumerate(timesteps):
        assert figures[f"eval_loss_t{t}"] == pytest.approx(by_hand[:, i].double().mean().item(), rel=1e-6)


def test_a_run_logs_the_eval_loss_plots_it_and_names_and_keeps_the_best_step(train_store, tiny_models, tmp_path):
    run = tmp_path / "run"
    cogtrain(train_store, tiny_models["5b"], run, "--max-steps", "6", *EVAL, "--keep-best", "--checkpoint-every", "1",
             "--keep-checkpoints", "1", "--validate-every", "6", "--validation-inference-steps", "1", "--learning-rate", "1e-2")
    entries = logged(run)
    evaluated = {step: entry["eval_loss"] for step, entry in entries.items() if "eval_loss" in entry}
    assert sorted(evaluated) == [2, 4, 6]
    assert all(len([k for k in entries[s] if k.startswith("eval_loss_t")]) == 8 for s in evaluated)
    summary = json.loads((run / "summary.json").read_text())
    best = min(evaluated, key=evaluated.get)
    assert (summary["best_eval_step"], summary["best_eval_loss"]) == (best, evaluated[best])
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == sorted({f"step-{best:06d}", "step-000006"})  # the last, and the best whatever --keep says

    plot = Image.open(run / "plots" / "loss.png")
    assert plot.size == (960, 480)
    sheet = Image.open(run / "validation" / "step-000006.png")  # one validation prompt: one row of 4 frames
    assert sheet.size == (4 * 48, 32 + 16)
    card = (run / "README.md").read_text()
    assert "![loss](plots/loss.png)" in card and "![step-000006](validation/step-000006.png)" in card


def test_the_same_weights_give_the_same_eval_loss_resumed_or_not(train_store, tiny_models, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    cogtrain(train_store, tiny_models["5b"], whole, "--max-steps", "4", *EVAL, "--checkpoint-every", "2")
    cogtrain(train_store, tiny_models["5b"], resumed, "--max-steps", "2", *EVAL, "--checkpoint-every", "2")
    cogtrain(train_store, tiny_models["5b"], resumed, "--max-steps", "4", *EVAL, "--checkpoint-every", "2",
             "--resume", "latest")
    assert logged(whole)[4]["eval_loss"] == logged(resumed)[4]["eval_loss"]
    assert losses(whole) == losses(resumed)


@pytest.mark.slow
def test_the_same_weights_give_the_same_eval_loss_on_one_or_two_processes(train_store, tiny_models, tmp_path):
    """The weights barely move (lr 1e-30: the LoRA's zero-initialised B stays below float32's reach of the base
    weights), so one and two processes evaluate the same weights at step 1; each rank evaluates its share."""
    args = ("--max-steps", "1", "--eval-holdout", "3", "--eval-every", "1", "--learning-rate", "1e-30")
    one, two = tmp_path / "one", tmp_path / "two"
    with one_thread():  # as each launched rank runs
        cogtrain(train_store, tiny_models["5b"], one, *args)
    launch(cogtrain_command(train_store, tiny_models["5b"], two, *args, processes=2))
    assert logged(one)[1]["eval_loss"] == logged(two)[1]["eval_loss"]


def test_eval_options_that_cannot_work_are_refused(train_store, tiny_models, tmp_path):
    out = tmp_path / "run"
    result = cogtrain(train_store, tiny_models["5b"], out, "--max-steps", "1", "--eval-every", "2", expect=2)
    assert "--eval-every 2: needs --eval-holdout K" in result.stderr
    result = cogtrain(train_store, tiny_models["5b"], out, "--max-steps", "1", "--eval-holdout", "4", "--eval-every",
                      "1", expect=2)
    assert "--eval-holdout 4: the store has 4 samples" in result.stderr
    assert not out.exists()
