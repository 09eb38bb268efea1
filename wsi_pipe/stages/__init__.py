"""Stages: each reads slides / stores, writes artifacts atomically, and raises typed errors."""
