"""The PyTorch side of `jaxsd bench vae-step`: jaxsd's VAE training step (jaxsd/train/vae_step.py and
vae_loss.py) written the way LDM's `LPIPSWithDiscriminator` computes it, from diffusers' `AutoencoderKL`, the
`lpips` package and taming's PatchGAN discriminator (bench/torch_discriminator.py).

    metrics = step(pixels)          # pixels [B, 3, H, W] in [-1, 1]; one autoencoder + one discriminator update

Per step: encode → posterior sample → decode; nll = mean |x − x̂| + lpips_weight · LPIPS; the adaptive weight
from `torch.autograd.grad` of nll and g = −mean D(x̂) at the decoder's conv_out weight (LDM's
`calculate_adaptive_weight`); loss = nll + kl_weight · mean KL / (H·W·3) + w · g, backward into the autoencoder
only; the discriminator's hinge loss on x and the detached x̂, backward into it only; each part's gradients
clipped on their own norm; both AdamW updates (decay on ≥2-dim params, as jaxsd) unless a value is not
finite. The discriminator is on from the first step (the benchmark's disc_start 0).
Imports no jax: the child's peak RSS is torch's alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import numpy as np
import torch

ADAPTIVE_EPS = 1e-4  # as jaxsd.train.vae_loss (LDM's calculate_adaptive_weight)
ADAPTIVE_MAX = 1e4
LPIPS_BUFFERS = ("scaling_layer.shift", "scaling_layer.scale")  # constants of the package, not in the weights file


def load_lpips(state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """`lpips.LPIPS(net="vgg")` (v0.1, eval mode, frozen) holding `state`: torchvision VGG16 `features.N.*` and
    the heads `linK.model.1.weight`, the layout of `bench.perceptual_files.save_random_lpips`'s file."""
    from bench.reference_packages import reference_packages

    with reference_packages():  # lpips imports torchvision's VGG16 definition
        ref = importlib.import_module("lpips").LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    slice_of = {name: k for k in range(1, 6) for name, _ in getattr(ref.net, f"slice{k}").named_children()}
    mapped = {}
    for key, value in state.items():
        if key.startswith("features."):
            _, index, leaf = key.split(".")
            key = f"net.slice{slice_of[index]}.{index}.{leaf}"
        mapped[key] = value
    result = ref.load_state_dict(mapped, strict=False)
    # `lins.K` is a ModuleList over the same modules as `linK`: loaded through those names
    aliases = {k for k in result.missing_keys if k.startswith("lins.") and "lin" + k[len("lins."):] in mapped}
    if set(result.missing_keys) - set(LPIPS_BUFFERS) - aliases or result.unexpected_keys:
        raise ValueError(f"LPIPS weights do not fit lpips.LPIPS(net='vgg'): missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    ref.requires_grad_(False)
    return ref.eval()


def _adamw(params: list[torch.nn.Parameter], opt: Mapping) -> torch.optim.AdamW:
    """AdamW with jaxsd's settings (`optimizer:`): weight decay only on params with ≥2 dims."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opt["weight_decay"]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt["learning_rate"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"])


def make_vae_step(vae, disc: torch.nn.Module, lpips: torch.nn.Module, loss: Mapping, opt: Mapping,
                  first_noise: np.ndarray | None = None, seed: int = 0) -> Callable[[torch.Tensor], dict]:
    """The step over diffusers `AutoencoderKL` `vae`, discriminator `disc` and LPIPS `lpips`.

    loss: jaxsd's `loss.vae` fields (kl_weight, lpips_weight, disc_weight; reconstruction l1, disc_loss hinge);
    opt: its `optimizer:` fields (learning_rate, b1, b2, eps, weight_decay, clip_grad_norm), the discriminator at
    `loss["disc_learning_rate"]` when set. first_noise: the first step's posterior ε [B, C, h, w] (jaxsd's draw,
    so both frameworks' first losses can be compared); later steps draw ε from a generator seeded `seed`.
    Returns per call the metrics jaxsd logs that both compute (floats)."""
    if loss["reconstruction"] != "l1" or loss["disc_loss"] != "hinge" or loss["disc_start"] != 0:
        raise ValueError("the torch VAE step is written for l1, hinge and disc_start 0 (the benchmark's)")
    vae.train(), disc.train()
    ae_params, d_params = list(vae.parameters()), list(disc.parameters())
    opt_ae = _adamw(ae_params, opt)
    opt_d = _adamw(d_params, {**opt, "learning_rate": loss.get("disc_learning_rate") or opt["learning_rate"]})
    last = vae.decoder.conv_out.weight
    clip = opt.get("clip_grad_norm")
    gen = torch.Generator().manual_seed(seed)
    pending = [torch.from_numpy(np.ascontiguousarray(first_noise))] if first_noise is not None else []

    def step(x: torch.Tensor) -> dict:
        posterior = vae.encode(x).latent_dist
        eps = pending.pop() if pending else torch.randn(posterior.mean.shape, generator=gen)
        x_rec = vae.decode(posterior.mean + posterior.std * eps).sample
        kl = posterior.kl().mean()
        rec = (x - x_rec).abs().mean()
        lp = lpips(x, x_rec).mean()
        nll = rec + loss["lpips_weight"] * lp
        g = -disc(x_rec).mean()
        nll_grad, = torch.autograd.grad(nll, last, retain_graph=True)
        g_grad, = torch.autograd.grad(g, last, retain_graph=True)
        weight = (nll_grad.norm() / (g_grad.norm() + ADAPTIVE_EPS)).clamp(0, ADAPTIVE_MAX).detach() * loss["disc_weight"]
        total = nll + loss["kl_weight"] / x[0].numel() * kl + weight * g
        total.backward(inputs=ae_params)
        real, fake = disc(x), disc(x_rec.detach())
        d_loss = 0.5 * (torch.relu(1.0 - real).mean() + torch.relu(1.0 + fake).mean())
        d_loss.backward(inputs=d_params)
        norms = [torch.nn.utils.clip_grad_norm_(p, clip if clip else float("inf")) for p in (ae_params, d_params)]
        if bool(torch.isfinite(torch.stack([total.detach(), d_loss.detach(), *norms])).all()):  # jaxsd's NaN skip
            opt_ae.step(), opt_d.step()
        opt_ae.zero_grad(set_to_none=True), opt_d.zero_grad(set_to_none=True)
        return {"loss": float(total), "rec": float(rec), "lpips": float(lp), "kl": float(kl), "g_loss": float(g),
                "d_loss": float(d_loss), "adaptive_weight": float(weight), "grad_norm": float(norms[0]),
                "disc_grad_norm": float(norms[1])}

    return step
