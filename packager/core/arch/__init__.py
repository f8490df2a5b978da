"""Architecture adapters: one JSON description per MoE family (package data), one loader.

    from packager.core.arch import load_arch, MoEArch, UnsupportedArchitecture
    arch = load_arch(config_dict)
"""
from packager.core.arch.spec import PER_LAYER_COUNTS_KEY, PER_LAYER_TOP_K_KEY, MoEArch, RoutingSettings, config_dict, load_arch, supported_families
from packager.core.errors import UnsupportedArchitecture

__all__ = [
    "PER_LAYER_COUNTS_KEY",
    "PER_LAYER_TOP_K_KEY",
    "MoEArch",
    "RoutingSettings",
    "UnsupportedArchitecture",
    "config_dict",
    "load_arch",
    "supported_families",
]
