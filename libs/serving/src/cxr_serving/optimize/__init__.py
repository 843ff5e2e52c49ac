"""Speed options a model may turn on at load, each checked against float32 before it is kept:
autocast (amp), batch-norm folding (fold), TorchScript (torchscript), CUDA graphs (cuda_graphs),
plus the process-wide allocator and event-loop choices (allocator, event_loop)."""
