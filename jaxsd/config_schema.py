"""The typed schema of `jaxsd train`'s configuration: frozen dataclasses, one per YAML section.

These dataclasses are the single source of truth; `configs/*.yaml` are presets that set some of their
fields. Loading (YAML + overrides, `jaxsd/config_loader.py`) and the checks of values and combinations
beyond their types (`jaxsd/config_checks.py`) live beside them; `jaxsd.config` is the public import path
of all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from jaxsd.config_losses import LPIPSLossConfig, PerceptualLossConfig, StyleLossConfig
from jaxsd.config_vae import VAELossConfig
from jaxsd.data.config import DataConfig, DreamBoothConfig
from jaxsd.models.token_merging_settings import TokenMerging


@dataclass(frozen=True)
class ModelConfig:
    """The model being trained (the UNet, or with `kind: vae` the autoencoder) and how it computes."""

    kind: str = "unet"
    """unet: the denoising UNet (latents from `jaxsd cache`); vae: the AutoencoderKL on images
    (docs/vae-training.md; its loss is `loss.vae`)."""
    pretrained: str | None = None
    """diffusers folder to initialise from: a pipeline root (with `unet/`) or a UNet folder itself.
    None = from scratch with the architecture in `unet`."""
    variant: str | None = None
    """weights variant of `pretrained` (e.g. "fp16" → diffusion_pytorch_model.fp16.safetensors)."""
    unet: dict[str, Any] = field(default_factory=dict)
    """diffusers UNet2DConditionModel config.json fields (architecture for from-scratch training;
    ignored when `pretrained` is set, whose config.json wins)."""
    vae: dict[str, Any] = field(default_factory=dict)
    """kind vae: diffusers AutoencoderKL config.json fields (architecture for from-scratch training;
    ignored when `pretrained` is set: a VAE folder or a pipeline folder with vae/)."""
    dtype: str = "float32"
    """compute dtype of activations: float32 | bfloat16 | float16. Master params stay in param_dtype."""
    param_dtype: str = "float32"
    """dtype of the trained (master) params and optimizer moments."""
    attention_impl: str = "auto"
    """auto | einsum | xla | cudnn | splash; auto picks per platform and shape (the table in
    jaxsd/models/attention_select.py). Also used by the text encoders of sample grids."""
    remat_policy: str | None = None
    """rematerialisation of each ResNet and transformer block of the UNet: None | "full" (keep only
    block inputs) | "dots" (also keep weight-matmul outputs) | a `jax.checkpoint_policies` name
    (jaxsd/models/transformer.py; the policy table is in docs/training.md)."""
    segmented_backward: bool = False
    """each ResNet block, transformer block and resampler of the UNet computes its weight gradients in
    its own backward pass, before the earlier blocks' (jaxsd/models/segmented_backward.py): bounds what
    the train step holds at its peak; the same gradients (docs/training.md)."""
    token_merging: TokenMerging = field(default_factory=lambda: TokenMerging(ratio=0.0))
    """ToMe for SD in the UNet's transformer blocks, in the train step and sample grids: ratio (0 = off,
    the default), max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp — the
    `tomesd` package's settings and defaults (jaxsd/models/token_merging.py, docs/sampling.md)."""


@dataclass(frozen=True)
class DiffusionConfig:
    """The training noise schedule (diffusers DDPMScheduler config fields)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    """linear | scaled_linear | squaredcos_cap_v2."""
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    """what the UNet predicts, hence the training target: epsilon | v_prediction | sample."""
    rescale_betas_zero_snr: bool = False
    """rescale the schedule to zero terminal SNR (Lin et al. 2023); use with v_prediction."""

    def to_scheduler_config(self) -> dict[str, Any]:
        """The diffusers `scheduler_config.json` dict `NoiseSchedule.from_config` reads."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class LossConfig:
    """What the loss is: timestep sampling, weighting, perturbations, conditioning dropout."""

    timestep_sampling: str = "uniform"
    """uniform | logit_normal (t = sigmoid(N(logit_mean, logit_std)) scaled to the timestep range)."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_timestep: int = 0
    """lowest timestep sampled (inclusive); with max_timestep this biases training to a range."""
    max_timestep: int | None = None
    """highest timestep sampled (exclusive); None = num_train_timesteps."""
    loss_type: str = "l2"
    """l2 | l1 | huber."""
    huber_c: float = 0.1
    """Huber delta: quadratic for |pred − target| ≤ huber_c, linear beyond."""
    min_snr_gamma: float | None = None
    """Min-SNR-γ weighting (Hang et al. 2023), e.g. 5.0; None = unweighted."""
    noise_offset: float = 0.0
    """add offset·N(0,1) per sample and channel to the noise (brighter/darker images)."""
    input_perturbation: float = 0.0
    """noise the latents with noise + p·N(0,1) while the target keeps the unperturbed noise."""
    cond_dropout: float = 0.0
    """probability of replacing a sample's text conditioning (and pooled) by the empty-prompt embedding."""
    lpips: LPIPSLossConfig = field(default_factory=LPIPSLossConfig)
    style: StyleLossConfig = field(default_factory=StyleLossConfig)
    perceptual: PerceptualLossConfig = field(default_factory=PerceptualLossConfig)
    vae: VAELossConfig = field(default_factory=VAELossConfig)
    """model.kind vae: reconstruction, KL, LPIPS and PatchGAN terms (jaxsd/config_vae.py)."""


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, learning-rate schedule, clipping, weight decay."""

    name: str = "adamw"
    """adamw | adamw8bit | adafactor | lion | sgd."""
    learning_rate: float = 1e-4
    schedule: str = "constant"
    """constant | linear | cosine (decaying to learning_rate·min_lr_ratio at train.steps)."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    """decoupled weight decay; applied only to params with ≥2 dims (never norms or biases)."""
    momentum: float = 0.9
    """sgd momentum."""
    clip_grad_norm: float | None = 1.0
    """global-norm gradient clipping; None = off, which also lets each param's update start as soon as
    its gradient exists instead of after all of them (less memory; NaN skip from the loss only)."""
    block_size: int = 2048
    """adamw8bit: values per quantisation block (256–2048)."""


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the trainable params."""

    enabled: bool = False
    decay: float = 0.9999
    warmup: bool = True
    """use min(decay, (1+n)/(10+n)) after n EMA updates, so early EMA is not dominated by the init."""
    every: int = 1
    """update the EMA every N optimizer steps."""


@dataclass(frozen=True)
class TrainConfig:
    """The run: length, batch, precision of the loop, which params train."""

    run_dir: str = "runs/default"
    """checkpoints, resolved config, TensorBoard events and metrics.jsonl go here; resume is from here."""
    steps: int = 1000
    batch_size: int = 8
    """global batch size (all processes, all accumulation micro-batches)."""
    grad_accum_steps: int = 1
    """split each batch into this many micro-batches and sum their gradients."""
    seed: int = 0
    trainable: list[str] = field(default_factory=lambda: [".*"])
    """regexes (re.search over 'a/b/kernel' param paths); a param trains if any matches..."""
    frozen: list[str] = field(default_factory=list)
    """...and none of these matches."""
    data_source: str = "cache"
    """cache: batches from the `data:` section's cached latents (`jaxsd cache` first);
    synthetic: the in-memory `synthetic:` section (tests, smoke runs, benchmarks)."""
    compilation_cache: str | None = None
    """directory of a persistent XLA compilation cache (the full-size presets use ~/.cache/jaxsd/xla):
    a resumed or repeated run loads the compiled train step instead of compiling it again (SD1.5:
    ~35 s); null = off. JAX_COMPILATION_CACHE_DIR, if set, wins."""
    resume: str = "auto"
    """auto: resume from <run_dir>/checkpoints when there is one (a config change that alters the train
    state — optimizer, trainable/frozen, EMA on/off, model — stops with the changed keys named);
    params_only: on such a change, start a fresh optimizer (and EMA) from the checkpoint's params."""
    max_nonfinite_skips: int = 3
    """NaN/inf loss or gradient: skip the update; stop cleanly after more than this many in a row."""
    steps_in_flight: int = 1
    """steps dispatched ahead of the host: step n's metrics are read (and logged) after step n + N is
    dispatched, so the device never waits while the host reads and logs. 0 = read each step's metrics
    before dispatching the next (the loop before issue #18: the device idles while the host works; an
    error then surfaces at the step that raised it). Checkpoint, sample-grid and stop steps read every
    step first. `jaxsd bench host-overhead` measures the difference."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    text_encoder: str | None = None
    """what the text encoder(s) of a token-id cache run do (data.cache.text: tokens; docs/training.md): frozen,
    lora (adapters; the same as lora.text_encoder: true) or full (fine-tuned with the UNet, at
    text_encoder_lr); null = lora when lora.text_encoder is true, else frozen."""
    text_encoder_lr: float | None = None
    """train.text_encoder full: the text encoders' learning rate (the schedule's shape is the UNet's, scaled
    by text_encoder_lr / optimizer.learning_rate); null = optimizer.learning_rate."""
    fused_update: bool = False
    """with model.segmented_backward: each UNet block's AdamW update runs inside its backward pass, as soon as
    its gradients exist, so they die there (less memory at the peak; jaxsd/train/fused_update.py). AdamW
    only, without clipping or accumulation (docs/training.md); the same params as without it."""


@dataclass(frozen=True)
class ValidationLossConfig:
    """The loss on held-out cached samples at fixed timesteps and fixed noise (`jaxsd.train.validation`):
    logged as val/loss and val/loss_t{T} to metrics.jsonl and TensorBoard."""

    roots: list[str] = field(default_factory=list)
    """held-out image folders cached by `jaxsd cache` with the training data's settings (same VAE, text
    encoder, resolution): e.g. put them in data.roots of a copy of the run config and cache that."""
    every: int = 0
    """evaluate every N steps (and once before the first step of a fresh run); 0 = off."""
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    seed: int = 0
    """the noise of sample i is drawn from key(seed) folded with i: the same at every evaluation."""
    batch_size: int | None = None
    """global batch of the evaluation (divisible by the mesh's batch shards); null = train.batch_size.
    Per resolution bucket the samples beyond a whole number of batches are left out (a warning counts them)."""


@dataclass(frozen=True)
class ShardingConfig:
    """Device mesh, logical-axis rules and multi-host start-up."""

    data: int = -1
    """data-parallel axis size; -1 = the devices left over by the other axes."""
    fsdp: int = 1
    """fully-sharded data parallel: params, grads and optimizer state sharded over this axis."""
    tensor: int = 1
    """tensor (model) parallel axis size."""
    rules: dict[str, Any] = field(default_factory=lambda: {
        "embed": "fsdp", "conv_in": "fsdp", "mlp": "tensor", "heads": "tensor", "conv_out": "tensor",
        "vocab": "tensor", "norm": None})
    """logical axis name (see jaxsd/models/layers.py) → mesh axis name, list of names, or null."""
    distributed: str = "auto"
    """auto (initialise jax.distributed when a cluster is detected or coordinator_address is set) | on | off."""
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    """orbax checkpoints in <run_dir>/checkpoints."""

    every: int = 500
    keep: int = 3
    async_save: bool = True
    trigger_file: str = "SAVE_NOW"
    """creating <run_dir>/<trigger_file> makes the loop save at the next step (the file is then removed)."""
    poll_every: int = 10
    """with several processes: check for a signal (SIGTERM, e.g. a TPU preemption) or the trigger file every
    N steps, in one small collective, so all processes save and stop at the same step. A signal is acted
    on within N steps; one process checks every step (no collective needed)."""


@dataclass(frozen=True)
class LoggingConfig:
    """TensorBoard, console and metrics file."""

    every: int = 10
    """log scalars every N steps."""
    tensorboard: bool = True
    progress_bar: bool = True
    peak_flops: float = 0.0
    """peak FLOP/s of one device for the MFU estimate; 0 = do not report MFU."""
    debug: list[str] = field(default_factory=list)
    """Python loggers shown at DEBUG level on every process's console, e.g. [jaxsd.data.loader]: each
    process logs the sample ids it reads for every global batch (how a multi-host run splits its data)."""
    sample_every: int = 0
    """write a sample grid of `sample_prompts` every N steps (<run_dir>/samples/step_<N>.png and
    TensorBoard image `samples/...`); 0 = off. Generated with the EMA params when train.ema is on."""
    sample_prompts: list[str] = field(default_factory=list)
    """one grid row per prompt."""
    sample_negative_prompt: str = ""
    """classifier-free guidance's negative prompt for every sample ("" = the empty prompt, as diffusers)."""
    sample_images_per_prompt: int = 1
    """grid columns: images per prompt, each from its own fixed noise."""
    sample_steps: int = 30
    """denoising steps per image (30, as `jaxsd sample --steps`)."""
    sample_guidance_scale: float = 7.5
    sample_sampler: str = "dpmpp_2m"
    """sampling algorithm, as `jaxsd sample --scheduler` (ddim, euler, euler_a, dpmpp_2m, pndm, dpmpp_2m_sde_karras,
    ..., auto = the pipeline folder's scheduler class; docs/sampling.md)."""
    sample_seed: int = 0
    """the same seed at every sampling step, so the grids of a run differ only by training."""
    sample_height: int | None = None
    """image size in pixels; None = the UNet's sample_size × the VAE's downscale factor."""
    sample_width: int | None = None
    sample_components: str | None = None
    """diffusers pipeline folder (model_index.json) whose vae, text encoder(s), tokenizer(s) and scheduler
    sample with the trained UNet (its own unet is ignored). None = model.pretrained, when that is a
    pipeline folder. The scheduler's betas and prediction type are replaced by the `diffusion` section's."""
    sample_clip: str | None = None
    """a transformers CLIPModel folder (with its tokenizer and preprocessor_config.json, as `jaxsd eval --clip`):
    each sample grid's CLIP score against its prompts is logged as samples/clip_score; None = off."""


@dataclass(frozen=True)
class SyntheticDataConfig:
    """In-memory random latents and embeddings of the loader's batch shape (train.data_source=synthetic)."""

    num_examples: int = 64
    latent_size: int = 8
    """latent height = width."""
    latent_channels: int = 4
    text_len: int = 8
    text_dim: int = 32
    pooled_dim: int = 0
    """>0: also yield `pooled` [B, pooled_dim] and SDXL `time_ids` [B, 6]."""


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA / LoCon adapters: with rank > 0 only the adapters train; the base model is frozen.

    The names follow kohya-ss and PEFT: scale = alpha / rank."""

    rank: int = 0
    """adapter rank of the targeted Dense layers; 0 = no adapters (full fine-tuning)."""
    alpha: float = 0.0
    """scale = alpha / rank; 0 = rank (scale 1)."""
    targets: Any = "attn"
    """a preset or a list of regexes over module paths (diffusers names, e.g. 'attn1.to_q'):
    attn = to_q, to_k, to_v, to_out.0 of attn1/attn2 (kohya's and diffusers' default);
    attn_ff = attn + ff.net.0.proj, ff.net.2, proj_in, proj_out; all_linear = every Dense of the UNet."""
    conv_rank: int = 0
    """> 0 = LoCon: also adapt resnet 3x3 convs, conv shortcuts and up/downsamplers with this rank."""
    conv_alpha: float = 0.0
    """conv adapters' scale = conv_alpha / conv_rank; 0 = conv_rank (scale 1)."""
    dropout: float = 0.0
    """dropout on the adapter input during training, as PEFT's lora_dropout (0 = off); never when sampling."""
    init: str = "peft"
    """peft: down kaiming-uniform, up zeros; gaussian: down ~ N(0, 1/rank), up zeros."""
    text_encoder: bool = False
    """also adapt the CLIP text encoder(s)' q/k/v/out_proj and MLP (fc1/fc2), with `rank`/`alpha`; needs the
    text encoded in the step: a token-id cache (data.cache.text_mode: tokens)."""
    base_dtype: str | None = None
    """dtype the frozen base weights are stored in (bfloat16 halves their memory); null = model.param_dtype."""
    init_from: str | None = None
    """an existing LoRA file (PEFT/diffusers or kohya) to continue training from: its rank, alpha and layers
    must be this section's; read on a fresh start only (on resume the checkpoint's adapters continue)."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0 or self.conv_rank > 0


@dataclass(frozen=True)
class Config:
    """Everything `jaxsd train` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """images, caching and the loader: jaxsd/data/config.py (the data engineer's schema)."""
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    """prior preservation's class images: jaxsd/data/config.py, docs/dreambooth.md."""
    validation: ValidationLossConfig = field(default_factory=ValidationLossConfig)
    """held-out validation loss (not to be confused with data.validation, the checks of the images)."""
