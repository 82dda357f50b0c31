"""Orbax's commit of a checkpoint (the rename of `<step>.orbax-checkpoint-tmp` into place)
slowed on purpose, as on a loaded machine or a slow bucket: what the trainer must wait for.

In process: `slow_commit.install(seconds, monkeypatch)`. For a subprocess:
`python -c "import slow_commit; slow_commit.install(S); from tempo_jax.train import main; main()"`
with this directory on PYTHONPATH (the command's flags follow on the command line).
"""

from __future__ import annotations

import asyncio

from orbax.checkpoint._src.path import atomicity

TARGET = atomicity.AtomicRenameTemporaryPath


def install(seconds: float, monkeypatch=None) -> None:
    original = TARGET.finalize

    async def finalize(self, *args, **kwargs):
        await asyncio.sleep(seconds)
        return await original(self, *args, **kwargs)

    if monkeypatch is None:
        TARGET.finalize = finalize
    else:
        monkeypatch.setattr(TARGET, "finalize", finalize)


def command(seconds: float) -> list[str]:
    """`python -m tempo_jax.train` with the commit slowed (flags to be appended)."""
    import sys

    return [sys.executable, "-c", f"import slow_commit; slow_commit.install({seconds}); "
            "from tempo_jax.train import main; main()"]
