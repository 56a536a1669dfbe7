"""The keys under which fxcompress annotates the IR.

The IR is a plain ``torch.fx.GraphModule``. Everything fxcompress knows about a
node lives in ``node.meta`` and everything it knows about the whole module in
``graph_module.meta``, always under one of the constants below, so that a
reader can grep for every producer and consumer of a piece of metadata.
"""

__all__ = [
    "TENSOR_META",
    "CHANNELS",
    "EXAMPLE_INPUTS",
    "ANALYSIS",
    "PASS_HISTORY",
    "MODULE_TYPES",
    "VALUE",
    "PASS_SECONDS",
    "STATISTICS",
    "WEIGHT_GRIDS",
    "SMOOTHED",
    "INPUT_STATISTICS",
    "COMPENSATED",
    "KEEP",
    "QCONFIG",
]

#: Written by ``torch.fx.passes.shape_prop.ShapeProp``: shape and dtype of the node's output.
TENSOR_META = "tensor_meta"

#: On a node: the channel ids of its output, one ``numpy`` int array per tensor
#: dimension (a tuple of such tuples for nodes returning several tensors, ``None``
#: for non-tensor values). Written by the channel analysis.
CHANNELS = "fxcompress.channels"

#: On the module: the example inputs the model was traced with (a tuple).
EXAMPLE_INPUTS = "fxcompress.example_inputs"

#: On the module: the :class:`fxcompress.analysis.ChannelAnalysis` of the current graph.
ANALYSIS = "fxcompress.analysis"

#: On the module: the :class:`fxcompress.decision.KeepDecision`, which channel components survive.
KEEP = "fxcompress.keep"

#: On the module: the :class:`fxcompress.quant.QConfig` ``insert-observers`` applied (calibration and
#: fake quantization need it, even when it selected no layer).
QCONFIG = "fxcompress.qconfig"

#: On the module: names of the passes that have run on it, in order.
PASS_HISTORY = "fxcompress.pass_history"

#: On the module: ``{module path: type}`` of the user's model as it was traced.
#: Exported graphs keep parameters under the original paths but not the module
#: types, which layer selection (``op_types``) needs.
MODULE_TYPES = "fxcompress.module_types"

#: On a node returning a Python number or a tuple of them (``x.shape[-1] // 2``):
#: its value on the example inputs, recorded during shape propagation.
VALUE = "fxcompress.value"

#: On the module: ``[(pass name, seconds), ...]``, the wall time of each pass itself (hooks excluded).
PASS_SECONDS = "fxcompress.pass_seconds"

#: On a norm or mean node that computes statistics over a prunable dimension:
#: that dimension's channel ids. When some are removed, masking switches the
#: node to statistics over the kept channels (``fxcompress.modules.MASKED_STATISTICS``).
STATISTICS = "fxcompress.statistics"

#: On the module: ``{weight's fully qualified name: fxcompress.oneshot.WeightGrid}``, the integer grid
#: (``QScheme``, per-group scales and zero points, each input column's group) that one-shot weight
#: quantization (RTN, GPTQ, AWQ) rounded the weight onto; the parameter holds the dequantized values, so a
#: later step can pack ``grid.integers(weight)`` into int4/int8 kernels.
WEIGHT_GRIDS = "fxcompress.weight_grids"

#: On the module: ``{weight's fully qualified name: where its input's 1/s went}``, for each linear layer
#: SmoothQuant smoothed (``smooth-activations``): the weight holds ``W · s`` and its input is divided by
#: ``s``, folded into the norm or per-channel ``mul`` before it, or by a ``mul`` node the pass inserted.
#: A second run leaves these layers alone (their activations are already smooth).
SMOOTHED = "fxcompress.smoothed"

#: On the module: ``{linear weight's fully qualified name: fxcompress.prune.data_aware.ColumnStatistics}``, its
#: input per column (tokens, Σx², mean, deviations) over the calibration data, as the last data-aware channel
#: criterion measured it (``ActivationNorm``, ``Fluctuation``; before their masks, so removed channels' means are
#: known). ``compensate-bias`` adds removed columns' mean contributions to biases from it.
INPUT_STATISTICS = "fxcompress.input_statistics"

#: On the module: ``{linear weight's fully qualified name: bool numpy array over its input columns}``, the
#: columns whose mean contribution ``compensate-bias`` has put into the bias (a second run skips them).
#: Forgotten whenever new ``INPUT_STATISTICS`` are recorded.
COMPENSATED = "fxcompress.compensated"
