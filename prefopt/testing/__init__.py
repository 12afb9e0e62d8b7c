"""Tools for loss authors: the conformance kit, the pre-training check, tiny models.

:func:`check_loss` runs a loss class through the contract (:mod:`.kit`, cases in
:mod:`.losscheck`, which training also runs before step 0); :func:`registered` registers
loss classes for a test; :func:`trl_loss` (any TRL loss type, per-sequence log-probs;
:func:`assert_matches_trl` compares a loss with it) and
:func:`trl_dpo_loss` (per-token, WPO and LD-DPO) evaluate TRL's own DPOTrainer loss, and
:func:`trl_kto_loss` its KTOTrainer loss, for comparison (:mod:`.trl`, TRL imported when called); :mod:`.tiny` builds small tokenizers
and model configs locally.
May import: ``prefopt.engine`` (sync counting), ``prefopt.plugins``, ``prefopt.losses``,
``prefopt.errors``. Not training or the CLI.
"""
from prefopt.testing.kit import REWARD_METRICS, check_loss, registered
from prefopt.testing.trl import TRLLoss, assert_matches_trl, trl_dpo_loss, trl_inputs, trl_kto_loss, trl_loss

__all__ = ["REWARD_METRICS", "TRLLoss", "assert_matches_trl", "check_loss", "registered", "trl_dpo_loss", "trl_inputs", "trl_kto_loss", "trl_loss"]
