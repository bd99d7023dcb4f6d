"""Rollouts: take a candidate color live step by step, and back the moment it misbehaves."""
