"""Choices of `packager export onnx`, importable without torch (the CLI reads them for --help
and for argument checks before anything heavy is imported)."""

# routed-expert formulations, see converters/onnx/moe_ops.py
FORMULATIONS = ("contrib", "sparse", "dense")
DEFAULT_FORMULATION = "contrib"
QUANT_TYPES = ("fp32", "int8", "int4")
# families whose decoder converters/onnx/graph.py can build
SUPPORTED_FAMILIES = ("qwen3_moe",)
