"""Ingress adapters: each knows its wire and pushes 16 kHz PCM into a Call (bridge/calls.py)."""
