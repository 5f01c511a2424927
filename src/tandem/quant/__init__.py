"""Quantization: fake-quantizers with STEs, quantized layers, `quantize_` and calibration.

    import tandem
    tandem.quantize_(model, method="lsq", w_bits=4, a_bits=4)   # swap layers, in place
    tandem.quant.calibrate(model, loader, num_batches=4)          # data-dependent init
    ... train as usual (QAT), or evaluate right away (PTQ) ...
"""
from .kmeans import KMeansWeight, kmeans_1d
from .layers import QUANT_LAYERS, QuantConv2d, QuantLinear
from .policy import LayerOverride, QuantSpec, make_spec
from .registry import QUANTIZERS, QuantMethod, list_quantizers, register_quantizer
from .quantize import calibrate, layer_plan, quantize_, quantizers_of
from .quantizers import (ActQuantizer, DoReFaAct, DoReFaWeight, LSQAct, LSQWeight, MinMaxWeight, ObserverAct,
                         PACTAct, PercentileAct, PICPQWeight, WeightQuantizer, grad_scale, round_ste)

__all__ = ["quantize_", "calibrate", "layer_plan", "quantizers_of", "QuantSpec", "LayerOverride", "make_spec",
           "list_quantizers", "QUANTIZERS", "QuantMethod", "register_quantizer", "PercentileAct", "QuantConv2d", "QuantLinear", "QUANT_LAYERS", "DoReFaWeight",
           "PICPQWeight", "LSQWeight", "MinMaxWeight", "KMeansWeight", "DoReFaAct", "PACTAct", "LSQAct",
           "ObserverAct", "ActQuantizer", "WeightQuantizer", "round_ste", "grad_scale", "kmeans_1d"]
