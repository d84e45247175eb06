"""cogtrain's start-up checks: every refusal a run can meet, each a one-line `CogtuneError` raised before
anything is written in the run folder (another model's store, a stale dataset, a size the model cannot train at,
a missing optional package, a LoRA target that names no module, a run folder already in use)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from ..preprocess.plan import plan_against_store
from ..shared import store as S
from ..shared.errors import CogtuneError
from ..shared.models import Model, is_hub_id, open_model
from ..shared.provenance import software_versions
from .checkpoints import find_resume_checkpoint
from .config import DEFAULT_TARGET_MODULES, TrainConfig
from .math import RELEASE_IMAGE_DROPOUT

TRAIN_COMPONENTS = ("transformer", "scheduler", "vae")
"""What the trainer opens: no text encoder (embeddings are cached); the VAE for its config and validation."""

OPTIONAL_PACKAGES = {
    ("optimizer", "adamw8bit"): ("bitsandbytes", "bnb"),
    ("optimizer", "prodigy"): ("prodigyopt", "prodigy"),
    ("report_to", "wandb"): ("wandb", "wandb"),
}
"""(option, value) -> (module it needs, cogtune extra that installs it)."""


@dataclass
class RunInputs:
    """What the start-up checks found: the store's manifest, the model, and the checkpoint to resume from."""

    manifest: S.Manifest
    model: Model
    resume_from: Path | None


def check_run(config: TrainConfig) -> RunInputs:
    """Every refusal a run can meet before training; returns what the run needs."""
    config.validate()
    check_optional_packages(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise CogtuneError("--device cuda: no CUDA device is visible")
    manifest = S.Manifest.load(config.store)
    model = open_model(config.model, TRAIN_COMPONENTS)
    check_model_matches_store(model, manifest, config.store)
    check_native_size(model, manifest, config.store)
    check_target_modules(config, model)
    resolve_image_dropout(config, model)
    note_other_diffusers(manifest, config.store)
    if not config.allow_stale:
        check_dataset_current(config, manifest)
    if config.validate_every:
        from .validation import check_validation_inputs

        check_validation_inputs(model, config.store)
    return RunInputs(manifest=manifest, model=model, resume_from=find_resume_checkpoint(config))


def note_other_diffusers(manifest: S.Manifest, store: Path) -> None:
    """Say, in one line, when the store was encoded under another diffusers: its VAE and T5 code made the cached
    tensors, and a change there (a fixed tiling seam, a new default) is invisible in the weights' fingerprints."""
    encoded = manifest.software.get("diffusers")
    running = software_versions()["diffusers"]
    if encoded and encoded != running and os.environ.get("RANK", "0") == "0":
        print(f"cogtrain: note: {store} was encoded under diffusers {encoded}, this run has {running}; if the VAE's "
              f"code changed between them, cogprep encode --out NEW_STORE makes the latents anew", file=sys.stderr)


def resolve_image_dropout(config: TrainConfig, model: Model) -> None:
    """--image-dropout: the release's 0.05 by default for an image-to-video model (config.yaml records the value
    used); refused for a text-to-video one, which has no image condition to drop."""
    if model.variant.task == "i2v":
        if config.image_dropout is None:
            config.image_dropout = RELEASE_IMAGE_DROPOUT
    elif config.image_dropout:
        raise CogtuneError(f"--image-dropout {config.image_dropout}: {model.variant.name} is a text-to-video model, "
                           f"it has no image condition to drop")
    else:
        config.image_dropout = 0.0


def check_optional_packages(config: TrainConfig) -> None:
    for (option, value), (module, extra) in OPTIONAL_PACKAGES.items():
        if getattr(config, option) == value and find_spec(module) is None:
            flag = option.replace("_", "-")
            raise CogtuneError(f"--{flag} {value} needs the {module} package: pip install 'cogtune[{extra}]'")


def check_model_matches_store(model: Model, manifest: S.Manifest, store: Path) -> None:
    """The cached latents and embeddings are only valid for the VAE and T5 they were made with.

    Compares the variant, then the VAE and text-encoder configs, then their weights by `Model.weights_identity`
    (a few MB read per component, where cogprep's full fingerprint would read all 9.5 GB of T5). The transformer
    is not compared: training on top of a merged or fine-tuned checkpoint is legitimate.
    """
    recorded = manifest.model
    if recorded.get("variant") != model.variant.name:
        what = f"variant {recorded.get('variant')}, this model is {model.variant.name}"
    else:
        what = differing_vae_or_text_encoder(model, recorded)
        if what is None:
            return
    raise CogtuneError(
        f"{store}: store made with another model ({recorded.get('source')}: {what}): train with that model, "
        f"or re-encode with cogprep encode --model {model.source}"
    )


def differing_vae_or_text_encoder(model: Model, recorded: dict) -> str | None:
    """How the model's VAE or T5 differs from the store's record (`Manifest.model`): configs, then weights."""
    configs = model.config_fingerprint(("vae", "text_encoder"))
    differing = [name for name, digest in configs.items() if recorded.get("configs", {}).get(name) != digest]
    if differing:
        return f"its {' and '.join(name.replace('_', ' ') for name in differing)} config differs"
    weights = recorded.get("weights_identity")
    if weights is None:
        return None  # a store encoded before cogprep recorded weights: its configs are all there is to compare
    # A hub id was fetched with TRAIN_COMPONENTS alone: T5's weights are not downloaded (9.5 GB) to be checked.
    # A local folder without them (trimmed to what training needs) has its T5 left unchecked by weights_identity.
    components = ("vae",) if is_hub_id(model.source) else ("vae", "text_encoder")
    differing = [name for name, identity in model.weights_identity(components).items()
                 if weights.get(name, identity) != identity]
    if differing:
        return f"its {' and '.join(name.replace('_', ' ') for name in differing)} weights differ"
    return None


def check_native_size(model: Model, manifest: S.Manifest, store: Path) -> None:
    """Every bucket of the store, image buckets included, at a size the model trains at (`Model.check_size`),
    as cogprep checks them."""
    for bucket in manifest.buckets:
        model.check_size(bucket["frames"], bucket["height"], bucket["width"], f"{store}: bucket")


def check_target_modules(config: TrainConfig, model: Model) -> None:
    """Every --target-modules name must name a module of the transformer. peft refuses only a list of which no
    name matches; a typo beside good names would train fewer layers than asked, without a word."""
    if config.mode != "lora":
        return
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):  # the module names only: nothing allocated, no weights read
        transformer = CogVideoXTransformer3DModel.from_config(model.config("transformer"))
    names = [name for name, _ in transformer.named_modules()]
    # peft's rule for a list of names: the whole module name, or its last dotted parts
    missing = [t for t in config.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise CogtuneError(
            f"--target-modules {','.join(missing)}: no module of the transformer is called that "
            f"(the attention projections are {','.join(DEFAULT_TARGET_MODULES)})"
        )


def check_dataset_current(config: TrainConfig, manifest: S.Manifest) -> None:
    """Refuse to train on a store whose dataset has new, changed or removed clips since it was encoded."""
    dataset = config.dataset or manifest.dataset.get("path")
    if dataset is None:
        return  # a store that records no dataset (built by hand) has nothing to be checked against
    try:
        changes = plan_against_store(Path(dataset), config.store).changes
    except CogtuneError as e:
        raise CogtuneError(f"cannot check the store against its dataset ({e}): pass --dataset, or --allow-stale") from None
    counts = {kind: len(changes.get(kind, [])) for kind in ("new", "changed", "removed")}
    if any(counts.values()):
        raise CogtuneError(
            f"dataset changed since the store was encoded ({counts['new']} new, {counts['changed']} changed, "
            f"{counts['removed']} removed): run cogprep encode, or pass --allow-stale"
        )
