from .complexity import count_flops, count_parameters, serialized_size

__all__ = ["count_parameters", "count_flops", "serialized_size"]
