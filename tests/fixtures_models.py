"""Model fixtures: tiny random configs and the real SmolLM2, loaded once per module."""
