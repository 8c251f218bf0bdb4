"""The `data:` section of a jaxsd config: sources, validation, preprocessing, caching, loading.

Frozen dataclasses, the single source of truth; `jaxsd/config.py` embeds
`DataConfig` as the `data:` section and OmegaConf validates YAML and dotted
overrides against these types (e.g. `data.image.resolution=768`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxsd.errors import ConfigError


@dataclass(frozen=True)
class TFDSConfig:
    """A tensorflow-datasets dataset read through `tfds.data_source` (no TensorFlow import).

    name: TFDS name (e.g. "oxford_flowers102"); empty = no TFDS source.
    caption_key: a text feature used as the caption; empty = build the caption from
      `label_key` with `caption_template`, where `{label}` is the class name.
    cache_dir: where the cache sidecars + manifest of this source are written
      (a TFDS dataset has no folder of its own to put them in).
    """

    name: str = ""
    split: str = "train"
    data_dir: str = ""
    image_key: str = "image"
    caption_key: str = ""
    label_key: str = "label"
    caption_template: str = "a photo of a {label}"
    cache_dir: str = "tfds_cache"


@dataclass(frozen=True)
class ValidationConfig:
    """What the validation pass does with odd inputs. Every skip/alteration is reported.

    too_small: "skip" or "upscale" images smaller than their target (resolution or bucket).
    missing_caption: "skip" the image, or train it with an "empty" caption.
    background: RGB colour that transparent images (LA/RGBA/palette+alpha) are composited on.
    report: path of the written report (JSON). Empty = `jaxsd_validation.json` in the first
      root (or the TFDS cache directory).
    """

    too_small: str = "skip"
    missing_caption: str = "skip"
    background: tuple[int, int, int] = (255, 255, 255)
    report: str = ""


@dataclass(frozen=True)
class BucketConfig:
    """Aspect-ratio buckets of about `resolution**2` pixels, sides multiples of `step`.

    enabled=False: every image is resized + cropped to resolution x resolution.
    """

    enabled: bool = False
    min_side: int = 256
    max_side: int = 1024
    step: int = 64
    max_aspect: float = 4.0


@dataclass(frozen=True)
class ImageConfig:
    """Preprocessing before the VAE.

    crop: "center" or "random" (a random crop is drawn once at cache time, seeded by `seed`).
    random_flip: also cache the horizontally flipped image; the loader picks one of the
      two per sample per epoch (flipping latents instead of pixels is not exact).
    """

    resolution: int = 512
    crop: str = "center"
    random_flip: bool = False
    buckets: BucketConfig = field(default_factory=BucketConfig)
    seed: int = 0


@dataclass(frozen=True)
class CacheConfig:
    """`jaxsd cache`: how latents and text embeddings are produced and stored.

    vae: diffusers VAE folder, or a pipeline folder with a `vae/` subfolder. The trainer
      checks cached latents against this (fingerprint, scaling/shift factor).
    text_encoder: pipeline folder with `text_encoder/` + `tokenizer/` (and `text_encoder_2/` +
      `tokenizer_2/` for SDXL, `text_projection/` for a projected T5), or a single component folder,
      or an SD1/SD2/SDXL single-file .safetensors checkpoint (read in place; its tokenizers are the
      project's copies of the standard CLIP ones).
    text: which conditioning: "clip" (SD1/SD2), "sdxl" (two CLIPs + pooled), "t5" (raw T5
      hidden states), "t5_projected" (T5 through the hybrid's projection); or "tokens", short for
      `text_mode: tokens` with the family read from the `text_encoder` folder's layout
      (text_encoder_2/ → sdxl, text_projection/ → t5_projected, a T5 encoder → t5, else clip).
    text_mode: what is cached per caption: "embeddings" (the text encoders' output; training reads
      it) or "tokens" (each tokenizer's input_ids + attention_mask, int32; training runs the text
      encoders itself — needed for text-encoder LoRA or fine-tuning). A tokens cache records only
      the tokenizers' fingerprints: any encoder weights that share those tokenizers may use it.
    max_length: tokens per caption; 0 = the encoder's default (77 for CLIP).
    variant: weights variant of both folders (e.g. "fp16"); empty = the default weights.
    latents: "distribution" stores the VAE posterior mean + logvar (training draws fresh
      latent noise every epoch), "sample" stores one scaled latent sample.
    dtype: storage dtype of cached arrays, "float32", "bfloat16" or "float16".
    compute_dtype: dtype the encoders load and run in, "float32" or "bfloat16" (a T5-XXL
      needs bf16 to fit an accelerator; a VAE with force_upcast still computes fp16 in fp32).
    latent_suffix / text_suffix: sidecar suffixes; empty = named after the producer
      (".sd_vae", ".sdxl_vae", ".clip_l", ".sdxl_te", ".t5xxl", ...).
    caption_blocklist: captions containing any of these words (case-insensitive) are dropped.
    caption_regex: captions matching this regular expression are dropped.
    image_check: optional "package.module:function" called as f(PIL.Image, caption) -> reason
      or None; a returned reason drops the image (counted in the report).
    """

    vae: str = ""
    text_encoder: str = ""
    text: str = "clip"
    text_mode: str = "embeddings"
    max_length: int = 0
    variant: str = ""
    latents: str = "distribution"
    dtype: str = "bfloat16"
    compute_dtype: str = "float32"
    batch_size: int = 8
    latent_suffix: str = ""
    text_suffix: str = ""
    caption_blocklist: tuple[str, ...] = ()
    caption_regex: str = ""
    image_check: str = ""
    seed: int = 0

    @property
    def tokens(self) -> bool:
        """True when captions are cached as token ids (`text_mode: tokens`, or `text: tokens`)."""
        return self.text_mode == "tokens" or self.text == "tokens"


@dataclass(frozen=True)
class LoaderConfig:
    """The grain loader over cached data.

    batch_size: GLOBAL batch size (split evenly over processes; divisible by their count).
    threads / prefetch: grain read threads and how many batches are prepared ahead.
    """

    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    threads: int = 4
    prefetch: int = 4


@dataclass(frozen=True)
class CaptionsConfig:
    """Captions changed each time a sample is drawn (`jaxsd.data.captions`); needs a token-id cache
    (`data.cache.text: tokens`): the loader tokenizes the changed caption, the step encodes it.

    Tags are the caption's comma-separated parts. trigger: put first as a tag of its own when the
    caption lacks it as a word (e.g. "sks"). keep_tokens: the first N tags never move or drop (with a
    trigger at least the first one, so the identifier stays first). tag_dropout: drop each other tag
    with this probability. shuffle: shuffle the other tags. Instance images only: prior subsets
    (DreamBooth's class images) keep their class prompt as cached. Every draw is a function of
    (data.loader.seed, batch number, sample), so a resumed run sees the same captions.
    caption_dropout: not set here — the caption dropout is `loss.cond_dropout` (one name, for cached
      embeddings and token ids alike); any other value is refused with that pointer.
    """

    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    trigger: str = ""
    caption_dropout: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.tag_dropout > 0 or bool(self.trigger)


@dataclass(frozen=True)
class SubsetConfig:
    """One group of image folders trained together with its own repeats, captions and loss weight.

    roots: image folders of this subset (each folder belongs to one subset only).
    repeats: how many times an epoch sees each of its images (>= 1).
    caption: a fixed caption for every image (DreamBooth's instance prompt; no .txt files needed);
      None = each image's `.txt` / `.caption` file.
    caption_prefix: put before every caption (fixed or from files), e.g. "sks style, ".
    kind: "instance" or "prior" (class images of prior preservation; YAML may spell the key
      `class`, as the issue does). With any prior subset every batch is half instance, half prior.
    loss_weight: each sample's loss is multiplied by it (a prior subset's weight is the
      prior-preservation weight).
    """

    roots: tuple[str, ...] = ()
    repeats: int = 1
    caption: str | None = None
    caption_prefix: str = ""
    kind: str = "instance"
    loss_weight: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they become training batches.

    roots: image folders (`foo.jpg` + `foo.txt` / `foo.caption`), searched recursively.
    packed: directories of ArrayRecord shards written by `jaxsd cache --pack`; when set,
      the loader reads these instead of the sidecar files of `roots`.
    subsets: several groups of folders, each with repeats, a fixed caption and a loss weight
      (`jaxsd.data.subsets`); `roots` is the shorthand for one subset with the defaults.
    captions: tag shuffling / dropout and a trigger word, applied per draw (token-id caches only).
    """

    roots: tuple[str, ...] = ()
    subsets: list[SubsetConfig] = field(default_factory=list)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    tfds: TFDSConfig = field(default_factory=TFDSConfig)
    packed: tuple[str, ...] = ()
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)


@dataclass(frozen=True)
class DreamBoothConfig:
    """DreamBooth prior preservation: class images made by the base model, trained beside the instance images.

    class_prompt: the class's prompt ("a photo of a dog"); empty = no prior preservation.
    class_dir: where the class images (`00000.png` + `00000.txt` holding the class prompt) are
      generated and cached; it becomes a `kind: prior` subset with `prior_loss_weight` as its weight.
    num_class_images: how many class images to have (only the missing ones are generated).
    prior_loss_weight: loss = instance loss + prior_loss_weight x class loss.
    model: the base pipeline folder that generates them; empty = model.pretrained.
    steps / guidance_scale / sampler / negative_prompt / seed / batch_size / resolution: the sampling
      settings (sampler empty = dpmpp_2m; resolution 0 = data.image.resolution). Image i
      is drawn from seed + i, so an interrupted generation resumes with the same images.
    """

    class_prompt: str = ""
    class_dir: str = ""
    num_class_images: int = 200
    prior_loss_weight: float = 1.0
    model: str = ""
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = ""
    negative_prompt: str = ""
    seed: int = 0
    batch_size: int = 4
    resolution: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.class_prompt)


def spell_subset_kind(data_section) -> None:
    """Accept the issue's `class: prior|instance` in YAML subsets (`class` cannot be a field name): → `kind`."""
    subsets = data_section.get("subsets") if hasattr(data_section, "get") else None
    if not subsets or not hasattr(subsets, "__iter__"):
        return
    for entry in subsets:
        if hasattr(entry, "keys") and "class" in entry:
            if "kind" in entry:
                from jaxsd.errors import ConfigError
                raise ConfigError("data.subsets: an entry sets both `class` and `kind`; they are the same key")
            entry["kind"] = entry["class"]
            del entry["class"]


def check_data_config(cfg: DataConfig) -> None:
    """Reject values the type system cannot (enums, ranges) with the key and the allowed values."""
    choices = {
        "data.validation.too_small": (cfg.validation.too_small, ("skip", "upscale")),
        "data.validation.missing_caption": (cfg.validation.missing_caption, ("skip", "empty")),
        "data.image.crop": (cfg.image.crop, ("center", "random")),
        "data.cache.latents": (cfg.cache.latents, ("distribution", "sample")),
        "data.cache.dtype": (cfg.cache.dtype, ("float32", "bfloat16", "float16")),
        "data.cache.text": (cfg.cache.text, ("clip", "sdxl", "t5", "t5_projected", "tokens")),
        "data.cache.text_mode": (cfg.cache.text_mode, ("embeddings", "tokens")),
        "data.cache.compute_dtype": (cfg.cache.compute_dtype, ("float32", "bfloat16")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    b = cfg.image.buckets
    if cfg.image.resolution <= 0 or cfg.image.resolution % 8:
        raise ConfigError(f"data.image.resolution={cfg.image.resolution} must be a positive multiple of 8")
    if b.enabled and not (0 < b.min_side <= cfg.image.resolution <= b.max_side and b.step > 0):
        raise ConfigError(f"data.image.buckets: need 0 < min_side ({b.min_side}) <= resolution "
                          f"({cfg.image.resolution}) <= max_side ({b.max_side}) and step > 0")
    bg = cfg.validation.background
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
        raise ConfigError(f"data.validation.background={cfg.validation.background} must be three 0..255 values")
    if cfg.loader.batch_size <= 0 or cfg.cache.batch_size <= 0:
        raise ConfigError("data.loader.batch_size and data.cache.batch_size must be positive")
    from jaxsd.data.subsets import check_subsets

    check_subsets(cfg)
    c = cfg.captions
    if c.caption_dropout:
        raise ConfigError(f"data.captions.caption_dropout={c.caption_dropout}: the caption dropout has one name, "
                          "loss.cond_dropout (it drops whole captions for cached embeddings and token ids alike); "
                          "set that instead")
    if c.keep_tokens < 0 or not 0 <= c.tag_dropout < 1:
        raise ConfigError(f"data.captions: keep_tokens={c.keep_tokens} must be >= 0 and tag_dropout={c.tag_dropout} "
                          "in [0, 1)")
    if c.active and not cfg.cache.tokens:
        raise ConfigError("data.captions (shuffle, tag_dropout, trigger) change the caption at every draw, so the "
                          "text must be encoded in the train step: set data.cache.text=tokens and re-run "
                          "`jaxsd cache CONFIG --only text`")


@dataclass(frozen=True)
class _CacheView:
    """The sections `jaxsd cache` reads: data, and dreambooth for its class images' subset."""

    data: DataConfig = field(default_factory=DataConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)


def load_data_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DataConfig:
    """The `data:` section of a jaxsd YAML config (+ `data.key=value` overrides), validated; with
    `dreambooth.class_prompt` set, its class folder is added as a prior subset (`with_class_subset`).

    Other sections and overrides of other sections are the trainer's business and are
    ignored here, so `jaxsd cache` and `jaxsd train` accept the same command line.
    Unknown keys or wrong types raise ConfigError naming the key (and the closest valid one).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from jaxsd.data.subsets import with_class_subset

    base = OmegaConf.structured(_CacheView)
    sections = tuple(f.name for f in _CacheView.__dataclass_fields__.values())
    try:
        layers = []
        if path:
            loaded = OmegaConf.load(path)
            picked = {name: loaded.get(name) for name in sections if hasattr(loaded, "get")}
            picked = {k: v for k, v in picked.items() if v is not None}
            if picked:
                layer = OmegaConf.create(picked)
                if "data" in picked:
                    spell_subset_kind(layer.data)
                layers.append(layer)
        mine = [o for o in overrides if o.split("=", 1)[0].startswith(tuple(f"{s}." for s in sections))]
        if mine:
            layers.append(OmegaConf.from_dotlist(mine))
        view = OmegaConf.to_object(OmegaConf.merge(base, *layers))
    except OmegaConfBaseException as e:
        key = e.full_key if getattr(e, "full_key", None) else "data"
        first = str(e).splitlines()[0]
        raise ConfigError(f"{path or 'overrides'}: {key}: {first} (the keys and their meaning are in "
                          "jaxsd/data/config.py)") from None
    check_data_config(view.data)
    return with_class_subset(view.data, view.dreambooth)

