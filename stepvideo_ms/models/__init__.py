"""The networks of Step-Video, under the upstream parameter names."""
