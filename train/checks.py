"""cogtrain's start-up checks: every refusal a run can meet, each a one-line `CogtuneError` raised before
anything is written in the run folder (another model's store, a stale dataset, a size the model cannot train at,
a missing optional package, a LoRA target that names no module, a run folder already in use)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from ..preprocess.staleness import dataset_changes
from ..shared import store as S
from ..shared.errors import CogtuneError
from ..shared.models import Model, is_hub_id, open_model
from ..shared.provenance import software_versions
from .checkpoints import find_resume_checkpoint
from .config import DEFAULT_TARGET_MODULES, TrainConfig
from .math import RELEASE_IMAGE_DROPOUT

log = logging.getLogger(__name__)

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
    staleness: StalenessCheck | None = None
    """The dataset check under way on rank 0 (None on other ranks and with --allow-stale): see
    `confirm_dataset_current`."""


def check_run(config: TrainConfig) -> RunInputs:
    """Every refusal a run can meet before training; returns what the run needs. The dataset check is only
    started here (rank 0, on a thread): `confirm_dataset_current` refuses a stale dataset on every rank."""
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
    if config.validate_every:
        from .validation import check_validation_inputs

        check_validation_inputs(model, config.store)
    resume_from = find_resume_checkpoint(config)
    # once per job, not once per rank: every rank would stat every clip of the dataset (see StalenessCheck)
    main = int(os.environ.get("RANK", "0")) == 0
    staleness = StalenessCheck(config, manifest) if main and not config.allow_stale else None
    return RunInputs(manifest=manifest, model=model, resume_from=resume_from, staleness=staleness)


def check_run_paths(config: TrainConfig) -> None:
    """A file where a folder is wanted, and a cogprep store given as the run folder: one line each, before
    anything (the run lock included) is written."""
    for option, path, wanted in (("--store", config.store, "the store folder cogprep encode wrote"),
                                 ("--dataset", config.dataset, "the dataset folder"),
                                 ("--model", Path(config.model).expanduser(), "the model folder (or a hub id)")):
        if path is not None and path.is_file():
            # a file of the folder wanted (STORE/store.json, MODEL/model_index.json): name the folder
            inside = path.name in (S.STORE_JSON, S.INDEX, "model_index.json")
            raise CogtuneError(f"{path}: a file; {option} wants {wanted}" + (f": {path.parent}" if inside else ""))
    if config.out.exists() and not config.out.is_dir():
        raise CogtuneError(f"{config.out}: a file; --out wants the run folder (made if missing)")
    if (config.out / S.STORE_JSON).exists() or (config.out / S.INDEX).exists():
        raise CogtuneError(f"{config.out}: a cogprep store; --out wants a run folder of its own (e.g. "
                           f"{config.out.parent / 'run'}), the store goes to --store")


def note_other_diffusers(manifest: S.Manifest, store: Path) -> None:
    """Say, in one line, when the store was encoded under another diffusers: its VAE and T5 code made the cached
    tensors, and a change there (a fixed tiling seam, a new default) is invisible in the weights' fingerprints."""
    encoded = manifest.software.get("diffusers")
    running = software_versions()["diffusers"]
    if encoded and encoded != running:
        log.warning("%s was encoded under diffusers %s, this run has %s; if the VAE's code changed between "
                    "them, cogprep encode --out NEW_STORE makes the latents anew", store, encoded, running)


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


class StalenessCheck:
    """Whether the dataset changed since the store was encoded, found on a thread of rank 0 while the model
    loads and the loader is built: a million-clip dataset costs a stat per clip, which then delays no step.

    `problem` waits for the answer: the refusal's one line, or None where the store is current."""

    def __init__(self, config: TrainConfig, manifest: S.Manifest):
        self._problem: str | None = None
        self._error: BaseException | None = None
        dataset = config.dataset or manifest.dataset.get("path")
        # a store that records no dataset (built by hand) has nothing to be checked against
        self._thread = threading.Thread(target=self._run, args=(dataset, config.store), daemon=True,
                                        name="cogtrain-staleness") if dataset is not None else None
        if self._thread is not None:
            self._thread.start()

    def _run(self, dataset: str | Path, store: Path) -> None:
        try:
            self._problem = dataset_change_problem(Path(dataset), store)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread by `problem`
            self._error = error

    def problem(self) -> str | None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._problem


def dataset_change_problem(dataset: Path, store: Path) -> str | None:
    """Why a run must not train on `store` (its dataset has new, changed or removed clips), or None."""
    try:
        counts = dataset_changes(dataset, store)
    except CogtuneError as e:
        return f"cannot check the store against its dataset ({e}): pass --dataset, or --allow-stale"
    if any(counts[kind] for kind in ("new", "changed", "removed")):
        return (f"dataset changed since the store was encoded ({counts['new']} new, {counts['changed']} changed, "
                f"{counts['removed']} removed): run cogprep encode, or pass --allow-stale")
    return None


def confirm_dataset_current(staleness: StalenessCheck | None, accelerator) -> None:
    """Refuse a stale dataset on every rank, from rank 0's check: call it on all ranks before anything is
    written in the run folder."""
    problem = [staleness.problem() if staleness is not None else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem, from_process=0)
    if problem[0] is not None:
        raise CogtuneError(problem[0])
