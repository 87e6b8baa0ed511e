"""Resumable uploads: one engine (engine.py) and its protocol front ends (tus.py)."""
