"""Open a CogVideoX model (local folder or hub id) and load only the parts a stage needs.

cogprep loads the VAE, the T5 encoder and the tokenizer; cogtrain loads the transformer and the scheduler,
and the VAE only to decode validation videos. A hub id is resolved to a local snapshot that holds only the
requested subfolders, so the trainer never downloads the 10 GB text encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .buckets import SIZE_MULTIPLE, is_valid_frame_count
from .errors import CogtuneError
from .fingerprint import FileHashes, folder_fingerprint, hash_json, weights_identity
from .variants import Variant, detect_variant

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
NATIVE_SIZE_KEY = "_cogtune_native_size"
"""Transformer config key: [frames, height, width] in pixels a model was trained at, for a model whose configs do not
say it otherwise (a 1.5 model's sample size is its RoPE grid's maximum). cogtune's tiny models record theirs there;
diffusers ignores keys that start with an underscore and keeps them through from_pretrained and save_pretrained."""

if TYPE_CHECKING:  # imported lazily: `cogprep status` and no-op encodes never load torch
    import torch

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    try:
        return getattr(torch, DTYPES[name.lower()])
    except KeyError:
        raise CogtuneError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


@dataclass
class Model:
    """A CogVideoX model folder in the diffusers layout, with its variant detected from its configs."""

    path: Path
    """Local folder (for a hub id: the snapshot holding the subfolders asked for)."""
    source: str
    """What the user passed: a folder path or a hub id."""
    _configs: dict[str, Any] = field(default_factory=dict, repr=False)

    def config(self, component: str) -> dict[str, Any]:
        """The component's config.json (scheduler: scheduler_config.json), read once."""
        if component not in self._configs:
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            self._configs[component] = _read_json(self.path / component / name)
        return self._configs[component]

    @cached_property
    def index(self) -> dict[str, Any]:
        return _read_json(self.path / "model_index.json")

    @cached_property
    def variant(self) -> Variant:
        vae = self.config("vae") if (self.path / "vae" / "config.json").exists() else None
        return detect_variant(
            self.config("transformer"), vae, self.index.get("_class_name"), where=str(self.source)
        )

    def native_size(self) -> tuple[int, int, int]:
        """(frames, height, width) in pixels the model was trained at, cogprep's default bucket, from its transformer
        config: `NATIVE_SIZE_KEY` where it records one (cogtune's tiny 1.5 models: 9x48x80), else sample_* (in
        latents) for 1.0, as the diffusers pipelines' default height and width read it (the releases: 49x480x720),
        else the release table for 1.5, whose sample size is the RoPE grid's maximum, not a training size
        (81x768x1360)."""
        v = self.variant
        tc = self.config("transformer")
        if NATIVE_SIZE_KEY in tc:
            return self._recorded_native_size(tc[NATIVE_SIZE_KEY])
        if v.generation == "1.5":
            return v.native_frames, v.native_height, v.native_width
        return tc.get("sample_frames", v.native_frames), tc["sample_height"] * 8, tc["sample_width"] * 8

    def _recorded_native_size(self, value: Any) -> tuple[int, int, int]:
        ok = isinstance(value, list) and len(value) == 3 and all(type(n) is int and n > 0 for n in value)
        if not ok or not is_valid_frame_count(value[0]) or value[1] % SIZE_MULTIPLE or value[2] % SIZE_MULTIPLE:
            raise CogtuneError(
                f"{self.path / 'transformer' / 'config.json'}: {NATIVE_SIZE_KEY} {value!r} is not [frames, height, "
                f"width] with frames 8N+1 and height and width multiples of {SIZE_MULTIPLE}"
            )
        return value[0], value[1], value[2]

    def check_size(self, frames: int, height: int, width: int, what: str) -> None:
        """Refuse a video size the model cannot train or generate at, naming it after `what` (``STORE: bucket``).

        Only a learned-positional-embedding model (5b-I2V) has such sizes: its table exists for the native frames
        x height x width alone. diffusers' ``CogVideoXPatchEmbed.forward`` raises for another height or width,
        and for another frame count (a 1-frame image too) silently adds a sin-cos table in its place, so a LoRA
        trained there would learn under positions that inference at the native size never uses.
        """
        native = self.native_size()
        if not self.variant.fixed_size or (frames, height, width) == native:
            return
        size = "x".join(map(str, native))
        raise CogtuneError(
            f"{what} {frames}x{height}x{width}: {self.variant.name} has learned positional embeddings that exist "
            f"only at its native {size}; encode and train at that size (--resolution {size})"
        )

    # ---- loaders: each loads one component, in the dtype asked for ----
    # With a `device`, the loaders' own device_map puts each tensor there as it is read (diffusers and transformers
    # build the module on the meta device first): no copy of the whole component in host memory on the way, which
    # loading to the CPU and then moving it makes whenever the file's dtype is not the one asked for (8 cogprep ranks
    # each holding T5-XXL's 9.5 GB; figures in scripts/bench_host_memory.py).
    def load_vae(self, dtype: torch.dtype | str = "float32", device: torch.device | str | None = None):
        from diffusers import AutoencoderKLCogVideoX

        return AutoencoderKLCogVideoX.from_pretrained(
            self.path, subfolder="vae", torch_dtype=parse_dtype(dtype), **_device_map(device)
        ).eval()

    def load_text_encoder(self, dtype: torch.dtype | str = "float32", device: torch.device | str | None = None):
        from transformers import T5EncoderModel

        # use_kernels=False: transformers 5.25 swaps layers for kernels fetched from the Hub by default (a network
        # call, refused on the meta device); the embeddings cached are those of T5's own code, on any version
        return T5EncoderModel.from_pretrained(
            self.path, subfolder="text_encoder", dtype=parse_dtype(dtype), use_kernels=False, **_device_map(device)
        ).eval()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, subfolder="tokenizer")

    def load_transformer(self, dtype: torch.dtype | str = "float32"):
        from diffusers import CogVideoXTransformer3DModel

        return CogVideoXTransformer3DModel.from_pretrained(self.path, subfolder="transformer", torch_dtype=parse_dtype(dtype))

    def load_scheduler(self):
        import diffusers

        cls_name = self.config("scheduler").get("_class_name", self.variant.scheduler_class)
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise CogtuneError(f"{self.path / 'scheduler'}: unknown scheduler class {cls_name!r}")
        return cls.from_pretrained(self.path, subfolder="scheduler")

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.variant.pipeline_class)

    # ---- fingerprints ----
    def fingerprint(self, components: tuple[str, ...], hashes: FileHashes) -> dict[str, str]:
        """Content hash of each component folder (configs and weights)."""
        return {c: folder_fingerprint(self.path / c, hashes) for c in components}

    def config_fingerprint(self, components: tuple[str, ...]) -> dict[str, str]:
        """Hash of each component's config only: cheap, for checks that must not read the weights."""
        return {c: hash_json(self.config(c)) for c in components}

    def weights_identity(self, components: tuple[str, ...]) -> dict[str, str]:
        """`weights_identity` of each component whose folder holds weight files (a few MB read per component):
        what cogprep records and cogtrain compares, where the full `fingerprint` would read every byte."""
        found = {c: weights_identity(self.path / c) for c in components if (self.path / c).is_dir()}
        return {c: identity for c, identity in found.items() if identity is not None}


def _device_map(device: torch.device | str | None) -> dict[str, Any]:
    """from_pretrained's keyword for loading straight onto `device`; none for None (the CPU, as loaded)."""
    if device is None:
        return {}
    import torch

    return {"device_map": {"": torch.device(device)}}


def open_model(source: str | Path, components: tuple[str, ...] = COMPONENTS) -> Model:
    """Open a model from a local folder, or from a hub id (downloading only `components` and their configs)."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise CogtuneError(f"{path}: not a diffusers model folder (no model_index.json)")
        for c in components:
            if not (path / c).is_dir():
                raise CogtuneError(f"{path}: missing the {c}/ folder")
        return Model(path=path.resolve(), source=str(source))
    if not is_hub_id(source):
        raise CogtuneError(f"{source}: no such model folder (and not a hub id of the form owner/name)")
    return Model(path=_download(str(source), components), source=str(source))


def is_hub_id(source: str | Path) -> bool:
    """Whether `open_model` takes `source` for a hub id: owner/name, and no local path of that name."""
    text = str(source)
    return not Path(text).expanduser().exists() and not text.startswith((".", "/", "~")) and text.count("/") == 1


def _download(repo_id: str, components: tuple[str, ...]) -> Path:
    from huggingface_hub import snapshot_download

    # configs of every component: variant detection and the store's model check read them without the weights
    patterns = ["model_index.json", *(f"{c}/*config.json" for c in COMPONENTS), *(f"{c}/*" for c in components)]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many types; the user needs one line
        raise CogtuneError(f"{repo_id}: could not fetch from the hub ({type(e).__name__}: {e})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CogtuneError(f"{path}: missing") from None
    except ValueError as e:
        raise CogtuneError(f"{path}: not valid JSON ({e})") from None
