"""Contracts shared by stages that must not import each other: what a model reads (`inputs`), what a
checkpoint file holds (`checkpoint`), which settings are secrets (`credentials`) and how a program
starts a Ray of its own (`local_ray`: on 127.0.0.1 only).

The data flows shards -> pipelines -> train -> models; each of these agreements has two or more sides
in that flow, so it lives here, beside all of them, and imports none of them.
"""
