"""Writes notebooks/evaluate.ipynb, kept as code so its diffs stay readable:

    python scripts/make_notebook.py
"""

from pathlib import Path

import nbformat as nbf

OUT = Path(__file__).resolve().parents[1] / "notebooks" / "evaluate.ipynb"

nb = nbf.v4.new_notebook()
cells = []


def md(text: str) -> None:
    cells.append(nbf.v4.new_markdown_cell(text.strip()))


def code(text: str) -> None:
    cells.append(nbf.v4.new_code_cell(text.strip()))



md("""
# Tempo-R0 evaluation with `tempo_jax`

Evaluate a Tempo-R0 checkpoint (an exported Hugging Face directory or a training workdir) on
videos: greedy answers with the SAA frame allocation and ETA prompt the model was trained with,
the R1 / mIoU / refusal metrics, a timeline of predicted vs true windows, and the frames SAA
picked. With no checkpoint given, a tiny model is trained here for a few steps on synthetic
videos (CPU is enough; this is what CI runs), so every cell works anywhere.
""")
code("""
# Colab only: install tempo_jax for this runtime (TPU or GPU) without replacing Colab's own
# torch / jax / jaxlib (pinned as constraints). Elsewhere this cell does nothing.
import os, shutil, subprocess, sys

if "google.colab" in sys.modules:
    repo = os.environ.get("TEMPO_JAX_REPO", "https://github.com/tempo-jax/tempo_jax")
    tpu = bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME")
               or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))
    gpu = shutil.which("nvidia-smi") is not None
    extra = "[tpu]" if tpu else "[cuda12]" if gpu else ""
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True,
                            text=True).stdout.splitlines()
    keep = {"torch", "torchvision", "torchaudio", "jax", "jaxlib", "libtpu", "libtpu-nightly"}
    pins = [line for line in frozen if line.split("==")[0].lower() in keep and "==" in line]
    with open("/tmp/colab_pins.txt", "w") as f:
        f.write("\\n".join(pins) + "\\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", "/tmp/colab_pins.txt",
                    f"tempo_jax{extra} @ git+{repo}"], check=True)
    print("installed tempo_jax" + extra, "keeping", ", ".join(pins))
""")
code("""
from pathlib import Path

import jax

CHECKPOINT = ""  # an exported HF dir or a training workdir; "" trains a tiny model here
WORKDIR = Path("runs/notebook")  # where the tiny model and the synthetic videos go
NUM_VIDEOS = 4  # synthetic videos to evaluate (each with a true and a refusal query)
print("devices:", jax.devices())
""")
code("""
# No checkpoint: train the tiny config for a few steps (SFT then PIR-GRPO) on synthetic videos.
# A real run is `python -m tempo_jax.train` (the README's first command, ~20 minutes on CPU).
from tempo_jax import train
from tempo_jax.configs.tempo_r0 import get_config

if not CHECKPOINT:
    config = get_config("tiny")
    config.data.synthetic_train, config.data.synthetic_val = 8, 2
    config.sft.steps, config.sft.batch_size, config.sft.warmup_steps = 30, 4, 2
    config.sft.learning_rate = 1e-2
    config.rl.steps, config.rl.batch_size, config.rl.num_generations = 2, 2, 2
    config.rl.max_new_tokens = config.eval_max_new_tokens = 12
    config.model.tiny_overrides.update(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    config.saa.max_visual_tokens, config.saa.max_frames = 32, 12
    config.ckpt_every = 100
    report = train.run(config, WORKDIR)
    CHECKPOINT = str(WORKDIR)
    print({stage: {k: round(report[stage][k], 3) for k in train.REPORT_KEYS}
           for stage in ("baseline", "sft", "grpo")})
""")
code("""
# Held-out synthetic videos (real H.264 files with exact event windows and refusal queries).
from tempo_jax import evaluate
from tempo_jax.data.synthetic import SyntheticSpec, generate

ann = generate(WORKDIR / "eval_videos", SyntheticSpec(num=NUM_VIDEOS, seed=4242, max_events=1,
                                                      distractor_prob=0.0), progress=False)
records = evaluate.load_records("jsonl", ann)
print(len(records), "queries, e.g.", records[0]["query"], records[0]["windows"])
""")
code("""
# Evaluate: batched greedy decoding with the settings saved beside the checkpoint.
metrics = evaluate.evaluate_model(CHECKPOINT, records, str(ann.parent), WORKDIR / "eval",
                                  max_new_tokens=16)
for key in ("r1@0.3", "r1@0.5", "r1@0.7", "miou", "refusal_accuracy", "false_refusal_rate"):
    print(f"{key:20s} {metrics[key]:.3f}")
print("failed videos:", metrics["num_failed"])
""")
code("""
# Predicted (blue) vs true (green) windows; refusal queries are marked [irrelevant].
from IPython.display import Image, display

display(Image(filename=str(WORKDIR / "eval" / "timeline.png")))
""")
code("""
# The frames SAA chose for the first video, titled with their real times: frames crowd where
# the video changes (the event), and these times are what the ETA prompt and positions use.
from tempo_jax.data.pipeline import config_from_settings
from tempo_jax.data.preview import contact_sheet

settings = evaluate.load_checkpoint(CHECKPOINT).settings
saa_cfg = config_from_settings(settings).saa
result, png = contact_sheet(ann.parent / records[0]["video"], WORKDIR / "frames.png", saa_cfg)
print("frame times (s):", [round(t, 2) for t in result["frame_times"]])
print("true window:", records[0]["windows"])
display(Image(filename=str(png)))
""")
md("""
## The 3B model on a Colab TPU or GPU runtime

1. *Runtime → Change runtime type*: a TPU (v5e-1 or larger) or a GPU with 24 GB or more
   (L4, A100). Run the first cell: it installs `tempo_jax[tpu]` or `tempo_jax[cuda12]` and
   keeps Colab's own jax/jaxlib/torch.
2. Export a trained 3B run
   (`python -m tempo_jax.export --checkpoint WORKDIR --out /content/tempo3b`), copy it to
   Drive, and set `CHECKPOINT` to that directory. The settings saved with it
   (`tempo_settings.json`) decide frames, prompt and positions.
3. On a real dataset use the command line, which resumes after a disconnect:
   `python -m tempo_jax.evaluate run --checkpoint /content/tempo3b --dataset qvhighlights
   --split val --video-root /content/qvh/videos --out /content/eval --dtype bfloat16`.
   In bfloat16 the 3B weights take ~7.5 GB; with the default 3584 visual tokens per video,
   lower `--batch-size` if the accelerator runs out of memory.
""")
nb["cells"] = cells
nb["metadata"] = {"kernelspec": {"display_name": "Python 3", "language": "python",
                                  "name": "python3"},
                  "language_info": {"name": "python"},
                  "accelerator": "TPU", "colab": {"provenance": []}}
nbf.write(nb, str(OUT))
