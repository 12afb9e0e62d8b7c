"""The plugin system: hook specifications, the plugin manager, the loss registry.

Owns how losses are found (built-ins in :mod:`.builtin`, registered through the same
hook as any installed package's entry point), selected by name and validated.
May import: ``prefopt.losses``, ``prefopt.errors``. Nothing above it.
"""
