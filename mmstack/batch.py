"""`MultimodalBatch`: what both processors (DeepSeek-VL2 tiling, Janus square pad) produce and what
`MultimodalModel.embed` consumes, so neither the pipeline nor training has a family branch.

Notation: B batch, T tokens, V views (image tiles) of every image in the batch, S view side.

    batch = processor.batch(conversations, images)          # [B, T] ids + [V, 3, S, S] views
    emb = model.embed(batch)                                 # [B, T, D] with the images spliced in
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch


@dataclass
class MultimodalBatch:
    """Token ids with image slots, and the pixels of every view of every image, in order.

    Attributes:
        input_ids: [B, T] long; every image slot holds the image-token id (ignored by `embed`).
        attention_mask: [B, T] long, 1 for real tokens, 0 for padding.
        images_seq_mask: [B, T] bool, True on every slot an image embedding fills (row-major order).
        pixel_values: [V, 3, S, S] float32 views of all images, sample by sample, image by image; None
            when the batch has no image.
        image_tiles: per image (in the same order), its local tile grid (tw, th): the image has
            1 + tw * th views (a global view, then tw * th local tiles, row-major); (0, 0) is a single view
            (every Janus image; a one-tile VL2 image of a native model with `single_tile_global_only`).
        images_per_sample: number of images of each sample, [B].
        assistant_mask: [B, T] bool, True on the tokens a training loss targets (assistant answers and
            their end token); None at inference.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images_seq_mask: torch.Tensor
    pixel_values: Optional[torch.Tensor] = None
    image_tiles: list = field(default_factory=list)
    images_per_sample: list = field(default_factory=list)
    assistant_mask: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_views(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    def views_per_image(self) -> list[int]:
        return [1 + tw * th for tw, th in self.image_tiles]

    def to(self, device) -> "MultimodalBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       images_seq_mask=move(self.images_seq_mask), pixel_values=move(self.pixel_values),
                       assistant_mask=move(self.assistant_mask))

    def sample(self, i: int) -> "MultimodalBatch":
        """Sample `i` alone, its padding removed (for admitting requests one by one)."""
        keep = self.attention_mask[i].bool()
        images = sum(self.images_per_sample[:i])
        n_img = self.images_per_sample[i] if self.images_per_sample else 0
        views = self.views_per_image()
        v0, v1 = sum(views[:images]), sum(views[: images + n_img])
        return MultimodalBatch(
            input_ids=self.input_ids[i][keep][None], attention_mask=self.attention_mask[i][keep][None],
            images_seq_mask=self.images_seq_mask[i][keep][None],
            pixel_values=None if self.pixel_values is None or v1 == v0 else self.pixel_values[v0:v1],
            image_tiles=list(self.image_tiles[images: images + n_img]), images_per_sample=[n_img],
            assistant_mask=None if self.assistant_mask is None else self.assistant_mask[i][keep][None])

    @staticmethod
    def collate(batches: Sequence["MultimodalBatch"], pad_id: int, side: str = "left") -> "MultimodalBatch":
        """Stack batches into one, padding every row to the longest ("left" for generation, "right" for
        the engine's slots); views and image grids are concatenated in order."""
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        rows = [b.sample(i) for b in batches for i in range(b.batch_size)]
        t = max(r.input_ids.shape[1] for r in rows)
        n = len(rows)
        ids = torch.full((n, t), pad_id, dtype=torch.long)
        mask = torch.zeros(n, t, dtype=torch.long)
        seq = torch.zeros(n, t, dtype=torch.bool)
        answer = torch.zeros(n, t, dtype=torch.bool) if any(r.assistant_mask is not None for r in rows) else None
        for k, r in enumerate(rows):
            length = r.input_ids.shape[1]
            sl = slice(t - length, t) if side == "left" else slice(0, length)
            ids[k, sl], mask[k, sl], seq[k, sl] = r.input_ids[0], r.attention_mask[0], r.images_seq_mask[0]
            if answer is not None and r.assistant_mask is not None:
                answer[k, sl] = r.assistant_mask[0]
        views = [r.pixel_values for r in rows if r.pixel_values is not None]
        return MultimodalBatch(ids, mask, seq, torch.cat(views) if views else None,
                               [g for r in rows for g in r.image_tiles], [r.images_per_sample[0] for r in rows],
                               answer)

    # ------------------------------------------------------------------------------ official layouts
    @classmethod
    def from_vl2(cls, input_ids, images, images_seq_mask, images_spatial_crop, attention_mask=None
                 ) -> "MultimodalBatch":
        """From the official DeepSeek-VL2 processor tensors: images [B, N_max, 3, S, S] (per sample, per image
        a global tile then its locals; zero tiles pad) and images_spatial_crop [B, I_max, 2] of (tw, th)
        with (0, 0) rows padding (so these tensors cannot carry a single-view image: the processor's `batch` does)."""
        views, tiles, counts = [], [], []
        for b, rows in enumerate(images_spatial_crop.tolist()):
            n = k = 0
            for tw, th in rows:
                if tw == 0 or th == 0:
                    break
                tiles.append((tw, th))
                n += 1 + tw * th
                k += 1
            views.append(images[b, :n])
            counts.append(k)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pix = torch.cat(views) if sum(counts) else None
        return cls(input_ids, mask, images_seq_mask.bool(), pix, tiles, counts)

    @classmethod
    def from_janus(cls, input_ids, pixel_values, images_seq_mask, images_emb_mask=None, attention_mask=None
                   ) -> "MultimodalBatch":
        """From the official Janus processor tensors: pixel_values [B, n, 3, S, S] (zero images pad) and
        images_emb_mask [B, n, K] (a padded image has an all-False row)."""
        b, n = pixel_values.shape[:2]
        real = (torch.ones(b, n, dtype=torch.bool) if images_emb_mask is None
                else images_emb_mask.bool().any(-1).cpu())
        counts = real.sum(1).tolist()
        views = pixel_values[real.to(pixel_values.device)] if n else None
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return cls(input_ids, mask, images_seq_mask.bool(), views if sum(counts) else None,
                   [(0, 0)] * int(sum(counts)), counts)
