"""A training run: building it, the loop, its step, and what keeps it safe.

:mod:`.run` builds a run from a config (model, data, reference, accelerator); :mod:`.trainer`
is the loop; :mod:`.step` one optimiser step and evaluation; :mod:`.checkpoint`,
:mod:`.resume`, :mod:`.interrupt`, :mod:`.lock` keep work from being lost or clobbered;
:mod:`.health` and :mod:`.preflight` check the run at start-up and at the end;
:mod:`.distributed` launches and shards over processes (DDP/FSDP); :mod:`.samples` and
:mod:`.tracking` show what the run does.
May import: ``prefopt.engine``, ``prefopt.data``, ``prefopt.testing`` (the pre-training loss
check), ``prefopt.plugins``, ``prefopt.losses``, top-level modules. Not the CLI.
"""
