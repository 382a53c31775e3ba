"""Files: the safetensors reader and writer, the torch .bin reader (an allow-list unpickler, no torch) and
writer, the .bin -> safetensors converter, checkpoint loading by upstream names, atomic writes, output names."""
