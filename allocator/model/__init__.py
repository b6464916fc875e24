"""The model side: loading models, their outputs and distortion metrics, data, the quantizer.

What both the estimators and the backend need (``docs/architecture.md``): :mod:`.loading`
(models and their quantizable units), :mod:`.outputs` and :mod:`.distortion` (the tensor a
model's quality is measured on and how two of them differ), :mod:`.data` (calibration and
held-out batches), :mod:`.quant` (fake-quant kernels), :mod:`.unit_select` (include / exclude,
inert units) and :mod:`.save` (writing a model back in its own library's format).
"""
