"""The machine: devices, several processes (torchrun), the float32 matrix-multiply path, the heap, memory."""
