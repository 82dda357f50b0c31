"""Can the demo's randomly initialised tiny model learn the comparison refusal needs, from
text alone?

    python scripts/probe_comparison.py                          # the demo's prompt, 1000 steps
    python scripts/probe_comparison.py --prompt short --target binary --steps 2000
    python scripts/probe_comparison.py --echo                    # the think repeats the query
    python scripts/probe_comparison.py --prompt short --target binary --pads 0 --init width

Refusing is a product of two features: the colour a query names and the colour the video
shows (README, "The demo"). This probe takes the video out: the think states the video's
object as text (`I see a blue square.`, the demo's caption think), so all the model must
learn is whether the query names it. Each step trains the demo's tiny model (`--seed`;
`--init`: `model.init_scale`) on 16 fresh text pairs, half relevant, on the decision token
only, with the demo's optimizer (the data's seed is fixed: every variant sees the same
pairs); every `--every` steps it prints the AUC of P(refuse) on 128 held-out pairs (0.5:
cannot tell the pairs apart). The last line is a JSON object with the curve.

`--prompt demo`: the demo's chat prompt without its video block (system prompt, question and
answer-format instruction, `<think>I see a X Y.</think><answer>`); `--target answer`: the
decision is the answer's first token (a digit of a random window, or `none`); `--target
verdict`: the think's verdict word (`The event ...` / `The query does not ...`), two classes.
`--prompt short`: a 30-token question after `--pads` video placeholder tokens, target `3` or
`none`. `--compare`: the think also names the query's object (`I see a X Y. The query asks
for a Z W.`), so the two colours to compare sit a few tokens before the decision. At the end
it prints mean P(refuse) for every (colour seen, colour asked for): which colours' comparisons
were learnt.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tempo_jax.configs.tempo_r0 import get_config
from tempo_jax.data import prompts as P
from tempo_jax.grounding.metrics import refusal_auc
from tempo_jax.models.init import INIT_SCALES
from tempo_jax.models.positions import text_positions
from tempo_jax.training import setup
from tempo_jax.training.optimizer import make_optimizer

SHAPES = ["circle", "square", "triangle", "star", "diamond"]
TEMPLATES = ["the {o} appears and moves {m}", "a {o} shows up and slides {m}",
             "the {o} moving {m} across the screen", "when does the {o} move {m}?"]
MOTIONS = ["to the right", "to the left", "upward", "downward"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", choices=("demo", "short"), default="demo")
    ap.add_argument("--target", choices=("answer", "verdict", "binary"), default="answer",
                    help="demo prompt: answer | verdict; short prompt: binary")
    ap.add_argument("--echo", action="store_true",
                    help="demo prompt, answer target: the think also repeats the query")
    ap.add_argument("--compare", action="store_true",
                    help="the think names the video's object, then the query's (`I see a X Y. "
                         "The query asks for a Z W.`)")
    ap.add_argument("--template", default=None,
                    help="demo prompt: question template (fields {query} and {format})")
    ap.add_argument("--colours", default="red,yellow,green,cyan,blue,magenta")
    ap.add_argument("--pads", type=int, default=30, help="short prompt: video placeholders")
    ap.add_argument("--hidden-size", type=int, default=0,
                    help="the tiny model's width (0: the demo's; the MLP is 4x as wide)")
    ap.add_argument("--init", choices=INIT_SCALES, default="hf",
                    help="the random initialisation (model.init_scale): hf = std 0.02, width = "
                         "1/sqrt(fan-in), width_residual = width + GPT-2's residual scale")
    ap.add_argument("--seed", type=int, default=0, help="the model's initialisation seed")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=200)
    args = ap.parse_args()
    if (args.prompt == "short") != (args.target == "binary"):
        ap.error("--target binary goes with --prompt short, answer/verdict with demo")

    colours = args.colours.split(",")
    config = get_config("tiny")
    config.model.init_scale, config.seed = args.init, args.seed
    if args.hidden_size:
        config.model.tiny_overrides.hidden_size = args.hidden_size
        config.model.tiny_overrides.intermediate_size = 4 * args.hidden_size
    tok = setup.load_tokenizer()
    model = setup.build_model(config)
    kw = {} if args.template is None else {"question_template": args.template}
    pc = P.PromptConfig(thinking=True, caption_think=True, answer_decimals=0, **kw)
    enc = lambda s: P.encode_text(tok, s)  # noqa: E731
    rng = np.random.default_rng(0)

    def pair(colour_pair=None):
        cv, sv = rng.choice(colours), rng.choice(SHAPES)
        rel = rng.random() < 0.5
        cq = cv if rel else rng.choice([x for x in colours if x != cv])
        if colour_pair is not None:  # (seen, asked), for the per-colour table
            cv, cq = colour_pair
            rel = cv == cq
        sq = sv if rel else rng.choice(SHAPES)
        q = rng.choice(TEMPLATES).format(o=f"{cq} {sq}", m=rng.choice(MOTIONS))
        return cv, sv, bool(rel), q, cq, sq

    def example(colour_pair=None):
        cv, sv, rel, q, cq, sq = pair(colour_pair)
        if args.prompt == "short":
            pads = " ".join(["<|video_pad|>"] * args.pads)
            extra = f" The query asks for a {cq} {sq}." if args.compare else ""
            text = (f"<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
                    f"<|vision_start|>{pads}<|vision_end|>Find when: {q}. Answer in seconds."
                    f"<|im_end|>\n<|im_start|>assistant\n<think>I see a {cv} {sv}.{extra}</think>"
                    f"<answer>")
            return tok(text)["input_ids"], enc("3" if rel else "none")[0], rel
        s = float(rng.integers(0, 10))
        window = (s, s + float(rng.integers(1, 5))) if rel else None
        caption = f"a {cv} {sv}"
        if args.compare:
            caption += f". The query asks for a {cq} {sq}"
        elif args.echo and args.target == "answer":
            caption += f". The query: {q}"
        if args.target == "verdict":
            pre, target = f"<think>I see {caption}. The", (" event" if rel else " query")
        else:
            pre, post = P.format_answer(window, pc, caption=caption).split("<answer>")
            pre, target = pre + "<answer>", post
        ids = ([P.IM_START_ID] + enc("system\n" + pc.system_prompt) + [P.IM_END_ID] + enc("\n")
               + [P.IM_START_ID] + enc("user\n") + enc(P.question_text(q, pc)) + [P.IM_END_ID]
               + enc("\n") + [P.IM_START_ID] + enc("assistant\n") + enc(pre))
        return ids, enc(target)[0], rel

    def batch(n, colour_pair=None):
        ex = [example(colour_pair) for _ in range(n)]
        width = max(len(e[0]) for e in ex)
        ids = np.zeros((n, width), np.int32)
        mask = np.zeros((n, width), np.int32)
        for i, e in enumerate(ex):
            ids[i, :len(e[0])] = e[0]
            mask[i, :len(e[0])] = 1
        inputs = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
                  "position_ids": jnp.asarray(text_positions(mask))}
        last = jnp.asarray((mask.sum(1) - 1)[:, None])
        return inputs, last, jnp.asarray([[e[1]] for e in ex]), np.array([e[2] for e in ex])

    refuse_id = enc(" query" if args.target == "verdict" else "none")[0]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(args.lr, 30, args.steps, config.optim)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, inputs, pos, target):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            logp = jax.nn.log_softmax(m.forward(inputs, logits_positions=pos), -1)
            return -jnp.take_along_axis(logp, target[..., None], -1).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    @jax.jit
    def p_refuse(params, inputs, pos):
        m = nnx.merge(graphdef, params, rest)
        return jax.nn.softmax(m.forward(inputs, logits_positions=pos), -1)[:, 0, refuse_id]

    held_out = batch(128)
    curve, t0, loss = [], time.time(), float("nan")
    for s in range(args.steps + 1):
        if s % args.every == 0 or s == args.steps:
            a = refusal_auc(np.asarray(p_refuse(params, held_out[0], held_out[1])), ~held_out[3])
            curve.append([s, round(a, 3)])
            print(f"step {s}: loss {float(loss):.3f}, AUC of P(refuse) {a:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if s < args.steps:
            params, opt, loss = step(params, opt, *batch(16)[:3])
    # mean P(refuse) by the colour the think names (rows) and the colour the query asks for
    # (columns), 8 pairs each: which colours' comparisons were learnt
    table = np.array([[float(np.mean(np.asarray(p_refuse(params, *batch(8, (cv, cq))[:2]))))
                       for cq in colours] for cv in colours])
    print("P(refuse): rows the colour seen, columns the colour asked for")
    print("\n".join(f"{cv:>8} " + " ".join(f"{x:5.2f}" for x in row)
                     for cv, row in zip(colours, table, strict=True)))
    print(json.dumps({"prompt": args.prompt, "target": args.target, "echo": args.echo,
                      "compare": args.compare, "hidden_size": args.hidden_size,
                      "colours": len(colours), "lr": args.lr,
                      "colour_table": np.round(table, 3).tolist(), "steps": args.steps,
                      "auc_curve": curve, "wall_s": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
