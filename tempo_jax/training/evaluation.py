"""Held-out evaluation during training: greedy answers of every validation query, grounding
metrics, and the PIR diagnostics (P(`none`) teacher-forced after `<answer`, its AUC between
relevant and irrelevant pairs, refusals of the held-out cross pairs).

On a mesh every process answers its own share of the queries through the global sampler at
temperature 0 (`inference.answer_rows` with the mesh), in lock-step batches of one size, and
the rows of all processes are gathered: every process returns the same metrics and rows, in
the validation set's order, equal to what one process computes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from tempo_jax import sharding as shd
from tempo_jax.data.pipeline import collate
from tempo_jax.distributed import all_gather_json, all_rows
from tempo_jax.grounding.metrics import grounding_metrics, refusal_diagnostics
from tempo_jax.inference import answer_rows, refusal_probabilities
from tempo_jax.training import data as data_lib
from tempo_jax.training.setup import pipeline_config

BATCH = 8
PAD_SUFFIX = "|eval-pad"  # qid suffix of the rows that only fill a process's last batch


def _padded(examples: list[dict], size: int, like: dict | None = None) -> list[dict]:
    """`examples` filled up to `size` rows with copies of the last one (or of `like` when
    there is none), marked padding: they keep the batch's shape and never reach the rows."""
    src = examples[-1] if examples else like
    pad = {**src, "qid": f"{src['qid']}{PAD_SUFFIX}"}
    return list(examples) + [pad] * (size - len(examples))


def host_share_lists(examples: list[dict]) -> Iterator[list[dict]]:
    """This process's share of `examples` in batches: every process runs as many batches of
    `BATCH` rows as the largest share needs (collective steps)."""
    nproc = jax.process_count()
    if nproc == 1:
        yield from (examples[i:i + BATCH] for i in range(0, len(examples), BATCH))
        return
    if len(examples) < nproc:  # decided alike on every process (same list everywhere)
        raise ValueError(f"{len(examples)} validation examples for {nproc} processes: "
                         "a process would have none to evaluate")
    mine = examples[jax.process_index()::nproc]
    n = math.ceil(math.ceil(len(examples) / nproc) / BATCH)
    for i in range(n):
        yield _padded(mine[i * BATCH:(i + 1) * BATCH], BATCH, like=mine[-1])


def lockstep_lists(loader) -> Iterator[list[dict]]:
    """A streaming loader's example lists (`collated=False`), in lock-step across processes:
    a process whose share is exhausted fills in padding until every process is done."""
    if jax.process_count() == 1:
        yield from loader
        return
    last = None
    it = iter(loader)
    while True:
        part = next(it, None)
        # one collective per batch: who has a batch, and who could fill in for a missing one
        flags = all_rows(np.array([[part is not None, part is not None or last is not None]]))
        if not flags[:, 0].any():
            return
        if not flags[:, 1].all():  # raised on every process alike, not only the empty one
            raise ValueError("a process's share of the validation set has no loadable "
                             "example")
        if part is not None:
            last = part
        yield _padded(part if part is not None else [], BATCH, like=last[-1])


def _collated(lists: Iterator[list[dict]], pcfg, vision) -> Iterator[dict]:
    return (collate(exs, pcfg, vision) for exs in lists)


def evaluate_examples(model: Any, examples: list[dict], tokenizer: Any,
                      config: ml_collections.ConfigDict, *, mesh=None,
                      rules=shd.DEFAULT_RULES) -> tuple[dict, list[dict]]:
    """(metrics, rows) of `model` on processed validation examples (prompt + answer, as
    `load_example` makes them). With `mesh` on several processes, each passes the same list
    and answers its share (`examples[process::count]`) through the global sampler."""
    vision = model.config.vision
    multi = mesh is not None and jax.process_count() > 1
    pcfg = pipeline_config(config, batch_size=BATCH, with_answer=False, pad_side="left")
    tf = pipeline_config(config, batch_size=BATCH)  # teacher-forced: prompt + answer
    batches = _collated(host_share_lists(data_lib.prompt_examples(examples)), pcfg, vision)
    tf_batches = _collated(host_share_lists(examples), tf, vision)
    return _answer_and_score(model, batches, tf_batches, tokenizer, config, tf.prompt,
                             [str(ex["qid"]) for ex in examples], mesh if multi else None,
                             rules)


def _answer_and_score(model, batches, tf_batches, tokenizer, config, prompt_cfg,
                      order: list[str], mesh, rules) -> tuple[dict, list[dict]]:
    rows = [row for batch_rows in answer_rows(model, batches, tokenizer,
                                              config.eval_max_new_tokens, mesh=mesh,
                                              rules=rules)
            for row in batch_rows if not str(row["qid"]).endswith(PAD_SUFFIX)]
    p_none = refusal_probabilities(model, tf_batches, tokenizer, prompt_cfg, mesh=mesh,
                                   rules=rules)
    if mesh is not None and jax.process_count() > 1:  # every process's rows, in order
        rows = [r for part in all_gather_json(rows) for r in part]
        p_none = {k: v for part in all_gather_json(p_none) for k, v in part.items()}
        index = {q: i for i, q in enumerate(order)}
        rows.sort(key=lambda r: index.get(str(r["qid"]), len(index)))
    for r in rows:
        r["p_none"] = p_none.get(str(r["qid"]))
    metrics = grounding_metrics([r["answer"] for r in rows], [r["windows"] for r in rows],
                                [r["relevant"] for r in rows], [r["duration"] for r in rows])
    metrics.update(refusal_diagnostics(rows, caption_think=bool(
        config.prompt.thinking and config.prompt.get("caption_think", False))))
    return metrics, rows


def evaluate(trainer: Any, data: data_lib.Data, n: int | None = None
             ) -> tuple[dict, list[dict]]:
    """(metrics, one row per validation query) of the current policy on `data.val[:n]`."""
    c = trainer.config
    multi = trainer.mesh is not None and jax.process_count() > 1
    mesh = trainer.mesh if multi else None
    if c.data.cache_examples:
        return evaluate_examples(trainer.merged(), trainer.examples(
            data, "val", pipeline_config(c))[:n], trainer.tokenizer, c, mesh=mesh,
            rules=trainer.rules)
    vision = trainer.model.config.vision
    pcfg = pipeline_config(c, batch_size=BATCH, with_answer=False, pad_side="left")
    tf = pipeline_config(c, batch_size=BATCH)

    def stream(cfg):
        lists = lockstep_lists(trainer.stream(
            data.val[:n], data.video_root, dataclasses.replace(cfg, shuffle=False,
                                                               num_epochs=1),
            require_usable=False, collated=not multi))
        return _collated(lists, cfg, vision) if multi else lists

    return _answer_and_score(trainer.merged(), stream(pcfg), stream(tf), trainer.tokenizer, c,
                             tf.prompt, [str(r["qid"]) for r in data.val[:n]], mesh,
                             trainer.rules)
