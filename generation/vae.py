"""The JanusFlow image decoder: a diffusers `AutoencoderKL` (SDXL-VAE architecture), loaded from
safetensors only. diffusers is imported here, lazily: the rest of mmstack runs without it.

A VAE folder is either diffusers' layout (config.json + diffusion_pytorch_model.safetensors) or the
golden layout (vae_config.json + vae.safetensors).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from mmstack.io.checkpoint import CheckpointError, check_safetensors

# https://huggingface.co/stabilityai/sdxl-vae/blob/main/config.json (architecture; weights not shipped)
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024, scaling_factor=0.13025,
    block_out_channels=[128, 256, 512, 512], norm_num_groups=32, act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)


def find_vae(folder: Path) -> Optional[tuple[Path, Path]]:
    """(config, weights) of a VAE in `folder` (or `folder/vae/`), or None."""
    for cfg, w in ((folder / "vae" / "config.json", folder / "vae" / "diffusion_pytorch_model.safetensors"),
                   (folder / "vae_config.json", folder / "vae.safetensors"),
                   (folder / "config.json", folder / "diffusion_pytorch_model.safetensors")):
        if cfg.exists() and w.exists():
            return cfg, w
    return None


def load_vae(path: Union[str, Path], device=None, dtype=torch.float32):
    """Build `diffusers.AutoencoderKL` from its config and load the safetensors weights strictly."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover - diffusers is a declared dependency
        raise ImportError("JanusFlow image decoding needs diffusers (pip install diffusers)") from e
    from safetensors.torch import load_file

    found = find_vae(Path(path))
    if found is None:
        raise FileNotFoundError(f"{path}: no VAE found (vae/config.json + diffusion_pytorch_model.safetensors, "
                                "or vae_config.json + vae.safetensors)")
    cfg_file, weights = found
    from mmstack.io.files import UnsafeFileError, read_text

    try:
        raw = json.loads(read_text(cfg_file, what="VAE config"))
    except (UnsafeFileError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{cfg_file}: not a readable VAE config ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: the VAE config is not a JSON object")
    cfg = {k: v for k, v in raw.items() if not k.startswith("_")}
    vae = AutoencoderKL.from_config(cfg)
    check_safetensors(weights)
    missing, unexpected = vae.load_state_dict(load_file(weights), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: VAE keys do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    vae = vae.to(device=device)
    if dtype is not None and dtype != torch.float32:
        vae = vae.to(dtype=dtype)
    return vae.eval()


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents [n, 4, h, w] -> images [n, 3, 8h, 8w] in about [-1, 1] (vae.decode(z / scaling_factor))."""
    p = next(vae.parameters())
    return vae.decode(z.to(p.device, p.dtype) / vae.config.scaling_factor).sample.float()
