"""Image-token layout and the splice of image embeddings into the text sequence.

DeepSeek-VL2 ("2D" tiles, global view at the head), per image with tw x th local tiles and h x w
embeddings per tile:
  global view: h rows of [w embeddings + image_newline]            -> h*(w+1)
  view separator                                                    -> 1
  local views stitched into a (th*h) x (tw*w) grid, each row + newline -> th*h*(tw*w+1)
A native single-view image (grid (0, 0), `image_processing.single_tile_global_only`) is the global view and the
separator alone: h*(w+1) + 1, the same formula with no local rows.
Every slot (newline and separator included) holds the `<image>` id in input_ids and is filled by
`masked_scatter` in order. JanusFlow replaces `<begin_of_image>`'s embedding with `beg_of_und_embed`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mmstack.part_configs import LayoutConfig

__all__ = ["Layout", "LayoutConfig", "splice"]


class Layout(nn.Module):
    """Lays image features out as the sequence the LLM reads, by `cfg.kind`: VL2 tiles with the learned
    `image_newline` / `view_separator`; Janus features as they are; JanusFlow after the learned `begin_embed`."""

    def __init__(self, cfg: LayoutConfig, device=None, dtype=None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.kind == "vl2_tiles":
            self.image_newline = nn.Parameter(torch.zeros(cfg.n_embed, device=device, dtype=dtype))
            self.view_separator = nn.Parameter(torch.zeros(cfg.n_embed, device=device, dtype=dtype))
        elif cfg.kind == "janusflow":
            self.begin_embed = nn.Parameter(torch.zeros(1, cfg.n_embed, device=device, dtype=dtype))

    def arrange(self, feats: torch.Tensor, image_tiles: Sequence[tuple[int, int]]) -> torch.Tensor:
        """feats [V, P, D] (every view of every image, in order) -> the image slots' embeddings [N, D].

        `image_tiles[i] = (tw, th)`: image i has 1 + tw*th views (global first; (0, 0) is one view).
        """
        out, start = [], 0
        for tw, th in image_tiles:
            n = 1 + tw * th
            views = feats[start: start + n]
            start += n
            if self.cfg.kind == "vl2_tiles":
                out.append(self.vl2_image(views, tw, th))
            elif self.cfg.kind == "janusflow":
                out.append(torch.cat([self.begin_embed.to(views.dtype), views.reshape(-1, views.shape[-1])]))
            else:
                out.append(views.reshape(-1, views.shape[-1]))
        if start != feats.shape[0]:
            raise ValueError(f"the image grids name {start} views but {feats.shape[0]} were encoded")
        return torch.cat(out) if out else feats.new_zeros(0, feats.shape[-1])

    def vl2_image(self, tiles: torch.Tensor, tw: int, th: int) -> torch.Tensor:
        """tiles [1 + tw*th, h*w, D] (global first) -> the image's embedding sequence [n_tokens, D]; with
        (tw, th) = (0, 0) the local part is empty and the image is its global rows and the separator."""
        n, p, d = tiles.shape
        h = w = int(round(p**0.5))
        nl = self.image_newline.to(tiles.dtype)
        glob = torch.cat([tiles[0].view(h, w, d), nl.expand(h, 1, d)], 1).reshape(-1, d)  # [h*(w+1), D]
        local = tiles[1:].view(th, tw, h, w, d).permute(0, 2, 1, 3, 4).reshape(th * h, tw * w, d)
        local = torch.cat([local, nl.expand(th * h, 1, d)], 1).reshape(-1, d)  # [th*h*(tw*w+1), D]
        return torch.cat([glob, self.view_separator.to(tiles.dtype)[None], local], 0)


def splice(inputs_embeds: torch.Tensor, seq_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Write `image_embeds` [N, D] in order into the positions of `seq_mask` [B, T] (row-major)."""
    n = int(seq_mask.sum())
    if n != image_embeds.shape[0]:
        raise ValueError(f"the prompt has {n} image-token slots but {image_embeds.shape[0]} image embeddings were made")
    out = inputs_embeds.clone()
    out[seq_mask.bool()] = image_embeds.to(out.dtype)
    return out
