"""The built-in losses, registered through the same hook as any third-party plugin."""
from prefopt.losses.dpo import DPO, Sigmoid
from prefopt.losses.ipo import IPO
from prefopt.losses.sft import SFT
from prefopt.losses.tdpo import TDPO
from prefopt.plugins.hookspecs import hookimpl


@hookimpl
def register_losses() -> list[type]:
    return [DPO, Sigmoid, IPO, TDPO, SFT]
