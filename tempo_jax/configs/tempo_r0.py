"""Tempo-R0: SFT then PIR-GRPO on a Qwen2.5-VL backbone (the default) or a Qwen3-VL one.

    python -m tempo_jax.train --config configs/tempo_r0.py:tiny   # CPU demo, synthetic videos
    python -m tempo_jax.train --config configs/tempo_r0.py:7b --config.rl.beta=0 \\
        --config.model.init_checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct --config.data.train=...
    python -m tempo_jax.train --config configs/tempo_r0.py:qwen3_vl_8b \\
        --config.model.init_checkpoint=/ckpt/Qwen3-VL-8B-Instruct --config.data.train=...

One schema for every size; each field is documented where it is set.
"""

from __future__ import annotations

import ml_collections

from tempo_jax.data.prompts import DEFAULT_QUESTION, DEFAULT_SYSTEM

SIZES = ("tiny", "3b", "7b", "qwen3_vl_tiny", "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in SIZES:
        raise ValueError(f"config argument must be one of {', '.join(SIZES)}, got {arg!r}")
    qwen3 = arg.startswith("qwen3_vl_")
    tiny = arg in ("tiny", "qwen3_vl_tiny")
    c = ml_collections.ConfigDict()
    c.size = arg
    c.stages = "sft,grpo"  # comma-separated, run in order; resume continues the current stage
    c.seed = 0

    # ------------------------------------------------------------------ model
    c.model = ml_collections.ConfigDict()
    # tempo_jax.models.families presets: tiny/3b/7b (Qwen2.5-VL), qwen3_vl_{tiny,2b,4b,8b,32b}
    c.model.preset = arg
    # HF checkpoint dir to start from (its config.json's model_type picks the family);
    # "" = random init of the preset (tiny)
    c.model.init_checkpoint = ""
    # a random start's initialisation (no init_checkpoint): hf = the model's own std 0.02,
    # width = std 1/sqrt(fan-in) per matrix, width_residual = width and GPT-2's
    # 1/sqrt(2 x depth) on residual output projections (tempo_jax.models.init)
    c.model.init_scale = "hf"
    c.model.dtype = "float32" if tiny else "bfloat16"  # parameter and compute dtype
    # xla | cudnn (GPU) | splash (TPU) | auto (splash on TPU, cudnn on GPU, xla on CPU)
    c.model.attention_backend = "xla" if tiny else "auto"
    c.model.remat = "none" if tiny else "full"  # none | full | dots
    # the decoder's layers stacked [L, ...] and run by lax.scan: one layer compiled instead of
    # L (compile time independent of depth); HF checkpoints load and export either way, an
    # Orbax checkpoint restores only with the layout it was saved with
    c.model.scan_layers = not tiny
    c.model.freeze_vision = not tiny  # the open TVG recipes freeze the vision tower
    c.model.tiny_overrides = ml_collections.ConfigDict()  # tiny only: wider/deeper demo model
    c.model.tiny_overrides.hidden_size = 128
    c.model.tiny_overrides.num_hidden_layers = 4
    c.model.tiny_overrides.num_attention_heads = 4
    c.model.tiny_overrides.intermediate_size = 256
    c.model.tiny_vision_overrides = ml_collections.ConfigDict()  # tiny only: the vision tower
    if not qwen3:  # (Qwen3-VL's tiny tower is already 64 wide with its learned positions)
        c.model.tiny_vision_overrides.hidden_size = 32
        c.model.tiny_vision_overrides.intermediate_size = 64

    # ------------------------------------------------------------------ data
    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic" if tiny else "qvhighlights"  # synthetic|qvhighlights|charades|jsonl
    c.data.train = ""  # annotation file (synthetic: generated under workdir/data)
    c.data.val = ""
    c.data.video_root = ""
    c.data.charades_durations = ""  # Charades_v1_{split}.csv for source=charades
    c.data.synthetic_train = 384  # synthetic videos for training (tiny)
    c.data.synthetic_val = 48  # held-out synthetic videos for evaluation
    c.data.synthetic_min_duration = 10.0  # seconds
    c.data.synthetic_max_duration = 16.0
    c.data.synthetic_min_event = 0.12  # event length as a fraction of the video
    c.data.synthetic_max_event = 0.35  # (short events: a constant window scores poorly)
    # objects per video, each its own event and query: with two, finding the asked one needs
    # its colour, the skill refusing needs (with one, what moves and when answers); the tiny
    # model learns neither within the demo's budget, so the demo keeps one
    c.data.synthetic_max_events = 1
    c.data.synthetic_distractor_prob = 0.0  # an extra object that is never asked about
    # (ours) how the demo's videos look: the refusal cue (the object's colour) must survive
    # the tiny token budget. 112x56 frames are halved exactly to 28x56 (2 merged tokens);
    # objects of radius 0.25 * 56 px fill most of a 14x14 patch; a neutral background (tint 0)
    # and the six hues 60 degrees apart (no white) leave every patch's hue to the object
    c.data.synthetic_width = 112
    c.data.synthetic_height = 56
    c.data.synthetic_object_scale = 0.25  # radius as a fraction of min(width, height)
    c.data.synthetic_tint = 0.0  # the background's colour cast, per channel +-
    c.data.synthetic_texture_contrast = 0.3  # background texture (1: the generator's default)
    c.data.synthetic_colours = "red,yellow,green,cyan,blue,magenta"
    c.data.synthetic_whole_frame = True  # a lone object sweeps the whole frame, not a quarter
    c.data.irrelevant_ratio = 0.2  # PIR: share of queries paired with another video
    # (ours) the irrelevant pairs of the evaluation: besides each held-out video's generated
    # refusal query, this many pairs per video of its video with another held-out video's
    # query (queries the model never saw with that video)
    c.data.val_cross_pairs = 1 if tiny else 0
    # cached mode: draw the PIR pairings afresh every step instead of once (a small dataset's
    # fixed pairs are learnt by heart rather than by checking the video)
    c.data.pir_resample = tiny
    c.data.num_workers = 0 if tiny else 8  # Grain worker processes
    c.data.cache_examples = tiny  # keep processed examples in memory (small datasets)
    c.data.max_seq_len = 0 if tiny else 8192  # pad text to this; 0: bucket per batch

    # SAA frame allocation (tempo_jax.data.saa.SAAConfig)
    c.saa = ml_collections.ConfigDict()
    c.saa.enabled = True
    c.saa.max_visual_tokens = 96 if tiny else 3584  # merged visual tokens per video
    c.saa.min_pixels = 4 * 28 * 28 if tiny else 16 * 28 * 28  # per-frame pixel floor
    c.saa.max_pixels = 4 * 28 * 28 if tiny else 768 * 28 * 28  # per-frame pixel ceiling
    c.saa.mean_fps = 1.0 if tiny else 2.0  # target frames per second before the budget
    c.saa.min_frames = 4
    c.saa.max_frames = 32 if tiny else 768

    # ETA prompt (tempo_jax.data.prompts.PromptConfig)
    c.prompt = ml_collections.ConfigDict()
    c.prompt.textual_timestamps = True  # "3.5s" before each temporal patch
    # M-RoPE temporal index from real time (ETA); Qwen3-VL's positions carry no time (its
    # time is the timestamp text), so the switch does not apply there
    c.prompt.time_aligned_positions = not qwen3
    c.prompt.thinking = False  # <think>...</think> before <answer>
    # with thinking: the think names what the video shows (a record's `caption`; synthetic
    # videos have one) instead of the verdict (ours; README, "The demo")
    c.prompt.caption_think = False
    c.prompt.answer_decimals = 0 if tiny else 1  # precision of the answer's seconds
    c.prompt.query_first = False  # question before the video (the video tokens see it)
    c.prompt.system_prompt = DEFAULT_SYSTEM
    # fields {query} and {format} (the answer-format instruction)
    c.prompt.question_template = DEFAULT_QUESTION

    # ------------------------------------------------------------------ SFT
    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 600 if tiny else 2000
    c.sft.batch_size = 16 if tiny else 64  # global batch (sequences)
    c.sft.learning_rate = 2e-3 if tiny else 1e-5
    c.sft.warmup_steps = 30 if tiny else 100
    # (ours) share of each batch's rows in contrast pairs: one video with its own query (its
    # window) and with another video's query (a refusal), so neither the video alone nor the
    # query alone predicts the answer; the other rows are PIR pairs by `data.irrelevant_ratio`
    c.sft.contrast_share = 0.5 if tiny else 0.0

    # ------------------------------------------------------------------ PIR-GRPO
    c.rl = ml_collections.ConfigDict()
    c.rl.steps = 60 if tiny else 1000
    c.rl.log_every = 1  # a GRPO step is long (rollouts): one metrics row per step
    c.rl.batch_size = 8 if tiny else 32  # prompts per step (each sampled num_generations times)
    c.rl.num_generations = 8  # G
    c.rl.learning_rate = 2e-4 if tiny else 1e-6
    c.rl.warmup_steps = 5 if tiny else 20
    # (ours) exactly this many irrelevant prompts in every step's batch (-1: each prompt is
    # irrelevant with probability data.irrelevant_ratio, so some steps have none)
    c.rl.irrelevant_prompts = 3 if tiny else -1
    # DAPO dynamic sampling (verl's filter_groups): drop groups whose rewards are all equal
    # (zero advantage), roll out more prompts to refill the batch, at most `max_refills` times;
    # what is still missing is padded with masked rows (no gradient)
    c.rl.filter_groups = True
    c.rl.max_refills = 2
    c.rl.temperature = 1.0
    c.rl.top_p = 1.0
    c.rl.max_new_tokens = 16 if tiny else 256
    c.rl.beta = 0.04  # k3 KL to the frozen reference; 0 drops the reference model
    c.rl.eps_low = 0.2
    c.rl.eps_high = 0.28  # DAPO clip-higher
    c.rl.loss_agg = "token-mean"  # token-mean | seq-mean-token-mean
    c.rl.num_iterations = 1  # optimizer passes per rollout batch
    c.rl.scale_rewards = True  # False: Dr.GRPO, no std scaling
    c.rl.iou_type = "iou"  # iou | time_r1
    c.rl.rewards = "format,accuracy"

    # ------------------------------------------------------------------ optimizer
    c.optim = ml_collections.ConfigDict()
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.accum_steps = 1  # gradient accumulation: micro-batches per update
    c.optim.fp32_state = True  # optimizer moments in fp32 even for bf16 parameters

    # ------------------------------------------------------------------ run
    c.ckpt_every = 100 if tiny else 500  # steps between Orbax checkpoints
    c.ckpt_keep = 2
    c.log_every = 10
    c.eval_max_new_tokens = 16 if tiny else 64  # the held-out evaluation after each stage
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.tensor = 1
    # several TPU slices / GPU nodes: each axis is (ICI size above) x (slices / nodes below)
    c.mesh.dcn_data = 1
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_tensor = 1
    c.mesh.rules = "default"  # logical -> mesh axes: default | tpu | gpu (tempo_jax.sharding)
    c.mesh.rule_overrides = ""  # e.g. "kv_heads=;batch=data+fsdp" (empty: replicated)
    return c
