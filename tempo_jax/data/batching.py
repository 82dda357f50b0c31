"""Batches on a mesh: a collated batch's model inputs as global arrays, each host passing its
own rows (the Qwen-VL part of data parallelism: token arrays sharded over the batch, the
pixels left on the host that read them, the vision metadata rebuilt for the global row
order)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tempo_jax.data import prompts as prompts_lib
from tempo_jax.data.pipeline import model_inputs
from tempo_jax.models import families
from tempo_jax.models.inputs import bucket
from tempo_jax.sharding import (
    BATCH_AXES,
    DEFAULT_RULES,
    MESH_AXES,
    Rules,
    named_sharding,
    owned_rows,
)


def global_batch(batch: dict, mesh: Mesh | None, rules: Rules = DEFAULT_RULES, *,
                 model_config=None, pad_side: str = "right") -> dict:
    """The model inputs of a collated batch (`pipeline.collate`) as arrays on `mesh`: token
    arrays sharded over the batch (rules' 'batch' -> ('data', 'fsdp')), vision arrays
    replicated. Without a mesh: `pipeline.model_inputs(batch)` unchanged (host arrays).

    With several processes each host passes its own rows (its share of the data, read by its
    own loader) and gets the same global batch: the rows are assembled with
    `jax.make_array_from_process_local_data` (padded to the longest host's length first); the
    pixels stay on the host that read them (the global `pixel_values` is the hosts' blocks
    side by side) and the vision metadata is rebuilt for the global row order (needs
    `model_config`), its patch permutation pointing into those blocks. Only small integer
    tables (sizes, grids, video-token counts) cross hosts.
    """
    inputs = model_inputs(batch)
    if mesh is None:
        return inputs
    if jax.process_count() == 1:
        out = dict(inputs)
        for k, axes in BATCH_AXES.items():
            a = np.asarray(inputs[k])
            out[k] = jax.device_put(a, named_sharding(mesh, axes, a.shape, rules))
        rep = NamedSharding(mesh, PartitionSpec())
        for k in ("pixel_values", "vision_meta", "num_image_features"):
            out[k] = jax.device_put(inputs[k], rep)
        return out
    if model_config is None:
        raise ValueError("global_batch on several processes needs model_config")
    return _multihost_batch(batch, mesh, rules, model_config, pad_side)


def _multihost_batch(batch, mesh, rules, cfg, pad_side):
    from jax.experimental import multihost_utils

    nproc = jax.process_count()
    unit = cfg.vision.merge_unit
    ids = np.asarray(batch["input_ids"])
    b_local = ids.shape[0]
    grids = np.asarray(batch["video_grid_thw"], np.int64).reshape(-1, 3)
    n_patch = int(np.prod(grids, axis=1).sum())
    vid_rows = (ids == cfg.video_token_id).sum(1).astype(np.int64) * unit  # patches per row
    if int(vid_rows.sum()) != n_patch or (ids == cfg.image_token_id).any():
        raise ValueError("multi-host batches support videos only, one grid list per row")
    sizes = np.asarray(multihost_utils.process_allgather(
        np.asarray([b_local, ids.shape[1], n_patch, len(grids)], np.int64))).reshape(nproc, 4)
    if len(set(sizes[:, 0].tolist())) != 1:
        raise ValueError(f"hosts have different local batch sizes {sizes[:, 0].tolist()}")
    length, g_max = int(sizes[:, 1].max()), int(sizes[:, 3].max())
    g_pad = np.zeros((g_max, 3), np.int64)
    g_pad[:len(grids)] = grids
    tables = np.concatenate([g_pad.reshape(-1), vid_rows])
    tables = np.asarray(multihost_utils.process_allgather(tables)).reshape(nproc, -1)

    def repad(a, axis, fill):
        widths = [(0, 0)] * a.ndim
        extra = length - a.shape[axis]
        widths[axis] = (extra, 0) if pad_side == "left" else (0, extra)
        return np.pad(a, widths, constant_values=fill) if extra else a

    local = {"input_ids": repad(ids, 1, prompts_lib.ENDOFTEXT_ID),
             "attention_mask": repad(np.asarray(batch["attention_mask"]), 1, 0),
             "position_ids": repad(np.asarray(batch["position_ids"]), 2, 1)}
    out = {}
    for k, axes in BATCH_AXES.items():
        a = local[k]
        b_ax = axes.index("batch")
        gshape = list(a.shape)
        gshape[b_ax] = b_local * nproc
        sharding = named_sharding(mesh, axes, gshape, rules)
        out[k] = jax.make_array_from_process_local_data(sharding, a, tuple(gshape))
        if k == "input_ids":
            row_of = owned_rows(sharding, tuple(gshape), b_ax)  # process -> its global rows
    # the pixels: every host's block, padded to a common size, side by side on the mesh
    local_devs = mesh.devices.size // nproc
    per_host = -(-max(int(sizes[:, 2].max()), 1) // local_devs) * local_devs
    pix_shape = (per_host * nproc, np.asarray(batch["pixel_values"]).shape[1])
    pix_sharding = NamedSharding(mesh, PartitionSpec(MESH_AXES))
    block = np.zeros((per_host, pix_shape[1]), np.asarray(batch["pixel_values"]).dtype)
    block[:n_patch] = np.asarray(batch["pixel_values"])[:n_patch]
    out["pixel_values"] = jax.make_array_from_process_local_data(pix_sharding, block, pix_shape)
    pix_of = owned_rows(pix_sharding, pix_shape, 0)  # process -> global index of its local patches
    # the global grid list and where each of its patches lives, in global row order
    row_grids: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for p in range(nproc):
        g_all = tables[p, :3 * g_max].reshape(g_max, 3)[:int(sizes[p, 3])]
        rows_p = tables[p, 3 * g_max:]
        gi, start = 0, 0
        for j in range(b_local):
            need, got = int(rows_p[j]), []
            while need > 0:
                n = int(np.prod(g_all[gi]))
                got.append((g_all[gi], pix_of[p][start:start + n]))
                gi, start, need = gi + 1, start + n, need - n
            if need:
                raise ValueError("video tokens and grids disagree in a row")
            row_grids[(p, j)] = got
    order = sorted((int(r), p, j) for p in range(nproc) for j, r in enumerate(row_of[p]))
    g_list = [g for _, p, j in order for g, _ in row_grids[(p, j)]]
    src = [s for _, p, j in order for _, s in row_grids[(p, j)]]
    n_total = int(sizes[:, 2].sum())
    capacity = bucket(max(n_total, 1), 64)
    meta = families.vision_metadata(np.asarray(g_list), cfg.vision, num_patches=capacity,
                                    bucketed=True)
    # padding patches sit in segments of their own and never reach the text: any source will do
    src = np.concatenate([*src, np.zeros(capacity - n_total, np.int64)])
    # Qwen2.5-VL's metadata already permutes patches (window order); Qwen3-VL's reads them in
    # order, so its permutation is the gather alone
    perm = meta.get("patch_perm", np.arange(capacity))
    meta["patch_perm"] = src[perm].astype(np.int32)
    rep = NamedSharding(mesh, PartitionSpec())

    def replicated(v):
        v = np.asarray(v)
        return jax.make_array_from_callback(v.shape, rep, lambda i, v=v: v[i])

    out["vision_meta"] = {k: replicated(v) for k, v in meta.items()}
    out["num_image_features"] = replicated(np.int32(0))
    return out
