"""TensorFlow's fused batch-norm kernel as a fast path (work in progress, issue 4).

`ineligibility(layer, inputs, mask)` is the one place that decides whether a
call can run the fused kernel: it returns None when it can, else a short
reason. Until the kernel path lands, every call takes the reference path.
"""


def ineligibility(layer, inputs, mask):
    return "the fused kernel path is not available in this version"


def fused_call(layer, inputs, use_batch_statistics):
    raise NotImplementedError("the fused kernel path is not available in this version")
