"""The command line: ``prefopt train | validate | precompute-ref | losses | plugins | report``.

:mod:`.commands` parses arguments and calls training; :mod:`.report` draws a run's curves;
:mod:`.memory` (``python -m prefopt.cli.memory``) estimates and measures memory per GPU.
Heavy imports happen inside the commands, so ``prefopt --version`` stays fast.
May import anything in prefopt; nothing imports it but ``prefopt.__main__``.
"""
