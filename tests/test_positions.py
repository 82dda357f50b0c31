"""M-RoPE positions: the stock layout against a transcription of the original (transformers
4.49) algorithm and hand-checked cases; the ETA layout against hand-written arrays."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tempo_jax.models.qwen2_5_vl.positions import decode_start, rope_index, text_positions

VS, VE, IMG, VID = 151652, 151653, 151655, 151656
PAD_ID = 151643  # <|endoftext|>, the pad token


def seg(kind: int, t: int, h: int, w: int, merge: int = 2) -> list[int]:
    """<|vision_start|> + pads for a (t, h, w) grid + <|vision_end|>."""
    return [VS] + [kind] * (t * (h // merge) * (w // merge)) + [VE]


# --------------------------------------------------------------------------------------
# The original algorithm, transcribed from transformers 4.49
# `Qwen2_5_VLForConditionalGeneration.get_rope_index` (config values passed explicitly).
# --------------------------------------------------------------------------------------
def original_get_rope_index(input_ids, image_grid_thw=None, video_grid_thw=None,
                            second_per_grid_ts=None, attention_mask=None, *,
                            spatial_merge_size=2, tokens_per_second=2,
                            image_token_id=IMG, video_token_id=VID,
                            vision_start_token_id=VS):
    mrope_position_deltas = []
    if input_ids is not None and (image_grid_thw is not None or video_grid_thw is not None):
        total_input_ids = input_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(total_input_ids)
        position_ids = torch.ones(
            3, input_ids.shape[0], input_ids.shape[1], dtype=input_ids.dtype,
            device=input_ids.device,
        )
        image_index, video_index = 0, 0
        for i, input_ids in enumerate(total_input_ids):  # noqa: B020 (as in the original)
            input_ids = input_ids[attention_mask[i] == 1]
            image_nums, video_nums = 0, 0
            vision_start_indices = torch.argwhere(input_ids == vision_start_token_id).squeeze(1)
            vision_tokens = input_ids[vision_start_indices + 1]
            image_nums = (vision_tokens == image_token_id).sum()
            video_nums = (vision_tokens == video_token_id).sum()
            input_tokens = input_ids.tolist()
            llm_pos_ids_list: list = []
            st = 0
            remain_images, remain_videos = image_nums, video_nums
            for _ in range(image_nums + video_nums):
                if image_token_id in input_tokens and remain_images > 0:
                    ed_image = input_tokens.index(image_token_id, st)
                else:
                    ed_image = len(input_tokens) + 1
                if video_token_id in input_tokens and remain_videos > 0:
                    ed_video = input_tokens.index(video_token_id, st)
                else:
                    ed_video = len(input_tokens) + 1
                if ed_image < ed_video:
                    t, h, w = image_grid_thw[image_index]
                    second_per_grid_t = 0
                    image_index += 1
                    remain_images -= 1
                    ed = ed_image
                else:
                    t, h, w = video_grid_thw[video_index]
                    if second_per_grid_ts is not None:
                        second_per_grid_t = second_per_grid_ts[video_index]
                    else:
                        second_per_grid_t = 1.0
                    video_index += 1
                    remain_videos -= 1
                    ed = ed_video
                llm_grid_t, llm_grid_h, llm_grid_w = (
                    t.item(), h.item() // spatial_merge_size, w.item() // spatial_merge_size,
                )
                text_len = ed - st
                st_idx = llm_pos_ids_list[-1].max() + 1 if len(llm_pos_ids_list) > 0 else 0
                llm_pos_ids_list.append(torch.arange(text_len).view(1, -1).expand(3, -1) + st_idx)

                range_tensor = torch.arange(llm_grid_t).view(-1, 1)
                expanded_range = range_tensor.expand(-1, llm_grid_h * llm_grid_w)
                time_tensor = expanded_range * second_per_grid_t * tokens_per_second
                time_tensor_long = time_tensor.long()
                t_index = time_tensor_long.flatten()
                h_index = (torch.arange(llm_grid_h).view(1, -1, 1)
                           .expand(llm_grid_t, -1, llm_grid_w).flatten())
                w_index = (torch.arange(llm_grid_w).view(1, 1, -1)
                           .expand(llm_grid_t, llm_grid_h, -1).flatten())
                llm_pos_ids_list.append(
                    torch.stack([t_index, h_index, w_index]) + text_len + st_idx)
                st = ed + llm_grid_t * llm_grid_h * llm_grid_w

            if st < len(input_tokens):
                st_idx = llm_pos_ids_list[-1].max() + 1 if len(llm_pos_ids_list) > 0 else 0
                text_len = len(input_tokens) - st
                llm_pos_ids_list.append(torch.arange(text_len).view(1, -1).expand(3, -1) + st_idx)

            llm_positions = torch.cat(llm_pos_ids_list, dim=1).reshape(3, -1)
            position_ids[..., i, attention_mask[i] == 1] = llm_positions.to(position_ids.device)
            mrope_position_deltas.append(llm_positions.max() + 1 - len(total_input_ids[i]))
        mrope_position_deltas = torch.tensor(mrope_position_deltas).unsqueeze(1)
        return position_ids, mrope_position_deltas
    if attention_mask is not None:
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        max_position_ids = position_ids.max(0, keepdim=False)[0].max(-1, keepdim=True)[0]
        mrope_position_deltas = max_position_ids + 1 - attention_mask.shape[-1]
    else:
        position_ids = (torch.arange(input_ids.shape[1]).view(1, 1, -1)
                        .expand(3, input_ids.shape[0], -1))
        mrope_position_deltas = torch.zeros([input_ids.shape[0], 1], dtype=input_ids.dtype)
    return position_ids, mrope_position_deltas


def random_batch(rng: np.random.Generator, batch: int, merge: int = 2, allow_text_row=True):
    """Rows of text with several images/videos, padded left or right per row."""
    rows, images, videos, spgs = [], [], [], []
    spg_choices = [0.5, 1 / 3, 2 / 3, 1.0, 2 / 25, 0.3, 1.7]
    for _ in range(batch):
        row = list(rng.integers(0, 1000, rng.integers(1, 5)))
        n_items = rng.integers(0 if allow_text_row else 1, 4)
        for _ in range(n_items):
            h, w = (int(v) * merge for v in rng.integers(1, 5, 2))
            if rng.random() < 0.4:
                images.append((1, h, w))
                row += seg(IMG, 1, h, w, merge)
            else:
                t = int(rng.integers(1, 9))
                videos.append((t, h, w))
                spgs.append(float(rng.choice(spg_choices)))
                row += seg(VID, t, h, w, merge)
            row += list(rng.integers(0, 1000, rng.integers(0, 4)))
        rows.append(row)
    L = max(len(r) for r in rows) + int(rng.integers(0, 3))
    ids = np.full((batch, L), PAD_ID, dtype=np.int64)
    mask = np.zeros((batch, L), dtype=np.int64)
    for b, r in enumerate(rows):
        if rng.random() < 0.5:  # left padding
            ids[b, L - len(r):], mask[b, L - len(r):] = r, 1
        else:
            ids[b, :len(r)], mask[b, :len(r)] = r, 1
    img = np.array(images, dtype=np.int64).reshape(-1, 3) if images else None
    vid = np.array(videos, dtype=np.int64).reshape(-1, 3) if videos else None
    spg = np.array(spgs, dtype=np.float32) if videos else None
    return ids, mask, img, vid, spg


def _t(x, dtype=torch.long):
    return None if x is None else torch.tensor(x, dtype=dtype)


# --------------------------------------------------------------------------------------
# Stock layout
# --------------------------------------------------------------------------------------
def test_hand_checked_video():
    # 3 text tokens, a video t=2, h=w=4 (merge 2 -> 2x2 per temporal patch), spg=1.0, tps=2.
    # text a b c       -> 0 1 2;  <|vision_start|> -> 3
    # vision base = text_len + st_idx = 4 + 0 = 4
    #   temporal k=0: floor(0*1.0*2) = 0 -> 4 ; k=1: floor(1*1.0*2) = 2 -> 6
    #   t: 4 4 4 4 6 6 6 6   h: 4 4 5 5 4 4 5 5   w: 4 5 4 5 4 5 4 5     (max = 6)
    # <|vision_end|> -> 7;  text d e -> 8 9.   rope_delta = 9 + 1 - 15 = -5
    ids = [11, 12, 13] + seg(VID, 2, 4, 4) + [14, 15]
    pos, delta = rope_index(np.array([ids]), None, None, [[2, 4, 4]], [1.0], tokens_per_second=2)
    expected = np.array([
        [0, 1, 2, 3, 4, 4, 4, 4, 6, 6, 6, 6, 7, 8, 9],
        [0, 1, 2, 3, 4, 4, 5, 5, 4, 4, 5, 5, 7, 8, 9],
        [0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 4, 5, 7, 8, 9],
    ])
    assert pos.dtype == np.int32 and delta.dtype == np.int32
    np.testing.assert_array_equal(pos[:, 0], expected)
    np.testing.assert_array_equal(delta, [-5])
    # [L] input is treated as one row
    pos1, delta1 = rope_index(np.array(ids), None, None, [[2, 4, 4]], [1.0])
    assert pos1.shape == (3, 1, 15)
    np.testing.assert_array_equal(pos1, pos)
    np.testing.assert_array_equal(delta1, delta)
    np.testing.assert_array_equal(decode_start(pos), [10])


def test_hand_checked_image_then_text():
    # image t=1, h=4, w=8 -> 2x4 grid; images have no temporal spread.
    # a -> 0; vs -> 1; grid base 2: t all 2, h 2 2 2 2 3 3 3 3, w 2 3 4 5 2 3 4 5 (max 5)
    # ve -> 6; b -> 7
    ids = [11] + seg(IMG, 1, 4, 8) + [12]
    pos, delta = rope_index(np.array([ids]), None, [[1, 4, 8]])
    expected = np.array([
        [0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 6, 7],
        [0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 6, 7],
        [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7],
    ])
    np.testing.assert_array_equal(pos[:, 0], expected)
    np.testing.assert_array_equal(delta, [8 - 12])


@pytest.mark.parametrize("tps", [2, 25])
@pytest.mark.parametrize("seed", range(6))
def test_matches_original_algorithm(seed, tps):
    rng = np.random.default_rng(seed)
    ids, mask, img, vid, spg = random_batch(rng, batch=4)
    if img is None and vid is None:
        pytest.skip("no vision drawn")
    ref_pos, ref_delta = original_get_rope_index(
        _t(ids), _t(img), _t(vid), _t(spg, torch.float32), _t(mask), tokens_per_second=tps)
    pos, delta = rope_index(ids, mask, img, vid, spg, tokens_per_second=tps)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])
    # where generation continues: max valid position + 1 (= L + delta for unpadded rows)
    full = mask.all(axis=1)
    np.testing.assert_array_equal(decode_start(pos, mask)[full], (ids.shape[1] + delta)[full])


def test_float32_temporal_rounding_matches_torch():
    # k * spg * tps in float32 is not the exact product: e.g. 3 * float32(1/3) * 25 and
    # 5 * float32(0.3) * 2 land a hair off an integer; our truncation must follow torch's.
    for spg in (1 / 3, 2 / 3, 0.3, 0.7, 0.1, 2 / 25, 1.7):
        for tps in (2, 25, 3):
            t = 40
            ids = np.array([[7] + seg(VID, t, 2, 2) + [8]])
            ref, _ = original_get_rope_index(
                _t(ids), None, _t([[t, 2, 2]]), _t([spg], torch.float32), tokens_per_second=tps)
            pos, _ = rope_index(ids, None, None, [[t, 2, 2]], [spg], tokens_per_second=tps)
            np.testing.assert_array_equal(pos, ref.numpy(), err_msg=f"spg={spg} tps={tps}")


def test_text_only_rows():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 1]])
    ids = np.where(mask == 1, 5, PAD_ID)
    expected = np.array([[1, 1, 0, 1, 2], [0, 1, 2, 3, 1], [1, 1, 1, 1, 0]])
    tp = text_positions(mask)
    assert tp.shape == (3, 3, 5) and tp.dtype == np.int32
    np.testing.assert_array_equal(tp, np.broadcast_to(expected, (3, 3, 5)))
    pos, delta = rope_index(ids, mask)
    ref_pos, ref_delta = original_get_rope_index(_t(ids), attention_mask=_t(mask))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    # the original's quirk: the 1-token row's delta counts the padded slots' 1 -> 2 - 5
    np.testing.assert_array_equal(delta, ref_delta.numpy()[:, 0])
    np.testing.assert_array_equal(delta, [-2, -1, -3])
    np.testing.assert_array_equal(decode_start(pos, mask), [3, 4, 1])
    pos, delta = rope_index(ids[1:2, :4])
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(delta, [0])


def test_text_row_in_vision_batch_and_padding_invariance():
    row = [1, 2] + seg(VID, 3, 4, 6) + [3] + seg(IMG, 1, 2, 2) + [4, 5]
    L = len(row) + 3
    ids = np.full((3, L), PAD_ID)
    mask = np.zeros((3, L), dtype=int)
    ids[0, :len(row)], mask[0, :len(row)] = row, 1  # right padded
    ids[1, 3:], mask[1, 3:] = row, 1  # left padded
    ids[2, :4], mask[2, :4] = [9, 9, 9, 9], 1  # text only
    grids = dict(image_grid_thw=[[1, 2, 2]] * 2, video_grid_thw=[[3, 4, 6]] * 2,
                 second_per_grid_ts=[0.5, 0.5])
    pos, delta = rope_index(ids, mask, **grids)
    alone, alone_delta = rope_index(np.array([row]), None, [[1, 2, 2]], [[3, 4, 6]], [0.5])
    np.testing.assert_array_equal(pos[:, 0, :len(row)], alone[:, 0])
    np.testing.assert_array_equal(pos[:, 1, 3:], alone[:, 0])
    assert (pos[:, 0, len(row):] == 1).all() and (pos[:, 1, :3] == 1).all()
    np.testing.assert_array_equal(pos[:, 2, :4], np.broadcast_to(np.arange(4), (3, 4)))
    np.testing.assert_array_equal(delta[:2], [alone_delta[0] - 3] * 2)
    np.testing.assert_array_equal(delta[2], 4 - L)
    ds = decode_start(pos, mask)
    np.testing.assert_array_equal(ds, [alone.max() + 1, alone.max() + 1, 4])


# --------------------------------------------------------------------------------------
# transformers 5.x (the installed version) changed the layout: document where it differs
# --------------------------------------------------------------------------------------
def hf5_rope_index(ids, img, vid, spg, mask=None, tps=2):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    vision_config = types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=tps)
    stub = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision_config))
    stub.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, stub)
    mm = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
    pos, delta = Qwen2_5_VLModel.get_rope_index(
        stub, _t(ids), _t(mm), _t(img), _t(vid), _t(spg, torch.float32), _t(mask))
    return pos.numpy(), delta.numpy()[:, 0]


def test_transformers5_differs_after_long_video():
    # video t=4, 2x2 merged grid, spg=1, tps=2: temporal reaches base + 6 > spatial base + 1.
    # Original: text after continues at max + 1 = base + 7; 5.x: base + max(h, w)//2 = base + 2.
    ids = np.array([[1, 2] + seg(VID, 4, 4, 4) + [3, 4]])
    ours, _ = rope_index(ids, None, None, [[4, 4, 4]], [1.0])
    hf5, _ = hf5_rope_index(ids, None, [[4, 4, 4]], [1.0])
    n_vis = 4 * 2 * 2
    vis = slice(3, 3 + n_vis)
    # 5.x treats <|vision_start|> as text just like the original: same up to the vision end
    np.testing.assert_array_equal(ours[:, :, :3 + n_vis], hf5[:, :, :3 + n_vis])
    assert ours[0, 0, vis].max() == 3 + 6
    after = slice(3 + n_vis, None)  # <|vision_end|> and the text after it
    np.testing.assert_array_equal(ours[0, 0, after], [10, 11, 12])
    np.testing.assert_array_equal(hf5[0, 0, after], [5, 6, 7])
    # 5.x puts the text after the video *inside* the video's temporal range
    assert hf5[0, 0, after].min() <= ours[0, 0, vis].max()


def test_transformers5_agrees_on_images_and_single_frame_videos():
    # With one temporal patch, max(position) + 1 == base + max(h, w)//merge: both rules agree.
    rows = [
        [1, 2] + seg(IMG, 1, 4, 8) + [3] + seg(VID, 1, 6, 4) + [4] + seg(IMG, 1, 2, 2) + [5],
        [6] + seg(VID, 1, 8, 2) + [7, 8] + seg(IMG, 1, 6, 6) + [9],
    ]
    L = max(len(r) for r in rows)
    rows[1] += [10] * (L - len(rows[1]))  # same length: 5.x's deltas ignore padding
    ids = np.array(rows)
    img, vid, spg = [[1, 4, 8], [1, 2, 2], [1, 6, 6]], [[1, 6, 4], [1, 8, 2]], [0.5, 1 / 3]
    ours, ours_delta = rope_index(ids, None, img, vid, spg)
    hf5, hf5_delta = hf5_rope_index(ids, img, vid, spg)
    np.testing.assert_array_equal(ours, hf5)
    np.testing.assert_array_equal(ours_delta, hf5_delta)


# --------------------------------------------------------------------------------------
# ETA: time-aligned video segments
# --------------------------------------------------------------------------------------
def eta_segment(n_ts: int, t: int = 1, h: int = 4, w: int = 4) -> list[int]:
    """n_ts timestamp text tokens, then one video segment."""
    return [500 + i for i in range(n_ts)] + seg(VID, t, h, w)


def test_eta_hand_checked_two_segments():
    # text A B, segment 0 at t=0.0, segment 1 at t=3.8 (tps=2), 2 timestamp tokens each,
    # each segment one temporal patch of a 2x2 merged grid, then text C D.
    # A B -> 0 1.  P0 = 2.
    # seg 0: tau = 2 + floor(0.0*2) = 2: ts 2 3, vs 4, vision t 2 2 2 2 / h 2 2 3 3 /
    #        w 2 3 2 3, ve 5.
    # seg 1: tau = 2 + floor(3.8*2) = 2 + floor(7.6) = 9 (floor, not round):
    #        ts 9 10, vs 11, vision t 9 9 9 9 / h 2 2 3 3 / w 2 3 2 3, ve 12.
    # C D -> max + 1 = 13 14.  L = 20, rope_delta = 15 - 20 = -5.
    ids = np.array([[1, 2] + eta_segment(2) + eta_segment(2) + [3, 4]])
    pos, delta = rope_index(ids, None, None, [[1, 4, 4], [1, 4, 4]], [1.0, 1.0],
                            tokens_per_second=2, video_segment_times=[0.0, 3.8],
                            timestamp_lengths=[2, 2])
    expected = np.array([
        [0, 1, 2, 3, 4, 2, 2, 2, 2, 5, 9, 10, 11, 9, 9, 9, 9, 12, 13, 14],
        [0, 1, 2, 3, 4, 2, 2, 3, 3, 5, 9, 10, 11, 2, 2, 3, 3, 12, 13, 14],
        [0, 1, 2, 3, 4, 2, 3, 2, 3, 5, 9, 10, 11, 2, 3, 2, 3, 12, 13, 14],
    ])
    np.testing.assert_array_equal(pos[:, 0], expected)
    np.testing.assert_array_equal(delta, [-5])
    np.testing.assert_array_equal(decode_start(pos), [15])


def test_eta_gap_in_time_is_gap_in_position():
    times = [0.0, 1.0, 2.0, 12.5, 13.0]
    ids = np.array([[1] + sum((eta_segment(1) for _ in times), []) + [2]])
    n = len(times)
    kw = dict(video_segment_times=times, timestamp_lengths=[1] * n, tokens_per_second=2)
    pos, _ = rope_index(ids, None, None, [[1, 4, 4]] * n, None, **kw)
    vis_t = pos[0, 0][ids[0] == VID].reshape(n, 4)
    assert (vis_t == vis_t[:, :1]).all()
    p0 = 1
    np.testing.assert_array_equal(vis_t[:, 0], p0 + np.floor(np.array(times) * 2).astype(int))
    steps = np.diff(vis_t[:, 0])
    np.testing.assert_array_equal(steps, [2, 2, 21, 1])
    # spatial coordinates are anchored at P0 for every segment
    vis_h = pos[1, 0][ids[0] == VID].reshape(n, 4)
    np.testing.assert_array_equal(vis_h, np.broadcast_to([1, 1, 2, 2], (n, 4)))


def test_eta_without_timestamp_tokens():
    # n = 0: vision_start takes tau, vision_end tau + 1.
    # x -> 0; P0 = 1.  seg 0: tau 1: vs 1, vision t 1 / h 1 1 2 2 / w 1 2 1 2, ve 2.
    # seg 1 at t=1.5: tau = 1 + 3 = 4: vs 4, vision t 4, ve 5.  y -> 6.
    ids = np.array([[9] + seg(VID, 1, 4, 4) + seg(VID, 1, 4, 4) + [9]])
    pos, delta = rope_index(ids, None, None, [[1, 4, 4]] * 2, None,
                            video_segment_times=[0.0, 1.5])
    expected = np.array([
        [0, 1, 1, 1, 1, 1, 2, 4, 4, 4, 4, 4, 5, 6],
        [0, 1, 1, 1, 2, 2, 2, 4, 1, 1, 2, 2, 5, 6],
        [0, 1, 1, 2, 1, 2, 2, 4, 1, 2, 1, 2, 5, 6],
    ])
    np.testing.assert_array_equal(pos[:, 0], expected)
    np.testing.assert_array_equal(delta, [7 - 14])


def test_eta_two_blocks_in_one_row_and_images_stay_stock():
    # x | block 1: seg t=0 (n=1), seg t=1 (n=1) | y | image 2x2 | z | block 2: seg t=0 (n=2) | w
    # x -> 0; block 1: P0 = 1; seg0 tau 1: ts 1, vs 2, vis t 1 h/w from 1, ve 3;
    #   seg1 tau 1 + 2 = 3: ts 3, vs 4, vis t 3, ve 5.  y -> 6.
    # image: vs 7, grid base 8: t 8 8 8 8, h 8 8 9 9, w 8 9 8 9; ve 10.  z -> 11.
    # block 2: P0 = 12; seg tau 12: ts 12 13, vs 14, vis t 12, h/w from 12, ve 15.  w -> 16.
    row = ([100] + eta_segment(1) + eta_segment(1) + [101] + seg(IMG, 1, 4, 4) + [102]
           + eta_segment(2) + [103])
    ids = np.array([row])
    pos, _ = rope_index(ids, None, [[1, 4, 4]], [[1, 4, 4]] * 3, None,
                        video_segment_times=[0.0, 1.0, 0.0], timestamp_lengths=[1, 1, 2],
                        block_starts=[True, False, True])
    q = [1, 1, 2, 2]  # h offsets of a 2x2 grid from 1; w offsets are 1 2 1 2
    expected_t = ([0] + [1, 2] + [1] * 4 + [3] + [3, 4] + [3] * 4 + [5] + [6]
                  + [7] + [8] * 4 + [10] + [11] + [12, 13, 14] + [12] * 4 + [15, 16])
    expected_h = ([0] + [1, 2] + q + [3] + [3, 4] + q + [5] + [6]
                  + [7] + [8, 8, 9, 9] + [10] + [11] + [12, 13, 14] + [12, 12, 13, 13] + [15, 16])
    expected_w = ([0] + [1, 2] + [1, 2, 1, 2] + [3] + [3, 4] + [1, 2, 1, 2] + [5] + [6]
                  + [7] + [8, 9, 8, 9] + [10] + [11] + [12, 13, 14] + [12, 13, 12, 13] + [15, 16])
    np.testing.assert_array_equal(pos[:, 0], np.array([expected_t, expected_h, expected_w]))
    # without block_starts only the first segment of the row starts a block: the third
    # segment's time 0.0 then maps back to P0 = 1
    pos2, _ = rope_index(ids, None, [[1, 4, 4]], [[1, 4, 4]] * 3, None,
                         video_segment_times=[0.0, 1.0, 0.0], timestamp_lengths=[1, 1, 2])
    assert pos2[0, 0][ids[0] == VID][-1] == 1


def test_eta_multi_patch_segment_and_batch_padding():
    # a segment with t=3 temporal patches at spg=0.5, tps=2: offsets floor(m*0.5*2) = m.
    row_a = [1, 2] + eta_segment(2, t=3) + eta_segment(2) + [3]
    row_b = [4] + eta_segment(1) + [5, 6]
    L = len(row_a) + 2
    ids = np.full((2, L), PAD_ID)
    mask = np.zeros((2, L), dtype=int)
    ids[0, L - len(row_a):], mask[0, L - len(row_a):] = row_a, 1  # left padded
    ids[1, :len(row_b)], mask[1, :len(row_b)] = row_b, 1  # right padded
    vid = [[3, 4, 4], [1, 4, 4], [1, 4, 4]]
    kw = dict(video_segment_times=[0.0, 2.6, 4.0], timestamp_lengths=[2, 2, 1])
    pos, delta = rope_index(ids, mask, None, vid, [0.5, 1.0, 1.0], **kw)
    a, a_delta = rope_index(np.array([row_a]), None, None, vid[:2], [0.5, 1.0],
                            video_segment_times=[0.0, 2.6], timestamp_lengths=[2, 2])
    b, b_delta = rope_index(np.array([row_b]), None, None, vid[2:], [1.0],
                            video_segment_times=[4.0], timestamp_lengths=[1])
    np.testing.assert_array_equal(pos[:, 0, L - len(row_a):], a[:, 0])
    np.testing.assert_array_equal(pos[:, 1, :len(row_b)], b[:, 0])
    assert (pos[:, 0, :L - len(row_a)] == 1).all() and (pos[:, 1, len(row_b):] == 1).all()
    np.testing.assert_array_equal(delta, [a_delta[0] - 2, b_delta[0] - (L - len(row_b))])
    # row a: P0 = 2, tau0 = 2; patches at 2, 3, 4 (4 tokens each); seg 1 tau = 2 + 5 = 7
    vis_t = a[0, 0][np.array(row_a) == VID]
    np.testing.assert_array_equal(vis_t, [2] * 4 + [3] * 4 + [4] * 4 + [7] * 4)
    # row b is its own block: P0 = 1, tau = 1 + 8 = 9: ts 9, vs 10, ve 11, text 12 13
    np.testing.assert_array_equal(b[0, 0], [0, 9, 10, 9, 9, 9, 9, 11, 12, 13])
    np.testing.assert_array_equal(decode_start(pos, mask), [a.max() + 1, 14])


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
def test_pad_count_mismatch_raises():
    ids = np.array([[1] + seg(VID, 2, 4, 4) + [2]])
    with pytest.raises(ValueError, match=r"row 0: video item 0 .* has 8 video pad tokens but "
                                         r"the grid needs t\*h\*w/merge\^2 = 12"):
        rope_index(ids, None, None, [[3, 4, 4]])
    good, bad = [1] + seg(IMG, 1, 4, 4), [3] + seg(IMG, 1, 4, 4)[:-2] + [VE]
    ids = np.array([good, bad + [PAD_ID]])
    mask = np.array([[1] * len(good), [1] * len(bad) + [0]])
    with pytest.raises(ValueError, match=r"row 1: image item 0 .* has 3 image pad tokens"):
        rope_index(ids, mask, [[1, 4, 4]] * 2)


def test_grid_count_mismatch_raises():
    ids = np.array([[1] + seg(IMG, 1, 2, 2) + seg(IMG, 1, 2, 2)])
    with pytest.raises(ValueError, match=r"row 0: image item 1 .* only 1 image grid"):
        rope_index(ids, None, [[1, 2, 2]])
    with pytest.raises(ValueError, match=r"image_grid_thw has 3 entries but the batch holds "
                                         r"only 2"):
        rope_index(ids, None, [[1, 2, 2]] * 3)
    with pytest.raises(ValueError, match="stray pads"):
        rope_index(np.array([[1, IMG] + seg(IMG, 1, 2, 2)]), None, [[1, 2, 2]])
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 entries"):
        rope_index(np.array([[1] + seg(VID, 1, 2, 2)]), None, None, [[1, 2, 2]], [1.0, 1.0])


def test_eta_errors():
    ids = np.array([[1] + eta_segment(1)])
    with pytest.raises(ValueError, match=r"claims 3 timestamp tokens .* only 2 text tokens"):
        rope_index(ids, None, None, [[1, 4, 4]], video_segment_times=[0.0],
                   timestamp_lengths=[3])
    with pytest.raises(ValueError, match="video_segment_times has 2 entries"):
        rope_index(ids, None, None, [[1, 4, 4]], video_segment_times=[0.0, 1.0])
    with pytest.raises(ValueError, match="first segment but block_starts"):
        rope_index(ids, None, None, [[1, 4, 4]], video_segment_times=[0.0],
                   block_starts=[False])
