"""Namespace for the Tolaria governor contract (generated code lives in tolaria.governor.v1)."""
