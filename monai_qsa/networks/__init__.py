from .blocks import StandAloneSelfAttention
from .nets import SAResNet, SAUNet

__all__ = ["StandAloneSelfAttention", "SAResNet", "SAUNet"]
