"""Generated Python stubs of the tolaria.governor.v1 contract.

Regenerate with `make protos`; `make lint` fails when these files differ from freshly generated ones.
"""
