"""Model runtimes (`models.<name>.runtime`): the network exported to OpenVINO, ONNX Runtime or TensorRT in
float32, bfloat16, float16 or int8, cached per checkpoint, and served only if it answers like float32
torch on held-back images. How and why: docs/model-runtimes.md."""
