"""Tiny random Qwen3-VL reference models and inputs for the Qwen3-VL tests (transformers'
`Qwen3VLForConditionalGeneration`, fp32, CPU; positions from its own `get_rope_index`)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

IMAGE, VIDEO, VSTART, VEND = 5, 6, 3, 4
PATCH_DIM = 3 * 2 * 16 * 16


def tiny_hf_config(tie: bool = False) -> Qwen3VLConfig:
    """head_dim (24) differs from hidden / heads (16), the position table (6 x 6) is smaller
    than most grids (extrapolated), DeepStack reads the first and last vision layers."""
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
            bos_token_id=1, eos_token_id=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": [4, 4, 4], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            num_position_embeddings=36, deepstack_visual_indexes=[0, 2], patch_size=16,
            temporal_patch_size=2, spatial_merge_size=2,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, tie_word_embeddings=tie,
    )


def tiny_hf_model(seed: int = 0, tie: bool = False) -> Qwen3VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_hf_config(tie)).eval()
    # random init leaves norms at 1 and biases at 0: perturb them so parity checks them too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------- inputs
def prompt(rng, items, text_lens, left_pad: int = 0) -> list[int]:
    """Text interleaved with vision items [(kind, (t, h, w)), ...], the Qwen3-VL way: a video
    is one `<|vision_start|>...<|vision_end|>` segment per temporal patch, each after its own
    timestamp text (three tokens here)."""
    ids = list(rng.integers(10, 1000, size=text_lens[0]))
    for (kind, (t, h, w)), n_text in zip(items, text_lens[1:], strict=True):
        per_frame = [VSTART] + [IMAGE if kind == "image" else VIDEO] * (h * w // 4) + [VEND]
        if kind == "image":
            ids += per_frame
        else:
            for _ in range(t):
                ids += list(rng.integers(10, 1000, size=3)) + per_frame
        ids += list(rng.integers(10, 1000, size=n_text))
    return [0] * left_pad + ids


def pixels(rng, grids) -> np.ndarray:
    n = int(sum(t * h * w for t, h, w in grids))
    return rng.standard_normal((n, PATCH_DIM)).astype(np.float32)


def batch(rows, pad_side="right"):
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if pad_side == "right" else slice(width - len(r), width)
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def hf_positions(hf_model, inputs) -> np.ndarray:
    """transformers' own M-RoPE positions [3, B, L] (padded slots: 0)."""
    ids = torch.as_tensor(inputs["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(inputs["attention_mask"], dtype=torch.long)
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    grids = {k: torch.as_tensor(np.asarray(inputs[k]), dtype=torch.long)
             for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
    with torch.no_grad():
        pos, _ = hf_model.model.get_rope_index(ids, types, attention_mask=mask, **grids)
    return pos.numpy()


def torch_logits(hf_model, inputs, position_ids) -> np.ndarray:
    kw = {"position_ids": torch.as_tensor(np.array(position_ids), dtype=torch.long)}
    for name in ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw"):
        if inputs.get(name) is not None:
            kw[name] = torch.as_tensor(np.asarray(inputs[name]), dtype=torch.long)
    for name in ("pixel_values", "pixel_values_videos"):
        if inputs.get(name) is not None:
            kw[name] = torch.as_tensor(np.asarray(inputs[name]), dtype=torch.float32)
    with torch.no_grad():
        return hf_model(**kw).logits.float().numpy()
