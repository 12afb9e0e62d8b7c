"""Preference data: sources and formats, row checks, tokenisation, batching and packing plans.

Everything here runs on the host before or between steps: :mod:`.sources` reads files and
Hub datasets, :mod:`.pairs` checks rows and tokenises them (:mod:`.window` keeps a very long row's
tokenising bounded by ``max_length``), :mod:`.batching` lays pairs out
in the token layout the engine reads and plans which pairs each forward takes.
May import: ``prefopt.errors``, ``prefopt.config``. Not the engine, training or CLI.
"""
