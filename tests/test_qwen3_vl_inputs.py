"""Qwen3-VL host-side inputs against transformers (torch, CPU):

* positions: `tempo_jax.models.qwen3_vl.positions.rope_index` against a tiny random
  `Qwen3VLModel.get_rope_index` (transformers 5.x: valid positions equal, deltas and padded
  slots in the documented released convention) and against the released algorithm (the
  transformers 4.49 Qwen2.5-VL transcription in test_positions, which is the 4.57 Qwen3-VL code
  once every grid has t = 1), arrays equal in full;
* prompt: `build_prompt(family="qwen3_vl")` token ids against `Qwen3VLProcessor` (offline
  tokenizer, `Qwen3VLVideoProcessor`) for the same frames and SAA-like non-uniform frame times;
* patches: `process_video` with Qwen3-VL's `PatchSpec` against `Qwen3VLVideoProcessor` on
  frames already at the target size (its resize needs torchvision, absent here: a stand-in for
  `torchvision`'s `normalize`, sub then div, is the only piece patched in), bit for bit;
  `smart_resize_video` against transformers' qwen3_vl `smart_resize`.
"""

from __future__ import annotations

import importlib
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hf_q3 = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")
# the module itself: transformers' lazy package hands out a torchvision-guarded placeholder
hf_vp = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")

from test_positions import original_get_rope_index  # noqa: E402
from transformers import Qwen3VLConfig  # noqa: E402
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

from tempo_jax.data import pipeline  # noqa: E402
from tempo_jax.data import processor as P  # noqa: E402
from tempo_jax.data.prompts import (  # noqa: E402
    PromptConfig,
    build_prompt,
    format_answer,
    load_tokenizer,
    question_text,
)
from tempo_jax.models.qwen3_vl.positions import decode_start, rope_index  # noqa: E402

VS, VE, IMG, VID, PAD = 151652, 151653, 151655, 151656, 151643
Q3 = PromptConfig(time_aligned_positions=False)  # Qwen3-VL positions carry no time


@pytest.fixture(scope="module")
def hf_model():
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=151680, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, rope_scaling={"rope_type": "default",
                                                   "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=16, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
    )
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (IMG, VID, VS)
    return hf_q3.Qwen3VLModel(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def torchvision_normalize(monkeypatch):
    """transformers' torch processors call `torchvision...functional.normalize`; this is its
    tensor code (cast mean/std to the image dtype, view as [C, 1, 1], subtract, divide)."""
    import transformers.image_processing_backends as backends

    def normalize(image, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        image = image.sub_(mean) if inplace else image.sub(mean)
        return image.div_(std)

    monkeypatch.setattr(backends, "tvF", types.SimpleNamespace(normalize=normalize),
                        raising=False)


def hf_rope(model, ids, mask=None, img=None, vid=None):
    ids_t = torch.tensor(ids, dtype=torch.long)
    types_ = torch.tensor(np.where(ids == IMG, 1, np.where(ids == VID, 2, 0)))
    pos, delta = model.get_rope_index(
        ids_t, types_,
        image_grid_thw=None if img is None else torch.tensor(img),
        video_grid_thw=None if vid is None else torch.tensor(vid),
        attention_mask=None if mask is None else torch.tensor(mask))
    return pos.numpy(), delta.numpy()


def frame_block(n_tokens: int, stamp: list[int]) -> list[int]:
    """A Qwen3-VL temporal patch: timestamp text, then its vision segment."""
    return stamp + [VS] + [VID] * n_tokens + [VE]


def video_row(grid, rng: np.random.Generator) -> list[int]:
    t, h, w = grid
    out: list[int] = []
    for _ in range(t):
        out += frame_block(h * w // 4, [int(v) for v in rng.integers(10, 900, rng.integers(3, 7))])
    return out


def pad_batch(rows: list[list[int]], left: list[bool], extra: int = 0):
    L = max(len(r) for r in rows) + extra
    ids = np.full((len(rows), L), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), L), dtype=np.int64)
    for b, (r, lft) in enumerate(zip(rows, left, strict=True)):
        sl = slice(L - len(r), L) if lft else slice(0, len(r))
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask


def check_against_both(model, ids, mask, img, vid):
    """Ours == released algorithm (full arrays); == transformers 5.x on valid tokens, with its
    deltas counted from the valid length; generation continues at the same position."""
    pos, delta = rope_index(ids, mask, img, vid)
    assert pos.dtype == np.int32 and pos.shape == (3, *ids.shape) and delta.shape == (len(ids), 1)
    split = None if vid is None else np.repeat(np.asarray(vid), np.asarray(vid)[:, 0], 0)
    if split is not None:
        split[:, 0] = 1
    t = (lambda x: None if x is None else torch.tensor(x))
    ref_pos, ref_delta = original_get_rope_index(t(ids), t(img), t(split), None, t(mask))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())
    hf_pos, hf_delta = hf_rope(model, ids, mask, img, vid)
    valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    for b in range(len(ids)):
        np.testing.assert_array_equal(pos[:, b, valid[b]], hf_pos[:, b, valid[b]])
    assert (pos[:, ~valid] == 1).all()
    n_valid = valid.sum(1)
    np.testing.assert_array_equal(delta[:, 0] + ids.shape[1], hf_delta[:, 0] + n_valid)
    np.testing.assert_array_equal(decode_start(pos, valid), hf_delta[:, 0] + n_valid)
    return pos


# ----------------------------------------------------------------------------- positions


def test_positions_named_cases(hf_model):
    rng = np.random.default_rng(0)
    image = [11, 12, VS] + [IMG] * 6 + [VE, 13]  # grid (1, 4, 6)
    one_video = [11, 12] + video_row((3, 4, 4), rng) + [13, 14]
    # video A, an image, video B, text between
    mixed = ([11] + video_row((2, 2, 4), rng) + [12, VS] + [IMG] * 6 + [VE]
             + video_row((3, 4, 2), rng) + [13, 14, 15])
    cases = [  # (rows, left padded?, image grids, video grids)
        ([image], [False], [[1, 4, 6]], None),
        ([one_video], [False], None, [[3, 4, 4]]),
        ([mixed], [False], [[1, 4, 6]], [[2, 2, 4], [3, 4, 2]]),
        ([mixed, image, one_video], [False, False, False], [[1, 4, 6], [1, 4, 6]],
         [[2, 2, 4], [3, 4, 2], [3, 4, 4]]),  # right padding
        ([mixed, image, one_video], [True, True, True], [[1, 4, 6], [1, 4, 6]],
         [[2, 2, 4], [3, 4, 2], [3, 4, 4]]),  # left padding
        ([one_video, [5, 6, 7], image], [True, False, True], [[1, 4, 6]], [[3, 4, 4]]),
    ]
    for rows, left, img, vid in cases:
        ids, mask = pad_batch(rows, left, extra=2)
        check_against_both(hf_model, ids, mask, img, vid)
    # unpadded, no mask: deltas identical in both conventions
    ids = np.array([mixed])
    pos = check_against_both(hf_model, ids, None, [[1, 4, 6]], [[2, 2, 4], [3, 4, 2]])
    # a video given whole (T, h, w) or split into frames (1, h, w): the same positions
    split = rope_index(ids, None, [[1, 4, 6]], [[1, 2, 4]] * 2 + [[1, 4, 2]] * 3)[0]
    np.testing.assert_array_equal(pos, split)


def test_positions_random_batches(hf_model):
    rng = np.random.default_rng(1)
    for _ in range(6):
        rows, images, videos = [], [], []
        for _ in range(3):
            row = [int(v) for v in rng.integers(10, 900, rng.integers(1, 4))]
            for _ in range(rng.integers(0, 4)):
                h, w = (2 * int(v) for v in rng.integers(1, 4, 2))
                if rng.random() < 0.3:
                    images.append([1, h, w])
                    row += [VS] + [IMG] * (h * w // 4) + [VE]
                else:
                    videos.append([int(rng.integers(1, 5)), h, w])
                    row += video_row(videos[-1], rng)
                row += [int(v) for v in rng.integers(10, 900, rng.integers(0, 3))]
            rows.append(row)
        ids, mask = pad_batch(rows, list(rng.random(3) < 0.5), extra=int(rng.integers(0, 3)))
        check_against_both(hf_model, ids, mask, images or None, videos or None)


def test_text_only_positions(hf_model):
    ids, mask = pad_batch([[5, 6, 7, 8], [9], [1, 2]], [True, False, True], extra=1)
    pos, delta = rope_index(ids, mask)
    ref_pos, ref_delta = original_get_rope_index(torch.tensor(ids),
                                                 attention_mask=torch.tensor(mask))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())
    hf_pos, hf_delta = hf_rope(hf_model, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], hf_pos[:, valid])
    np.testing.assert_array_equal(hf_delta, 0)  # 5.x: always 0 on text; released: see above
    np.testing.assert_array_equal(decode_start(pos, mask), valid.sum(1))
    pos, delta = rope_index(ids[:1, 1:])  # no mask: 0..L-1, delta 0 (both conventions)
    np.testing.assert_array_equal(pos[0, 0], np.arange(4))
    np.testing.assert_array_equal(delta, [[0]])


def test_position_errors():
    with pytest.raises(ValueError, match="t = 1"):
        rope_index(np.array([[VS] + [IMG] * 8 + [VE]]), None, [[2, 4, 4]])
    with pytest.raises(ValueError, match="pad tokens"):  # a video's frames must be separated
        rope_index(np.array([[VS] + [VID] * 8 + [VE]]), None, None, [[2, 4, 4]])


# ----------------------------------------------------------------------------- prompt


def _hf_processor(tok, monkeypatch):
    # transformers checks the sub-processors' classes against auto mappings that need
    # torchvision; the check is skipped, the processing is transformers' own.
    monkeypatch.setattr(Qwen3VLProcessor, "check_argument_for_proper_class",
                        lambda self, name, arg: None)
    return Qwen3VLProcessor(image_processor=None, tokenizer=tok,
                            video_processor=hf_vp.Qwen3VLVideoProcessor())


def _hf_inputs(proc, text, frames, fps, indices):
    md = VideoMetadata(total_num_frames=int(max(indices)) + 1, fps=fps, frames_indices=indices)
    return proc(text=[text], videos=[frames], video_metadata=[md], do_sample_frames=False,
                do_resize=False, do_convert_rgb=False, cap_pixels_per_frame=False,
                return_tensors="np")


@pytest.mark.parametrize("query_first", [False, True])
def test_prompt_matches_qwen3_processor(tok, hf_model, torchvision_normalize, monkeypatch,
                                        query_first):
    proc = _hf_processor(tok, monkeypatch)
    rng = np.random.default_rng(2)
    # 7 frames at 64x96 (grid 4 x 4 x 6, 6 tokens per temporal patch), SAA-like times: pairs
    # close together, uneven gaps, at a non-integer native rate; the odd count pads the last
    fps = 29.97
    indices = [0, 4, 31, 35, 142, 146, 367]
    frames = rng.integers(0, 256, (7, 64, 96, 3), dtype=np.uint8)
    cfg = PromptConfig(time_aligned_positions=False, query_first=query_first)
    answer = format_answer((1.2, 4.8), cfg)
    q = question_text("a dog runs", cfg)
    block = "<|video_pad|>"  # the released processor's layout (see prompts.build_prompt)
    user = f"{q}\n{block}" if query_first else f"{block}{q}"
    text = (f"<|im_start|>system\n{cfg.system_prompt}<|im_end|>\n<|im_start|>user\n{user}"
            f"<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>")
    ref = _hf_inputs(proc, text, frames, fps, indices)

    spec = P.patch_spec(types.SimpleNamespace(family="qwen3_vl"))
    pixels, grids = P.process_segments(frames, None, **spec.as_kwargs())
    times = P.temporal_patch_times(np.asarray(indices) / fps, 2)
    ours = build_prompt(tok, "a dog runs", times, grids, cfg, answer=answer, family="qwen3_vl")

    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"][0])
    np.testing.assert_array_equal(times, proc._calculate_timestamps(list(indices), fps, 2))
    assert "<0.1 seconds><|vision_start|>" in tok.decode(ours["input_ids"].tolist())
    np.testing.assert_array_equal(pixels, ref["pixel_values_videos"])  # bit for bit
    np.testing.assert_array_equal(grids, [[1, 4, 6]] * 4)
    np.testing.assert_array_equal(ref["video_grid_thw"], [[4, 4, 6]])
    hf_pos, _ = hf_rope(hf_model, ref["input_ids"], None, None, ref["video_grid_thw"])
    np.testing.assert_array_equal(ours["position_ids"], hf_pos[:, 0])
    assert ours["timestamp_lengths"].tolist() == [
        len(tok.encode(f"<{t:.1f} seconds>", add_special_tokens=False)) for t in times]
    np.testing.assert_array_equal(ours["segment_times"], times)


def test_prompt_family_settings(tok):
    grids = [(1, 4, 4)] * 2
    with pytest.raises(ValueError, match="time_aligned_positions=True does not apply"):
        build_prompt(tok, "q", [0.0, 1.0], grids, PromptConfig(), family="qwen3_vl")
    with pytest.raises(ValueError, match="unknown model family"):
        build_prompt(tok, "q", [0.0, 1.0], grids, PromptConfig(), family="qwen9")
    # the default timestamp format means the family's own; an explicit one is kept
    q25 = build_prompt(tok, "q", [0.0, 1.0], grids, PromptConfig())
    assert "1.0s<|vision_start|>" in tok.decode(q25["input_ids"].tolist())
    q3 = tok.decode(build_prompt(tok, "q", [0.0, 1.0], grids, Q3, family="qwen3_vl")
                    ["input_ids"].tolist())
    assert "<1.0 seconds><|vision_start|>" in q3 and "1.0s" not in q3
    custom = PromptConfig(time_aligned_positions=False, timestamp_format="[{t:.2f}]")
    assert "[1.00]<|vision_start|>" in tok.decode(
        build_prompt(tok, "q", [0.0, 1.0], grids, custom, family="qwen3_vl")["input_ids"].tolist())
    # no timestamp text: consecutive segments, positions still Qwen3-VL's
    bare = build_prompt(tok, "q", [0.0, 1.0], grids,
                        PromptConfig(time_aligned_positions=False, textual_timestamps=False),
                        family="qwen3_vl")
    assert "seconds>" not in tok.decode(bare["input_ids"].tolist())
    assert bare["timestamp_lengths"].tolist() == [0, 0]
    np.testing.assert_array_equal(
        bare["position_ids"], rope_index(bare["input_ids"], None, None, grids)[0][:, 0])


def test_pipeline_uses_the_family(tok):
    """`with_query` (the text half of `load_example`) on a Qwen3-VL vision config: patch
    times are the frames' means, the block and positions Qwen3-VL's; a Qwen3-VL config with
    time-aligned positions is refused when the loader is made, not per example."""
    q3_config = pytest.importorskip("tempo_jax.models.qwen3_vl.config")
    vision = q3_config.VisionConfig()
    assert P.vision_family(vision) == "qwen3_vl"
    assert P.patch_spec(vision) == P.PatchSpec(16, 2, 2, P.HALF_MEAN, P.HALF_STD, True)
    from tempo_jax.models.qwen2_5_vl.config import VisionConfig as Q25Vision

    assert P.vision_family(Q25Vision()) == "qwen2_5_vl"
    assert P.patch_spec(Q25Vision()) == P.PatchSpec()
    cfg = pipeline.PipelineConfig(prompt=Q3, with_answer=False)
    frame_times = np.array([0.0, 0.25, 3.0, 3.1])
    ex = {"frame_times": frame_times, "video_grid_thw": np.array([[1, 4, 4]] * 2), "caption": None}
    got = pipeline.with_query(ex, "a cat", tok, cfg, vision)
    want = build_prompt(tok, "a cat", [0.125, 3.05], [[1, 4, 4]] * 2, Q3, family="qwen3_vl")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(got["position_ids"], want["position_ids"])
    with pytest.raises(ValueError, match="time_aligned_positions"):
        pipeline.LoadExample("/nonexistent", pipeline.PipelineConfig(), vision)
    # a batch gets Qwen3-VL's vision metadata (no windows; learned-position taps)
    ex = {**got, "pixel_values": np.zeros((32, vision.patch_dim), np.float32), "qid": "0",
          "video": "v", "windows": [], "duration": 4.0, "relevant": False}
    batch = pipeline.collate([ex], cfg, vision)
    assert "pos_index" in batch["vision_meta"] and "win_index" not in batch["vision_meta"]
    np.testing.assert_array_equal(batch["position_ids"][:, 0, :len(want["input_ids"])],
                                  want["position_ids"])


# ----------------------------------------------------------------------------- patches


def test_video_processor_matches_transformers(torchvision_normalize):
    rng = np.random.default_rng(3)
    vp = hf_vp.Qwen3VLVideoProcessor()
    spec = P.patch_spec(types.SimpleNamespace(family="qwen3_vl"))
    assert (spec.patch_size, spec.temporal_patch_size, spec.merge_size, spec.factor) == (
        vp.patch_size, vp.temporal_patch_size, vp.merge_size, 32)
    assert spec.mean == tuple(vp.image_mean) and spec.std == tuple(vp.image_std)
    videos = [rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
              for t, h, w in [(4, 64, 96), (5, 32, 128), (2, 96, 32)]]
    ref = vp(videos=videos, do_resize=False, do_convert_rgb=False, do_sample_frames=False,
             cap_pixels_per_frame=False, return_tensors="np")
    ours = [P.process_video(v, None, **spec.as_kwargs()) for v in videos]
    np.testing.assert_array_equal(np.concatenate([o["pixel_values_videos"] for o in ours]),
                                  ref["pixel_values_videos"])
    np.testing.assert_array_equal(np.concatenate([o["video_grid_thw"] for o in ours]),
                                  ref["video_grid_thw"])
    # every level of every channel: (x - 127.5) / 127.5 in float32, exactly
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))
    np.testing.assert_array_equal(
        P.normalize(levels, mean=spec.mean, std=spec.std, fused_rescale=True)[:, 0],
        (np.arange(256, dtype=np.float32) - np.float32(127.5)) / np.float32(127.5))


def test_smart_resize_video_matches_transformers():
    rng = np.random.default_rng(4)
    bounds = [(P.QWEN3_VL_VIDEO_MIN_PIXELS, P.QWEN3_VL_VIDEO_MAX_PIXELS),
              (128 * 32 * 32, 768 * 32 * 32), (4 * 1024, 64 * 1024), (112 * 112, 16 * 1024 ** 2)]
    n = 0
    for i in range(400):
        t = int(rng.integers(1, 300))
        h, w = (int(v) for v in rng.integers(1, 3000, 2))
        lo, hi = bounds[i % len(bounds)]
        try:
            want = hf_vp.smart_resize(t, h, w, temporal_factor=2, factor=32, min_pixels=lo,
                                      max_pixels=hi)
        except ValueError:
            with pytest.raises(ValueError):
                P.smart_resize_video(t, h, w, 2, 32, lo, hi)
            continue
        assert P.smart_resize_video(t, h, w, 2, 32, lo, hi) == want, (t, h, w, lo, hi)
        n += 1
    assert n >= 300
    assert P.smart_resize_video(16, 360, 640) == hf_vp.smart_resize(
        16, 360, 640, factor=32, min_pixels=4096, max_pixels=25165824)
    # tiny frames are scaled up to the factor first
    assert P.smart_resize_video(8, 10, 20, 2, 32, 4096, 65536) == hf_vp.smart_resize(
        8, 10, 20, 2, 32, 4096, 65536)


def test_temporal_patch_times_matches_processor(tok, monkeypatch):
    proc = _hf_processor(tok, monkeypatch)
    rng = np.random.default_rng(5)
    for n in (1, 2, 5, 8):
        idx = sorted(int(v) for v in rng.choice(500, n, replace=False))
        for fps in (24.0, 29.97, 2.0):
            np.testing.assert_array_equal(P.temporal_patch_times(np.asarray(idx) / fps, 2),
                                          proc._calculate_timestamps(list(idx), fps, 2))


# ----------------------------------------------------------------------------- end to end

E2E_SAA = {"max_visual_tokens": 48, "min_pixels": 4 * 28 * 28, "max_frames": 16}
E2E_RECORD = {"video": "clip.mp4", "query": "a red circle", "windows": [[1.0, 2.0]], "qid": "0"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A 4 s synthetic mp4 at 90x120: neither 28- nor 32-aligned."""
    from tempo_jax.data.synthetic import SyntheticSpec, make_video

    root = tmp_path_factory.mktemp("q3clip")
    spec = SyntheticSpec(num=1, seed=1, width=120, height=90, min_duration=4.0,
                         max_duration=4.0)
    make_video(root / E2E_RECORD["video"], np.random.default_rng(1), spec)
    return root


def test_load_example_end_to_end(clip_dir):
    """`pipeline.load_example` on a real mp4 with a Qwen3-VL vision config: SAA sizes frames
    in multiples of 32, 16-pixel patches, one (1, h, w) grid per temporal patch, `<t seconds>`
    texts at the mean of each patch's real frame times, and Qwen3-VL's positions of those
    ids."""
    from tempo_jax.data.saa import SAAConfig
    from tempo_jax.data.sources import VideoIndex
    from tempo_jax.models.qwen3_vl.config import VisionConfig

    cfg = pipeline.PipelineConfig(saa=SAAConfig(**E2E_SAA), prompt=Q3)
    tok3 = load_tokenizer(None, family="qwen3_vl")
    ex = pipeline.load_example(E2E_RECORD, VideoIndex(clip_dir), tok3, cfg, VisionConfig(),
                               keep_frames=True)

    frames, grids, pts = ex["frames"], ex["video_grid_thw"], np.asarray(ex["frame_times"])
    assert frames.shape[1:3] == (96, 128)  # Qwen2.5-VL's factor would give 84 x 112
    assert len(pts) == frames.shape[0] and len(pts) % 2 == 0 and len(pts) >= 4
    np.testing.assert_array_equal(grids, [[1, 96 // 16, 128 // 16]] * (len(pts) // 2))
    assert ex["pixel_values"].shape == (int(grids.prod(1).sum()), 3 * 2 * 16 * 16)
    means = (pts[0::2] + pts[1::2]) / 2
    np.testing.assert_array_equal(ex["segment_times"], means)
    text = tok3.decode(ex["input_ids"].tolist())
    stamps = [s.split(" seconds>")[0] for s in text.split("<")[1:] if " seconds>" in s]
    assert stamps == [f"{t:.1f}" for t in means]
    assert text.count("seconds><|vision_start|>") == len(means)
    pos, _ = rope_index(ex["input_ids"][None], video_grid_thw=grids)
    np.testing.assert_array_equal(ex["position_ids"], pos[:, 0])


def test_hf_prepare_inputs_reads_the_family(clip_dir, tmp_path):
    """`tempo_jax.hf` on a Qwen3-VL export: the family comes from its config.json, so the
    inputs are `load_example`'s with Qwen3-VL's geometry and offline tokenizer."""
    import json

    from tempo_jax import hf
    from tempo_jax.data.sources import VideoIndex
    from tempo_jax.models.qwen3_vl.config import VisionConfig, preset

    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_hf_dict()))
    settings = {"saa": E2E_SAA, "prompt": {"time_aligned_positions": False}}
    (tmp_path / hf.SETTINGS_FILE).write_text(json.dumps(settings))
    settings = hf.load_settings(tmp_path)
    assert settings["vision"] == {"family": "qwen3_vl", "patch_size": 16,
                                  "temporal_patch_size": 2, "spatial_merge_size": 2}
    out = hf.prepare_inputs(clip_dir / E2E_RECORD["video"], E2E_RECORD["query"], settings,
                            return_tensors="np")
    assert len(hf._tokenizer(settings)) == 151669  # Qwen3's, not Qwen2.5's 151665
    ex = pipeline.load_example(E2E_RECORD, VideoIndex(clip_dir),
                               load_tokenizer(None, family="qwen3_vl"),
                               hf.pipeline_config(settings), VisionConfig())
    assert out["pixel_values_videos"].shape[1] == 1536
    np.testing.assert_array_equal(out["pixel_values_videos"], ex["pixel_values"])
    np.testing.assert_array_equal(out["input_ids"][0], ex["input_ids"])
    np.testing.assert_array_equal(out["position_ids"][:, 0], ex["position_ids"])
