"""Worker of tests/test_scale.py, run in subprocesses with fake CPU devices.

    python scale_worker.py mesh8 EXAMPLES OUT        # 8 devices: equivalence, checkpoints
    python scale_worker.py proc EXAMPLES OUT         # one of 2 jax.distributed processes
    python scale_worker.py qwen3 EXAMPLES OUT        # 8 devices, the Qwen3-VL backbone

Writes OUT/<mode>[_<process>].json (and safetensors exports) for the test to check.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tempo_jax import distributed  # noqa: E402

MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128}
LR = 3e-3
SFT_ROWS = 4  # global SFT batch
SFT_STEPS = 2
ROLLOUT_G = 2  # samples per prompt in the rollout checks (4 prompts)


def config(name: str = "tiny"):
    from tempo_jax.configs.tempo_r0 import get_config

    c = get_config(name)
    for k, v in MODEL.items():
        c.model.tiny_overrides[k] = v
    return c


def split(model, c):
    from flax import nnx

    from tempo_jax.training.setup import trainable_filter

    return nnx.split(model, trainable_filter(c), ...)


def fresh(c, mesh, rules):
    """The model of the config's seed, placed on `mesh` (None: one device)."""
    from tempo_jax import sharding as shd
    from tempo_jax.training.setup import build_model

    model = build_model(c)
    if mesh is not None:
        shd.shard_model(model, mesh, rules)
    return model


def sft_batches(examples, c, vision, rows=None):
    """SFT_STEPS batches of SFT_ROWS examples (or only `rows` of each: a host's share)."""
    from tempo_jax.data.pipeline import collate
    from tempo_jax.training.setup import pipeline_config

    pcfg = pipeline_config(c)
    out = []
    for s in range(SFT_STEPS):
        chunk = [examples[(s * SFT_ROWS + i) % len(examples)] for i in range(SFT_ROWS)]
        if rows is not None:
            chunk = [chunk[i] for i in rows]
        out.append(collate(chunk, pcfg, vision))
    return out


def run_sft(c, mesh, rules, batches):
    """The trainer's SFT update on global batches: the step factory's `sft_grad` and its
    donating `apply` (training.steps.make_steps), the trainer's optimizer."""
    from tempo_jax import sharding as shd
    from tempo_jax.data.batching import global_batch
    from tempo_jax.training.data import answer_targets
    from tempo_jax.training.optimizer import make_optimizer
    from tempo_jax.training.steps import make_steps

    model = fresh(c, mesh, rules)
    graphdef, params, frozen = split(model, c)
    steps = make_steps(make_optimizer(LR, 1, 10, c.optim))
    opt = steps.tx.init(params)

    losses, hlo = [], ""
    for batch in batches:
        targets = [shd.shard_rows(a, mesh, rules, pad_axis=1)
                   for a in answer_targets(batch["loss_mask"], batch["input_ids"])]
        inputs = global_batch(batch, mesh, rules, model_config=model.config)
        with shd.use_mesh(mesh, rules):
            if not hlo:
                hlo = steps.sft_grad.lower(params, frozen, graphdef, inputs, *targets).as_text()
            (loss, _), grads = steps.sft_grad(params, frozen, graphdef, inputs, *targets)
        params, opt, ok = steps.apply(params, opt, grads, loss)
        assert bool(ok)
        losses.append(float(loss))
    return losses, params, opt, graphdef, frozen, steps.tx, hlo, inputs


def run_grpo(c, mesh, rules, examples, vision):
    """One PIR-GRPO update on fixed completions, the step factory's `grpo_grad` and donating
    `apply` (training.steps.make_steps); the loss, metrics, updated parameters and
    gradients."""
    from tempo_jax import sharding as shd
    from tempo_jax.data.batching import global_batch
    from tempo_jax.data.pipeline import collate
    from tempo_jax.rl import grpo as grpo_lib
    from tempo_jax.training.data import decode_start, prompt_examples
    from tempo_jax.training.optimizer import make_optimizer
    from tempo_jax.training.setup import pipeline_config
    from tempo_jax.training.steps import make_steps

    b, g, t = 4, 2, 6
    pcfg = pipeline_config(c, with_answer=False, pad_side="left")
    batch = collate(prompt_examples(examples[:b]), pcfg, vision)
    rng = np.random.default_rng(7)
    completions = rng.integers(10, 500, (b * g, t)).astype(np.int32)
    lengths = np.asarray([6, 3, 5, 1, 6, 4, 2, 6])
    comp_mask = np.arange(t)[None, :] < lengths[:, None]
    start = np.repeat(decode_start(batch), g).astype(np.int32)
    # near the untrained policy's log-probabilities (about -log(vocab)): ratios around 1,
    # some clipped
    old = (-np.log(c_vocab(vision)) + rng.normal(0, 0.3, (b * g, t))).astype(np.float32)
    ref = (old + rng.normal(0, 0.3, old.shape)).astype(np.float32)
    adv = rng.normal(size=b * g).astype(np.float32)
    gcfg = grpo_lib.GRPOConfig(num_generations=g, beta=0.04)

    model = fresh(c, mesh, rules)
    graphdef, params, frozen = split(model, c)
    steps = make_steps(make_optimizer(LR, 1, 10, c.optim))
    opt = steps.tx.init(params)
    rows = [shd.shard_rows(a, mesh, rules) for a in (completions, comp_mask, start, old, ref,
                                                     adv)]
    inputs = global_batch(batch, mesh, rules, model_config=model.config, pad_side="left")
    with shd.use_mesh(mesh, rules):
        (loss, m), grads = steps.grpo_grad(params, frozen, graphdef, inputs, *rows, gcfg, g)
    params, opt, ok = steps.apply(params, opt, grads, loss)
    assert bool(ok)
    return float(loss), {k: float(v) for k, v in m.items()}, params, grads


def run_rollout(c, mesh, rules, examples, vision, rows):
    """PIR-GRPO's sampling step (training.grpo.rollout) on prompts `rows`: this process's
    completions, their log-probabilities and lengths."""
    import jax

    from tempo_jax.data.pipeline import collate
    from tempo_jax.inference import answer_sampling
    from tempo_jax.training.data import prompt_examples
    from tempo_jax.training.grpo import rollout
    from tempo_jax.training.setup import pipeline_config

    pcfg = pipeline_config(c, with_answer=False, pad_side="left")
    batch = collate(prompt_examples([examples[i] for i in rows]), pcfg, vision)
    model = fresh(c, mesh, rules)
    sampling = answer_sampling(6, num_samples=ROLLOUT_G, temperature=1.0, top_p=1.0)
    out, _ = rollout(model, batch, mesh, rules, sampling, jax.random.PRNGKey(5))
    return {"tokens": out.tokens.tolist(), "logps": out.logprobs.tolist(),
            "lengths": out.lengths.tolist()}


def run_eval(c, mesh, rules, examples):
    """The evaluation during training (`training.evaluation.evaluate_examples`) of all
    `examples`: on a mesh of two processes each answers its share through the global sampler
    (temperature 0) and the rows of both are gathered."""
    from tempo_jax.training.evaluation import evaluate_examples
    from tempo_jax.training.setup import load_tokenizer

    metrics, rows = evaluate_examples(fresh(c, mesh, rules), list(examples), load_tokenizer(),
                                      c, mesh=mesh, rules=rules)
    return {"qids": [r["qid"] for r in rows], "answers": [r["answer"] for r in rows],
            "p_none": [r["p_none"] for r in rows],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def c_vocab(vision) -> int:
    from tempo_jax.models.qwen2_5_vl import preset

    return preset("tiny").text.vocab_size


def flat(params) -> dict[str, np.ndarray]:
    import jax

    return {"/".join(map(str, k)): np.asarray(jax.device_get(v))
            for k, v in params.flat_state()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max())
               for k in a)


def mesh8(examples, out: Path) -> None:
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from tempo_jax import sharding as shd
    from tempo_jax.models.qwen2_5_vl.params import save_pretrained

    assert jax.device_count() == 8, jax.devices()
    c = config()
    rules = shd.DEFAULT_RULES
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    vision = fresh(c, None, rules).config.vision
    res: dict = {}

    # ---- SFT: one device vs the (2, 2, 2) mesh
    batches = sft_batches(examples, c, vision)
    l1, p1, _, gd1, fr1, _, hlo1, _ = run_sft(c, None, rules, batches)
    l8, p8, o8, gd8, fr8, tx, hlo8, inputs8 = run_sft(c, mesh, rules, batches)
    res["sft_losses_1"], res["sft_losses_8"] = l1, l8
    res["sft_param_diff"] = max_diff(flat(p1), flat(p8))
    res["sft_param_change"] = max_diff(flat(p1), flat(split(fresh(c, None, rules), c)[1]))
    res["constraints_1"] = hlo1.count("sharding_constraint") + hlo1.count("@Sharding")
    res["constraints_8"] = hlo8.count("sharding_constraint") + hlo8.count("@Sharding")
    res["input_spec"] = str(inputs8["input_ids"].sharding.spec)
    res["q_spec"] = str(p8["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
                        .sharding.spec)
    # the single-process reference of the two-process run
    save_pretrained(nnx.merge(gd1, p1, fr1), out / "ref_hf")

    # ---- PIR-GRPO update: one device vs the mesh
    g1, m1, q1, d1 = run_grpo(c, None, rules, examples, vision)
    g8, m8, q8, d8 = run_grpo(c, mesh, rules, examples, vision)
    res["grpo_loss_1"], res["grpo_loss_8"] = g1, g8
    res["grpo_metric_rel_diff"] = max(abs(m1[k] - m8[k]) / max(1.0, abs(m1[k])) for k in m1)
    res["grpo_param_diff"] = max_diff(flat(q1), flat(q8))
    res["grpo_grad_diff"] = max_diff(flat(d1), flat(d8))
    res["grpo_grad_max"] = max(float(np.abs(v).max()) for v in flat(d1).values())
    res["grpo_clip_fraction"] = m1["clip_fraction"]

    # ---- PIR-GRPO rollout: one device vs the mesh (sampled, temperature 1)
    res["rollout_1"] = run_rollout(c, None, rules, examples, vision, range(4))
    res["rollout_8"] = run_rollout(c, mesh, rules, examples, vision, range(4))
    # ---- evaluation during training, one device (the two-process run's reference)
    res["eval_1"] = run_eval(c, None, rules, examples)

    # ---- Orbax checkpoint saved on the mesh, restored on (fsdp=4) and on one device
    saved = {"params": p8.to_pure_dict(), "opt_state": o8}
    mgr = ocp.CheckpointManager(out / "ckpt")
    mgr.save(1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(saved)))
    mgr.wait_until_finished()
    want = {"params": flat(p8), "opt": [np.asarray(x) for x in jax.tree.leaves(o8)]}
    for name, target_mesh in (("fsdp4", shd.make_mesh(fsdp=4, devices=jax.devices()[:4])),
                              ("one", None)):
        _, params, _ = split(fresh(c, target_mesh, rules), c)
        abstract = {"params": params.to_pure_dict(), "opt_state": tx.init(params)}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        got = mgr.restore(1, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract))))["state"]
        nnx.replace_by_pure_dict(params, got["params"])
        res[f"ckpt_{name}_diff"] = max(
            max_diff(want["params"], flat(params)),
            max(float(np.abs(a - np.asarray(b)).max())
                for a, b in zip(want["opt"], jax.tree.leaves(got["opt_state"]), strict=True)))
        k = params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
        res[f"ckpt_{name}_devices"] = len(k.sharding.device_set)
        res[f"ckpt_{name}_spec"] = str(getattr(k.sharding, "spec", None))
    (out / "mesh8.json").write_text(json.dumps(res))


def proc(examples, out: Path) -> None:
    """One of two jax.distributed processes (4 CPU devices each): the SFT steps of `mesh8` on
    a (data 2 over the processes, fsdp 2, tensor 2) mesh, each process holding half of every
    batch's rows, then the non-gathering HF export, then a PIR-GRPO rollout of half the
    prompts each."""
    import jax
    from flax import nnx

    from tempo_jax import sharding as shd
    from tempo_jax.models.qwen2_5_vl.params import save_pretrained

    assert distributed.initialize(), "jax.distributed was not started from the environment"
    me = jax.process_index()
    assert jax.process_count() == 2 and jax.local_device_count() == 4, jax.devices()
    c = config()
    rules = shd.DEFAULT_RULES
    mesh = shd.make_mesh(data=1, fsdp=2, tensor=2, dcn_data=2)
    vision = fresh(c, None, rules).config.vision
    half = SFT_ROWS // 2
    batches = sft_batches(examples, c, vision, rows=range(me * half, (me + 1) * half))
    losses, params, _, graphdef, frozen, _, _, inputs = run_sft(c, mesh, rules, batches)
    save_pretrained(nnx.merge(graphdef, params, frozen), out / "hf")
    # the pixels this host read are the global array's shards on this host's devices
    pix = inputs["pixel_values"]
    shards = sorted(pix.addressable_shards, key=lambda sh: sh.index[0].start or 0)
    mine = np.concatenate([np.asarray(sh.data) for sh in shards])
    n = int(np.asarray(batches[-1]["video_grid_thw"]).prod(1).sum())
    pixels_local = bool(np.array_equal(mine[:n], np.asarray(batches[-1]["pixel_values"])[:n])
                        and not mine[n:].any())
    roll = run_rollout(c, mesh, rules, examples, vision, range(me * 2, me * 2 + 2))
    evaluation = run_eval(c, mesh, rules, examples)
    # a streamed validation share that ends early: this process fills in padding batches
    # until the other is done (2 batches here, 1 there)
    from tempo_jax.training.evaluation import lockstep_lists

    share = [[examples[0], examples[1]], [examples[2]]] if me == 0 else [[examples[4]]]
    lockstep = [[ex["qid"] for ex in part] for part in lockstep_lists(iter(share))]
    (out / f"proc_{me}.json").write_text(json.dumps({
        "rollout": roll, "eval": evaluation, "lockstep": lockstep,
        "losses": losses, "process": me, "global_rows": int(inputs["input_ids"].shape[0]),
        "local_patches": int(np.asarray(batches[0]["video_grid_thw"]).prod(1).sum()),
        "pixels_local": pixels_local, "pixel_rows": int(pix.shape[0]),
        "mesh_data_processes": [sorted({d.process_index for d in row.flat})
                                for row in mesh.devices],
    }))
    jax.distributed.shutdown()


def qwen3(examples, out: Path) -> None:
    """The Qwen3-VL backbone (DeepStack's side input through the sharded decoder): SFT steps,
    one PIR-GRPO update and a sampled rollout on the (2, 2, 2) mesh against one device."""
    import jax

    from tempo_jax import sharding as shd

    assert jax.device_count() == 8, jax.devices()
    c = config("qwen3_vl_tiny")
    rules = shd.DEFAULT_RULES
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    model = fresh(c, None, rules)
    assert model.config.family == "qwen3_vl"
    vision = model.config.vision
    batches = sft_batches(examples, c, vision)
    l1, p1, *_ = run_sft(c, None, rules, batches)
    l8, p8, *_ = run_sft(c, mesh, rules, batches)
    g1, m1, q1, d1 = run_grpo(c, None, rules, examples, vision)
    g8, m8, q8, d8 = run_grpo(c, mesh, rules, examples, vision)
    (out / "qwen3.json").write_text(json.dumps({
        "sft_losses_1": l1, "sft_losses_8": l8,
        "sft_param_diff": max_diff(flat(p1), flat(p8)),
        "sft_param_change": max_diff(flat(p1), flat(split(fresh(c, None, rules), c)[1])),
        "grpo_loss_1": g1, "grpo_loss_8": g8,
        "grpo_grad_diff": max_diff(flat(d1), flat(d8)),
        "grpo_grad_max": max(float(np.abs(v).max()) for v in flat(d1).values()),
        "grpo_param_diff": max_diff(flat(q1), flat(q8)),
        "rollout_1": run_rollout(c, None, rules, examples, vision, range(4)),
        "rollout_8": run_rollout(c, mesh, rules, examples, vision, range(4)),
    }))


if __name__ == "__main__":
    mode, examples_path, out_dir = sys.argv[1:4]
    with open(examples_path, "rb") as f:
        exs = pickle.load(f)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    {"mesh8": mesh8, "proc": proc, "qwen3": qwen3}[mode](exs, out_path)
