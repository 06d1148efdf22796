"""The only code that reads and writes artifact folders: atomic writes, models, modules and compositions (one
table of kinds), ONNX export."""
