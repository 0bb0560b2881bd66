from .sasa import StandAloneSelfAttention

__all__ = ["StandAloneSelfAttention"]
