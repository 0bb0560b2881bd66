from . import (
    local_attention_int8,  # noqa: F401 (registers torch.ops.monai_qsa.local_attention_int8 for int8 artifacts)
    pixel_shuffle,  # noqa: F401 (registers torch.ops.monai_qsa.pixel_shuffle_3d for int8 artifacts)
    restore_head_int8,  # noqa: F401 (registers torch.ops.monai_qsa.restore_head_int8 for int8 artifacts)
)
from .sa_unit import SAUnit
from .sasa import StandAloneSelfAttention

__all__ = ["SAUnit", "StandAloneSelfAttention"]
