"""The caption and VAE model servers and their client, speaking safetensors over HTTP (never pickle).

- protocol.py      the wire format and the endpoint names, shared by both sides
- limits.py        what a server accepts, and the request checks
- device_queue.py  one job at a time on the device, a bounded queue for the rest
- services.py      the caption and VAE services: request schema and model calls
- server.py        the Flask app and the bounded threaded WSGI server
- client.py        the requests client (time-outs, retries, clear errors)
- main.py          the command line behind api/call_remote_server.py
"""
