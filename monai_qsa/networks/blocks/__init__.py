from . import local_attention_int8  # registers torch.ops.monai_qsa.local_attention_int8 (int8 artifacts call it)
from .sa_unit import SAUnit
from .sasa import StandAloneSelfAttention

__all__ = ["SAUnit", "StandAloneSelfAttention"]
