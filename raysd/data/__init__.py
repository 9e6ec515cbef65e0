"""Data sets, audio, log-mel features and synthetic machine sounds."""
