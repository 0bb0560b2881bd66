from .sa_resnet import SARESNET_PRESETS, SABottleneck, SAResNet
from .sa_unet import SAUNET_PRESETS, SAUNet

__all__ = ["SAResNet", "SABottleneck", "SARESNET_PRESETS", "SAUNet", "SAUNET_PRESETS"]
