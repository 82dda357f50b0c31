"""Tiny random Hugging Face Qwen2.5-VL models (built offline from configs) and the torch
reference forward with explicit M-RoPE positions, shared by the parity tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

IMAGE, VIDEO, VSTART, VEND = 5, 6, 3, 4
PATCH_DIM = 3 * 2 * 14 * 14


def tiny_hf_config(tie: bool = False, vocab: int = 1024, depth: int = 3) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=depth, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            fullatt_block_indexes=[1], window_size=112, tokens_per_second=2, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, tie_word_embeddings=tie,
    )


def tiny_hf_model(seed: int = 0, **kw) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_hf_config(**kw)).eval()
    # random init leaves norms at 1 and biases at 0: perturb them so parity checks them too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def torch_logits(model, inputs: dict, position_ids: np.ndarray) -> np.ndarray:
    """Reference logits with our (original-release) positions passed explicitly."""
    kw = {
        "input_ids": torch.as_tensor(np.asarray(inputs["input_ids"]), dtype=torch.long),
        "attention_mask": torch.as_tensor(np.asarray(inputs["attention_mask"]), dtype=torch.long),
        "position_ids": torch.as_tensor(np.asarray(position_ids), dtype=torch.long),
    }
    for name in ("pixel_values", "pixel_values_videos"):
        if inputs.get(name) is not None:
            kw[name] = torch.as_tensor(np.asarray(inputs[name]), dtype=torch.float32)
    for name in ("image_grid_thw", "video_grid_thw"):
        if inputs.get(name) is not None:
            kw[name] = torch.as_tensor(np.asarray(inputs[name]), dtype=torch.long)
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def vision_prompt(rng, items, text_lens, left_pad: int = 0, pad_id: int = 0):
    """Token ids for text interleaved with vision items [(kind, (t, h, w)), ...]."""
    ids = list(rng.integers(10, 1000, size=text_lens[0]))
    for (kind, (t, h, w)), n_text in zip(items, text_lens[1:], strict=True):
        tok = IMAGE if kind == "image" else VIDEO
        ids += [VSTART] + [tok] * (t * h * w // 4) + [VEND]
        ids += list(rng.integers(10, 1000, size=n_text))
    return [pad_id] * left_pad + ids


def pixels(rng, grids) -> np.ndarray:
    n = int(sum(t * h * w for t, h, w in grids))
    return rng.standard_normal((n, PATCH_DIM)).astype(np.float32)
