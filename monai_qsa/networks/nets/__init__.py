from .sa_resnet import SARESNET_PRESETS, SABottleneck, SAResNet
from .sa_unet import SAUNet

__all__ = ["SAResNet", "SABottleneck", "SARESNET_PRESETS", "SAUNet"]
