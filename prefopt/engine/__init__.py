"""The compute engine: what one forward and backward over packed pairs does.

Attention over packed rows (:mod:`.attention`), chunked per-token log-probs and features
(:mod:`.logprobs`), the policy/reference module (:mod:`.modeling`), the reference modes and
cache (:mod:`.reference`), optional compile/Liger (:mod:`.accelerators`), counting
host-device syncs (:mod:`.syncs`).
May import: ``prefopt.data``, ``prefopt.losses``, ``prefopt.plugins``, ``prefopt.config``,
``prefopt.errors``, ``prefopt.atomic``. Not training or the CLI.
"""
