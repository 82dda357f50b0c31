"""`python -m tempo_jax.plan`."""

from tempo_jax.plan.cli import main

main()
