"""Real-time streaming server: `python -m reward_forcing.serve` (see reward_forcing/serve/cli.py)."""
