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

from .errors import CogtuneError
from .fingerprint import FileHashes, folder_fingerprint, hash_json, weights_identity
from .variants import Variant, detect_variant

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

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
        """(frames, height, width) in pixels the model was trained at: its transformer config for 1.0 (sample_*
        in latents), the release table for 1.5 (whose sample size is the RoPE grid's maximum, not a training
        size). Tiny test models have their own native size; the release's come out as 49x480x720."""
        v = self.variant
        if v.generation == "1.5":
            return v.native_frames, v.native_height, v.native_width
        tc = self.config("transformer")
        return tc.get("sample_frames", v.native_frames), tc["sample_height"] * 8, tc["sample_width"] * 8

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
    def load_vae(self, dtype: torch.dtype | str = "float32"):
        from diffusers import AutoencoderKLCogVideoX

        return AutoencoderKLCogVideoX.from_pretrained(self.path, subfolder="vae", torch_dtype=parse_dtype(dtype)).eval()

    def load_text_encoder(self, dtype: torch.dtype | str = "float32"):
        from transformers import T5EncoderModel

        return T5EncoderModel.from_pretrained(self.path, subfolder="text_encoder", dtype=parse_dtype(dtype)).eval()

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
