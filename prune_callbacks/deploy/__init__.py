"""Getting a pruned network out: save and reload it (`io`), export it for Paddle Inference and
ONNX (`onnx`), and measure its latency on those runtimes (`latency`).
"""
