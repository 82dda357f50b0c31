"""PIR-GRPO reinforcement learning: rewards, advantages and the GRPO loop."""
