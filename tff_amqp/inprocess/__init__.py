"""TFF values and small computations handled in this process, without a TFF worker.

Shared by the coordinator and the silos: values serialized and read without
TFF's per-call tracing (`value_wire`), element-wise TensorFlow computations
run in NumPy (`numpy_ops`), and silos' phase plans of such computations
evaluated over their clients' values (`plans`).
"""
