"""Batch captioning: every input under folders, globs, lists or tar shards into Parquet.

``local`` is the single-machine engine (resumable, sharded output); ``ray_engine`` runs the
same job on Ray Data. Both write the rows ``rows`` defines. ``captioner batch`` is the CLI.
"""
